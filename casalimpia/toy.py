"""The ``toy`` preset: small models that have learned the synthetic rooms, shipped in the package.

``tiny`` models have random weights: they exercise the mechanics and paint noise. The toy models
have the same architectures, trained by the project's own jobs on rooms from
:mod:`casalimpia.synthetic` (seeds below ``HELD_OUT_SEED`` only), so offline demos and tests see
furniture found and removed:

- ``segmenter/``: the tiny OneFormer fine-tuned on rooms with exact class maps (``masking.model: toy``);
- ``painter/``: the tiny SD-inpainting pipeline whose UNet was trained in full as a generic
  inpainter of furnished rooms, so that, like SD2, it paints furniture back into a furniture-shaped
  hole (``inpaint.model: toy``);
- ``lora/``: the de-furnishing LoRA trained on the toy painter as a user trains one on SD2
  (``inpaint.lora: toy``).

``scripts/make_toy_models.sh`` makes all three from scratch and installs them here with
:func:`install`; each folder keeps the ``config.yaml`` of the run that made it. They are toys:
64-pixel models of one synthetic world, not a substitute for the real weights on real photos.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from casalimpia.config import TOY

TOY_DIR = Path(__file__).parent / "data" / "toy"
TOY_SEGMENTER = TOY_DIR / "segmenter"
TOY_PAINTER = TOY_DIR / "painter"
TOY_LORA = TOY_DIR / "lora"
BANNER = (
    "toy models trained on synthetic rooms (casalimpia/data/toy): they show what the jobs do, "
    "real photos need the real weights (configs/defurnish.yaml)"
)
"""What outputs made with the toy models say about themselves, in reports and logs."""


def uses_toy(*references: str | None) -> bool:
    """Whether any of the model references is the toy preset."""
    return TOY in references


def install(segmenter: Path, painter: Path, lora: Path, target: Path = TOY_DIR) -> None:
    """Replace the toy models under target with the exports of the runs that made them.

    The painter's UNet, the only trained part of its pipeline, is stored in fp16 (loading casts it
    back), which keeps the three models under the package's 10 MB.
    """
    from safetensors.torch import load_file, save_file

    for source, name in ((segmenter, "segmenter"), (painter, "painter"), (lora, "lora")):
        if not source.is_dir():
            raise FileNotFoundError(f"no {name} export at {source}")
        destination = target / name
        shutil.rmtree(destination, ignore_errors=True)
        shutil.copytree(source, destination)
    for weights in (target / "painter" / "unet").glob("*.safetensors"):
        save_file({key: value.half() for key, value in load_file(weights).items()}, weights)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m casalimpia.toy install SEGMENTER PAINTER LORA``."""
    parser = argparse.ArgumentParser(prog="python -m casalimpia.toy", description=install.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parser_install = commands.add_parser("install", help="install the exports of the toy runs as the toy preset")
    parser_install.add_argument("segmenter", type=Path, help="the segmenter run's model/ folder")
    parser_install.add_argument("painter", type=Path, help="the full-UNet run's model/ folder")
    parser_install.add_argument("lora", type=Path, help="the LoRA run's lora/ folder")
    args = parser.parse_args(argv)
    install(args.segmenter, args.painter, args.lora)
    total = sum(path.stat().st_size for path in TOY_DIR.rglob("*") if path.is_file())
    print(f"installed the toy models in {TOY_DIR} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
