"""The `random-full` preset: the default models' full-size architectures, built offline with random weights.

Parameter counts are checked on the meta device (no memory, no init time) against the published
figures of stabilityai/stable-diffusion-2-inpainting and shi-labs/oneformer_ade20k_swin_large.
"""

import json
import logging

import pytest
import torch

from casalimpia.classes import ADE20K_CLASSES, normalize_label
from casalimpia.models import (
    ONEFORMER_SWIN_LARGE_DIR,
    RANDOM_FULL,
    SD2_INPAINTING_DIR,
    Placement,
    check_available,
    load_inpainting_pipeline,
    load_segmenter,
    oneformer_swin_large,
    random_full_inpainting_pipeline,
    sd2_inpainting_components,
)

# SD2's text-to-image UNet has 865,910,724 parameters; the inpainting UNet's conv_in takes 9
# channels instead of 4, which adds 5 * 320 * 3 * 3 weights.
UNET_PARAMETERS = 865_910_724 + 5 * 320 * 3 * 3
VAE_PARAMETERS = 83_653_863
TEXT_ENCODER_PARAMETERS = 340_387_840  # OpenCLIP ViT-H/14 text tower, 23 of its 24 layers as SD2 uses them
ONEFORMER_PARAMETERS = 219_000_000  # the hub's "219M params" (pytorch_model.bin, 880 MB of fp32)
CPU = Placement(torch.device("cpu"), torch.float32, "cpu (test)")


def _patch_embedding(model: torch.nn.Module) -> torch.Tensor:
    """The Swin backbone's patch-embedding convolution weight."""
    return next(p for name, p in model.named_parameters() if name.endswith("patch_embeddings.projection.weight"))


@pytest.fixture(scope="module")
def sd2_on_meta():
    return sd2_inpainting_components("meta")


def test_configs_load():
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, OneFormerConfig

    unet = UNet2DConditionModel.load_config(SD2_INPAINTING_DIR / "unet")
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4 and unet["sample_size"] == 64
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["attention_head_dim"] == [5, 10, 20, 20]
    assert unet["cross_attention_dim"] == 1024 and unet["use_linear_projection"] is True
    vae = AutoencoderKL.load_config(SD2_INPAINTING_DIR / "vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(SD2_INPAINTING_DIR / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1024, 23, 16)
    assert (text.max_position_embeddings, text.vocab_size, text.hidden_act) == (77, 49408, "gelu")
    scheduler = PNDMScheduler.from_pretrained(SD2_INPAINTING_DIR, subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.steps_offset == 1 and scheduler.config.skip_prk_steps
    index = json.loads((SD2_INPAINTING_DIR / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", type(scheduler).__name__]

    oneformer = OneFormerConfig.from_pretrained(ONEFORMER_SWIN_LARGE_DIR)
    swin = oneformer.backbone_config
    assert (swin.model_type, swin.embed_dim, swin.window_size, swin.image_size) == ("swin", 192, 12, 384)
    assert swin.depths == [2, 2, 18, 2] and swin.num_heads == [6, 12, 24, 48]
    assert oneformer.num_queries == 250 and oneformer.task_seq_len == 77 and not oneformer.is_training


def test_sd2_inpainting_unet(sd2_on_meta):
    unet = sd2_on_meta["unet"]
    assert unet.num_parameters() == pytest.approx(UNET_PARAMETERS, rel=1e-4)
    assert unet.conv_in.in_channels == 9 and unet.conv_out.out_channels == 4
    assert unet.config.cross_attention_dim == 1024 and unet.conv_in.weight.device.type == "meta"


def test_sd2_inpainting_vae_and_text_encoder(sd2_on_meta):
    assert sd2_on_meta["vae"].num_parameters() == pytest.approx(VAE_PARAMETERS, rel=1e-4)
    text_encoder = sd2_on_meta["text_encoder"]
    assert text_encoder.num_parameters() == pytest.approx(TEXT_ENCODER_PARAMETERS, rel=1e-4)
    assert text_encoder.get_input_embeddings().weight.shape == (49408, 1024)
    assert sum(type(module).__name__ == "CLIPEncoderLayer" for module in text_encoder.modules()) == 23


def test_oneformer_swin_large():
    model = oneformer_swin_large("meta")
    assert model.num_parameters() == pytest.approx(ONEFORMER_PARAMETERS, rel=0.01)
    assert _patch_embedding(model).shape == (192, 3, 4, 4)
    assert model.config.num_labels == 150
    assert [normalize_label(model.config.id2label[i]) for i in range(150)] == list(ADE20K_CLASSES)
    # The class head predicts the 150 classes and "no object".
    assert model.model.transformer_module.decoder.class_embed.out_features == 151


def test_built_where_they_run_in_the_placement_dtype():
    """The accelerator path without an accelerator: built under a device context (meta here), then cast."""
    pipe = random_full_inpainting_pipeline("meta", torch.bfloat16)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        parameter = next(model.parameters())
        assert parameter.device.type == "meta" and parameter.dtype == torch.bfloat16
    assert pipe.scheduler.alphas_cumprod.device.type == "cpu"  # schedulers keep their tables on the CPU
    model, _ = load_segmenter(RANDOM_FULL, Placement(torch.device("meta"), torch.bfloat16, "meta (test)"))
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


def test_random_full_is_available_and_the_segmenter_is_seeded(caplog, monkeypatch):
    # The jobs' logging setup stops casalimpia's records at its own handler; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("casalimpia"), "propagate", True)
    check_available(RANDOM_FULL, "masking.model")
    with caplog.at_level(logging.WARNING, logger="casalimpia.models"):
        model, tokenizer = load_segmenter(RANDOM_FULL, CPU)
    assert any("random" in r.getMessage().lower() and "benchmark" in r.getMessage() for r in caplog.records)
    again, _ = load_segmenter(RANDOM_FULL, CPU)
    first = _patch_embedding(model)
    assert torch.equal(first, _patch_embedding(again))
    assert not model.training and first.dtype == torch.float32
    task = tokenizer("the task is semantic", padding="max_length", max_length=model.config.task_seq_len)
    assert len(task["input_ids"]) == 77


def test_random_full_inpainting_pipeline_on_cpu(caplog, monkeypatch):
    """The whole pipeline, built (~15 s and ~6 GB of fp32 weights on this CPU) but not run."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    monkeypatch.setattr(logging.getLogger("casalimpia"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="casalimpia.models"):
        pipe = load_inpainting_pipeline(RANDOM_FULL, CPU)
    assert any("random" in r.getMessage().lower() for r in caplog.records)
    assert isinstance(pipe, StableDiffusionInpaintPipeline) and isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None
    assert pipe.unet.conv_in.weight.shape == (320, 9, 3, 3) and pipe.unet.dtype == torch.float32
    assert pipe.unet.device.type == "cpu" and pipe.text_encoder.device.type == "cpu"
    assert pipe.unet.num_parameters() == UNET_PARAMETERS
    assert pipe.vae.num_parameters() == VAE_PARAMETERS and pipe.vae.config.scaling_factor == 0.18215
    assert pipe.text_encoder.num_parameters() == TEXT_ENCODER_PARAMETERS
    ids = pipe.tokenizer(
        "an empty room, bare floor, bare walls, nothing in the room, clean minimalist interior, real estate photos",
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (1, 77) and int(ids.max()) < pipe.text_encoder.config.vocab_size
    del pipe


@pytest.mark.gpu
def test_random_full_models_paint_and_segment_on_the_gpu():
    """What configs/bench.yaml runs, once, on the accelerator: both full-size models in bf16/fp16."""
    import numpy as np

    from casalimpia.config import InpaintConfig, MaskingConfig
    from casalimpia.inpainting import Inpainter
    from casalimpia.masking import FurnitureMasker
    from casalimpia.synthetic import render_room

    if not torch.accelerator.is_available():
        pytest.skip("needs a GPU")
    room = render_room(0, 768, 512)
    painter = Inpainter(InpaintConfig(model=RANDOM_FULL, resolution=512, steps=2, batch_size=1))
    assert next(painter.pipe.unet.parameters()).dtype in (torch.bfloat16, torch.float16)
    [painted] = painter.paint([room.furnished], [room.mask], ["room.png"])
    assert painted.shape == room.furnished.shape
    assert np.array_equal(painted[~room.mask], room.furnished[~room.mask])
    [mask] = FurnitureMasker(MaskingConfig(model=RANDOM_FULL)).segment([room.furnished])
    assert mask.shape == room.mask.shape
