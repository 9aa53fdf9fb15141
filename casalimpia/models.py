"""Model loading: device and dtype, model sources, and the offline `tiny` and `toy` presets.

A model reference is a Hugging Face hub id, a local folder, an ``s3://`` prefix (copied once per
node into a local cache), ``toy``: the small models shipped in the package, trained on synthetic
rooms (:mod:`casalimpia.toy`), or ``tiny``: the same architectures randomly initialised in code
with a fixed seed, so every job and test runs offline. Outputs made with ``tiny`` are noise and say so.
``random-full`` (RANDOM_FULL) is the full-size architecture of each default model, built offline from
the configs under ``casalimpia/data/architectures`` with random weights: for throughput benchmarks,
whose timings do not depend on weight values; its outputs are noise too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

from casalimpia import storage
from casalimpia.classes import ADE20K_CLASSES
from casalimpia.config import RANDOM_FULL, RANDOM_WEIGHTS, TINY, TOY
from casalimpia.toy import TOY_PAINTER, TOY_SEGMENTER

log = logging.getLogger(__name__)

T = TypeVar("T")

TINY_SEED = 0
"""The default models' full-size architectures with random weights (seeded), built offline; for benchmarks."""
ARCHITECTURES_DIR = Path(__file__).parent / "data" / "architectures"
SD2_INPAINTING_DIR = ARCHITECTURES_DIR / "sd2-inpainting"
"""Configs of stabilityai/stable-diffusion-2-inpainting: unet/, vae/, text_encoder/, scheduler/."""
ONEFORMER_SWIN_LARGE_DIR = ARCHITECTURES_DIR / "oneformer-ade20k-swin-large"
"""config.json of shi-labs/oneformer_ade20k_swin_large."""
CACHE_DIR = Path(os.environ.get("CASALIMPIA_CACHE", Path.home() / ".cache" / "casalimpia"))


class ModelUnavailableError(RuntimeError):
    """Weights that cannot be had; the message names the model and how to supply it."""


@dataclass(frozen=True)
class Placement:
    """Where a stage's model runs, and why."""

    device: torch.device
    dtype: torch.dtype
    reason: str


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_placement(dtype: str = "auto") -> Placement:
    """Pick the accelerator if there is one, else the CPU, and a dtype that is safe on it.

    On a GPU bf16 is preferred where supported, since fp16 VAE encodes can overflow to NaN;
    the CPU runs fp32 because half-precision kernels there are slow or missing.
    """
    if torch.accelerator.is_available():
        device = torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
        if dtype != "auto":
            chosen, why = _DTYPES[dtype], f"{dtype} as configured"
        elif device.type == "cuda" and torch.cuda.is_bf16_supported():
            chosen, why = torch.bfloat16, "bf16: supported by this GPU and safe for the VAE"
        else:
            chosen, why = torch.float16, "fp16: this accelerator has no bf16"
        return Placement(device, chosen, f"{device}{_ray_node()} ({why})")
    chosen = torch.float32 if dtype in ("auto", "fp32") else _DTYPES[dtype]
    why = "fp32: no accelerator visible" if dtype == "auto" else f"{dtype} as configured"
    return Placement(torch.device("cpu"), chosen, f"cpu{_ray_node()} ({why})")


def _ray_node() -> str:
    """' of Ray node <id>' inside a Ray worker, '' elsewhere: on a cluster the logs say where each model landed."""
    import ray

    return f" of Ray node {ray.get_runtime_context().get_node_id()[:12]}" if ray.is_initialized() else ""


def in_halves(
    run: Callable[[list[int]], Sequence[T]],
    rows: list[int],
    what: str,
    split_on: tuple[type[Exception], ...] = (torch.OutOfMemoryError,),
) -> list[T | Exception]:
    """``run(rows)``, or when it raises one of ``split_on``, ``run`` on each half of the rows, down to single rows.

    Each row gets its result, or the exception its call raised when the row was alone. The halves are
    run one after the other, so a batch that ran out of accelerator memory is retried with half of
    what it held, after the allocator's cache is released. ``what`` names the work in the warning.
    """
    if not rows:
        return []
    try:
        return list(run(rows))
    except split_on as error:
        if len(rows) == 1:
            return [error]
        out_of_memory = isinstance(error, torch.OutOfMemoryError)
        reason = "ran out of accelerator memory" if out_of_memory else f"failed ({str(error).splitlines()[0][:200]})"
        log.warning("%s of %d photos %s; retrying in halves", what, len(rows), reason)
        if out_of_memory and torch.accelerator.is_available():
            # The failed call's tensors are garbage now; their cached blocks go back so the halves fit.
            torch.accelerator.empty_cache()
    middle = len(rows) // 2
    return in_halves(run, rows[:middle], what, split_on) + in_halves(run, rows[middle:], what, split_on)


def _hub_cached(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # every kind of cache miss means the same thing here: not cached
        return None


def check_available(reference: str, role: str) -> None:
    """Fail before any work starts when a model cannot be loaded; cheap (no download).

    ``role`` is the config key that named the model, so the message says what to change.
    """
    if reference in (*RANDOM_WEIGHTS, TOY):
        return
    if storage.is_s3(reference) or reference.startswith("file://"):
        try:
            storage.list_files(reference)
        except storage.StorageError as error:
            raise ModelUnavailableError(f"{role}: {error}") from None
        return
    if Path(reference).exists():
        return
    if _looks_like_path(reference):
        raise ModelUnavailableError(f"{role}: no such folder {reference!r}")
    if _hub_cached(reference) is not None:
        return
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(reference, timeout=10)
    except Exception as error:  # offline, unknown repo and gated repo all end the same way
        reason = str(error).splitlines()[0][:160]
        raise ModelUnavailableError(
            f"{role}: cannot load {reference!r}: not in the local Hugging Face cache and the hub "
            f"cannot provide it ({reason}). Download it where there is network "
            f"(`hf download {reference}`) and point HF_HOME at that cache, or set {role} to a "
            "local folder or an s3:// prefix holding the weights."
        ) from None


def _looks_like_path(reference: str) -> bool:
    return reference.startswith((".", "/", "~")) or reference.count("/") > 1


def local_path(reference: str) -> str:
    """A path or hub id that `from_pretrained` can open; s3:// prefixes are cached per node."""
    if reference.startswith("file://"):
        return reference.removeprefix("file://")
    if not storage.is_s3(reference):
        return reference
    target = CACHE_DIR / "models" / hashlib.sha256(reference.rstrip("/").encode()).hexdigest()[:16]
    done = target / ".complete"
    # One copy per node: actors on the same node wait on the lock and reuse the finished copy.
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            log.info("copying %s to the local cache %s", reference, target)
            storage.copy_tree(reference, str(target))
            done.touch()
    return str(target)


def load_segmenter(reference: str, placement: Placement, *, training: bool = False) -> tuple[Any, Any]:
    """OneFormer and the tokenizer for its task prompt, on the placement: in eval mode, or in train mode
    in its training form with ``training`` (see `segmenter_form`)."""
    if reference in RANDOM_WEIGHTS:
        model, tokenizer = tiny_segmenter() if reference == TINY else random_full_segmenter(placement.device)
        if training:
            model = segmenter_form(model, training=True)
    else:
        from transformers import AutoTokenizer, OneFormerForUniversalSegmentation

        path = str(TOY_SEGMENTER) if reference == TOY else local_path(reference)
        # The text mapper keeps the checkpoint's weights where it has them, else it starts new (a warning lists it).
        model = OneFormerForUniversalSegmentation.from_pretrained(path, is_training=training)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model = model.to(device=placement.device, dtype=placement.dtype).train(training)
    return model, tokenizer


TEXT_MAPPER_PREFIX = "model.text_mapper."
"""State-dict keys of OneFormer's training-only text branch."""


def segmenter_form(model: Any, *, training: bool) -> Any:
    """A new OneFormer with model's weights, in its training form (``is_training``) or its inference form.

    The training form adds the text mapper that encodes the per-class texts of OneFormer's
    query-text contrastive loss (seeded with TINY_SEED where new); its forward then requires
    ``text_inputs``, and its deformable encoder applies dropout whatever the module's mode, so
    validation, export and masking use the inference form. Built on the CPU in fp32.
    """
    from transformers import OneFormerForUniversalSegmentation

    config = type(model.config).from_dict(model.config.to_dict())
    config.is_training = training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        converted = OneFormerForUniversalSegmentation(config)
    state = {
        key: value for key, value in model.state_dict().items() if training or not key.startswith(TEXT_MAPPER_PREFIX)
    }
    result = converted.load_state_dict(state, strict=False)
    unmatched = [
        key for key in [*result.missing_keys, *result.unexpected_keys] if not key.startswith(TEXT_MAPPER_PREFIX)
    ]
    if unmatched:
        raise ValueError(f"OneFormer forms differ beyond the text mapper: {unmatched[:3]}")
    return converted.train(training)


def load_inpainting_pipeline(reference: str, placement: Placement) -> Any:
    """A diffusers StableDiffusionInpaintPipeline on the placement, progress bars off."""
    if reference == TINY:
        pipe = tiny_inpainting_pipeline()
        if placement.dtype != torch.float32:
            pipe = pipe.to(dtype=placement.dtype)
    elif reference == RANDOM_FULL:
        pipe = random_full_inpainting_pipeline(placement.device, placement.dtype)
    else:
        from diffusers import StableDiffusionInpaintPipeline

        path = str(TOY_PAINTER) if reference == TOY else local_path(reference)
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            path, torch_dtype=placement.dtype, safety_checker=None, requires_safety_checker=False
        )
    pipe = pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer(model_max_length: int = 77) -> Any:
    """A byte-level CLIP tokenizer built in memory: one token per byte, no merges, no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": i + len(alphabet) for i, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_segmenter() -> tuple[Any, Any]:
    """A ~0.4M-parameter OneFormer with ADE20K's 150 labels and random weights.

    No dropout nor stochastic depth: with OneFormer's default dropout (0.1) this small a model
    collapsed to one class in short training runs. The text encoder settings only shape the training
    form's text mapper (see `segmenter_form`), which needs a width of at least 64 (one head per 64)
    and, with prompt context tokens, a width equal to hidden_dim; without them its text queries match
    the 8 object queries one to one.
    """
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation, SwinConfig

    tokenizer = tiny_tokenizer(model_max_length=24)
    config = OneFormerConfig(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            drop_path_rate=0.0,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        num_labels=len(ADE20K_CLASSES),
        id2label=dict(enumerate(ADE20K_CLASSES)),
        label2id={name: i for i, name in enumerate(ADE20K_CLASSES)},
        hidden_dim=32,
        mask_dim=32,
        dropout=0.0,
        conv_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=8,
        text_encoder_width=64,
        text_encoder_num_layers=1,
        text_encoder_context_length=24,
        text_encoder_vocab_size=len(tokenizer),
        text_encoder_proj_layers=1,
        text_encoder_n_ctx=0,
        task_seq_len=24,
        max_seq_len=24,
        is_training=False,
        use_auxiliary_loss=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = OneFormerForUniversalSegmentation(config)
    return model, tokenizer


def tiny_inpainting_pipeline() -> Any:
    """diffusers' test-sized SD inpainting: 9-channel UNet (32, 64), 2x VAE, 32-wide CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=9,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=8,
            # Latents are the pooled RGB in [-1, 1]; this brings them to about unit variance, as
            # SD's own factor does for its VAE, so noise and signal meet at the usual timesteps.
            scaling_factor=2.0,
        )
        wire_transparent_autoencoder(vae)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
                vocab_size=len(tokenizer),
            )
        )
    # SD's noise schedule, but the UNet predicts the clean latents: trained as the toy painter, this
    # small a UNet predicting the noise left colour noise in the hole (PSNR 11.6 against 14.5 in a
    # 200-step probe on synthetic rooms); training and sampling both follow the scheduler's setting.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="sample",
    )
    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _warn_random_full(what: str) -> None:
    log.warning(
        "%s: %r is the full-size architecture with RANDOM weights, for benchmarking only: the outputs are noise",
        what,
        RANDOM_FULL,
    )


@contextlib.contextmanager
def _seeded_build(device: torch.device) -> Iterator[None]:
    """Build modules on ``device`` with torch's generators seeded from TINY_SEED, restoring them after.

    Parameters are created where the model will run, so no fp32 copy is first built on the CPU.
    """
    # torch.manual_seed seeds every device; the CPU's and a CUDA device's generators are restored after.
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(TINY_SEED)
        with torch.device(device):
            yield


def sd2_inpainting_components(device: torch.device | str = "cpu") -> dict[str, Any]:
    """SD2-inpainting's UNet, VAE and OpenCLIP-H text encoder, fp32 and random (seeded), built on ``device``.

    Built from the configs in SD2_INPAINTING_DIR; ``device="meta"`` builds them without any memory,
    to inspect shapes and parameter counts. The models are in eval mode.
    """
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device(device)
    unet_config = json.loads((SD2_INPAINTING_DIR / "unet" / "config.json").read_text())
    vae_config = json.loads((SD2_INPAINTING_DIR / "vae" / "config.json").read_text())
    text_config = CLIPTextConfig.from_json_file(str(SD2_INPAINTING_DIR / "text_encoder" / "config.json"))
    with _seeded_build(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def random_full_inpainting_pipeline(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """StableDiffusionInpaintPipeline with SD2-inpainting's full-size architecture and random weights.

    The networks are built on ``device`` (fp32, seeded with TINY_SEED) and then cast to ``dtype``;
    the scheduler is the published one (PNDM); the tokenizer is the byte-level stand-in of
    `tiny_tokenizer` (77 tokens, ids far below the text encoder's vocabulary), since the real
    vocabulary files cannot be had offline. No safety checker.
    """
    import json

    import diffusers
    from diffusers import StableDiffusionInpaintPipeline

    _warn_random_full("inpainting")
    device = torch.device(device)
    components = sd2_inpainting_components(device)
    if dtype != torch.float32:
        for model in components.values():
            model.to(dtype=dtype)
    scheduler_config = json.loads((SD2_INPAINTING_DIR / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    tokenizer = tiny_tokenizer(model_max_length=components["text_encoder"].config.max_position_embeddings)
    if len(tokenizer) > components["text_encoder"].config.vocab_size:
        raise ValueError("the stand-in tokenizer's ids must stay below the text encoder's vocabulary size")
    return StableDiffusionInpaintPipeline(
        **components,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def oneformer_swin_large(device: torch.device | str = "cpu") -> Any:
    """OneFormer with a Swin-L backbone and ADE20K's 150 labels, fp32 and random (seeded), built on ``device``.

    Built from the config in ONEFORMER_SWIN_LARGE_DIR; ``device="meta"`` builds it without memory.
    """
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    device = torch.device(device)
    config = OneFormerConfig.from_json_file(str(ONEFORMER_SWIN_LARGE_DIR / "config.json"))
    with _seeded_build(device):
        model = OneFormerForUniversalSegmentation(config)
    return model.eval()


def random_full_segmenter(device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """The Swin-L OneFormer with random weights and the stand-in task tokenizer (task_seq_len tokens)."""
    _warn_random_full("masking")
    model = oneformer_swin_large(device)
    return model, tiny_tokenizer(model_max_length=model.config.task_seq_len)


def wire_transparent_autoencoder(vae: Any, constant: float = 10.0, offset: float = 30.0) -> None:
    """Set the tiny VAE's weights so that decode(encode(x)) is x at half resolution, nearly losslessly.

    A random VAE decodes to images unrelated to its input, so nothing painted through it can be
    compared with a target and no test could see an inpainting model learn. Wired this way, the
    encoder is a 2x2 average pool with RGB as the latent mean (a vanishing variance) and the
    decoder a nearest-neighbour upsample: every residual branch and attention output is zeroed,
    so each block passes its input through. The final GroupNorm of each half would remove every
    image's mean and scale, so each signal channel shares its group with channels held at
    +constant, -constant and 0: those pin the group's statistics (up to O((x / constant)^2)) and
    the zero channel carries the subtracted mean, which the output convolution adds back.
    ``offset`` keeps SiLU in its linear range. Needs ``norm_num_groups=8`` and channels (32, 64).
    """
    import torch

    encoder, decoder = vae.encoder, vae.decoder
    with torch.no_grad():
        for module in vae.modules():
            if type(module).__name__ == "ResnetBlock2D":
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if module.conv_shortcut is not None:
                    _identity_conv(module.conv_shortcut)
            elif type(module).__name__ == "Attention":
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        encoder_group = encoder.conv_norm_out.num_channels // encoder.conv_norm_out.num_groups
        decoder_group = decoder.conv_norm_out.num_channels // decoder.conv_norm_out.num_groups
        # Colour c travels in channel c * group of its half, with its +K, -K and zero companions after it.
        _pinned_input(encoder.conv_in, [c * encoder_group for c in range(3)], constant)
        pool = encoder.down_blocks[0].downsamplers[0].conv
        pool.weight.zero_()
        pool.bias.zero_()
        for channel in range(pool.out_channels):
            pool.weight[channel, channel, :2, :2] = 0.25
        _pinned_output(encoder.conv_norm_out, encoder.conv_out, encoder_group, constant, offset)
        encoder.conv_out.bias[vae.config.latent_channels :] = -30.0  # log-variance: the latent is its mean
        _identity_conv(vae.quant_conv)
        _identity_conv(vae.post_quant_conv)
        _pinned_input(decoder.conv_in, [c * decoder_group for c in range(3)], constant)
        _identity_conv(decoder.up_blocks[0].upsamplers[0].conv)
        _pinned_output(decoder.conv_norm_out, decoder.conv_out, decoder_group, constant, offset)


def _identity_conv(conv: Any) -> None:
    """Pass channel i to channel i (for i below both channel counts) through the kernel's centre."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    centre_y, centre_x = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    for channel in range(min(conv.in_channels, conv.out_channels)):
        conv.weight[channel, channel, centre_y, centre_x] = 1.0


def _pinned_input(conv: Any, targets: list[int], constant: float) -> None:
    """Input channel c to output channel targets[c], followed by channels at +constant and -constant."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre_y, centre_x = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    for source, target in enumerate(targets):
        conv.weight[target, source, centre_y, centre_x] = 1.0
        conv.bias[target + 1] = constant
        conv.bias[target + 2] = -constant


def _pinned_output(norm: Any, conv: Any, group: int, constant: float, offset: float) -> None:
    """Undo the GroupNorm of pinned groups: output c = scale * (signal - zero companion) of group c."""
    norm.weight.fill_(1.0)
    norm.bias.fill_(offset)
    # The group's spread is set by the +constant and -constant channels: sqrt(2 constant^2 / group).
    scale = constant * (2.0 / group) ** 0.5
    conv.weight.zero_()
    conv.bias.zero_()
    centre_y, centre_x = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    for colour in range(3):
        conv.weight[colour, colour * group, centre_y, centre_x] = scale
        conv.weight[colour, colour * group + 3, centre_y, centre_x] = -scale
