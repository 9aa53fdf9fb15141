r"""Fine-tune the inpainting model to paint empty rooms, on Ray Train: a LoRA, or the whole UNet.

python jobs/train.py --config configs/train.yaml --input s3://rooms/empty/ --output s3://models/loras/ \
    --set data.library=s3://rooms/mask-library/ --set name=lora-r8

--set mode=full trains every UNet weight instead and exports a model folder for inpaint.model.

--input sets data.rooms (empty-room photos), --output sets storage (the run folder's parent).
Starting a run with the same name and storage resumes it from its latest checkpoint.
"""

import argparse
import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.config import ConfigError, TrainConfig, add_config_arguments, config_from_args
from casalimpia.pipeline import JobError, connect
from casalimpia.training.trainer import fit, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, TrainConfig, input_key="data.rooms", output_key="storage")
        plan = prepare(config)
    except (ConfigError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{'resuming' if plan.resuming else 'starting'} run {plan.run_uri}: {len(plan.train_rooms)} training rooms "
        f"(x{plan.repeats}), {len(plan.validation_rooms)} validation rooms, {config.epochs} epochs of "
        f"{plan.steps_per_epoch} steps on {config.ray.workers} worker(s)"
    )
    connect(config.ray.address)
    summary = fit(plan)
    print(summary.table())
    best = f"{config.checkpoint_metric}={summary.best_score:.4f}"
    print(f"done in {summary.seconds:.1f}s; best epoch {summary.best_epoch} ({best})")
    what = "model" if config.mode == "full" else "LoRA"
    print(f"{what}: {summary.output_uri}  (use it with --set {summary.output_key}={summary.output_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
