"""Model placement, availability checks, the s3:// model cache and LoRA loading."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from casalimpia import storage
from casalimpia.config import InpaintConfig
from casalimpia.inpainting import LORA_WEIGHTS, Inpainter
from casalimpia.models import (
    ModelUnavailableError,
    check_available,
    local_path,
    resolve_placement,
    tiny_inpainting_pipeline,
)
from casalimpia.synthetic import render_room


def test_cpu_placement_is_fp32_and_says_why():
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    placement = resolve_placement()
    assert placement.device.type == "cpu" and placement.dtype == torch.float32
    assert "no accelerator" in placement.reason


@pytest.mark.gpu
def test_gpu_placement_prefers_bf16():
    if not torch.accelerator.is_available():
        pytest.skip("needs a GPU")
    placement = resolve_placement()
    assert placement.device.type != "cpu" and placement.dtype in (torch.bfloat16, torch.float16)


def test_check_available(tmp_path):
    check_available("tiny", "inpaint.model")
    check_available(str(tmp_path), "inpaint.model")
    with pytest.raises(ModelUnavailableError, match="no such folder"):
        check_available("./models/missing", "inpaint.model")
    # Offline, or online with no such repository: either way one line of advice.
    with pytest.raises(ModelUnavailableError) as error:
        check_available("casalimpia-test/not-a-real-model", "masking.model")
    message = str(error.value)
    assert message.startswith("masking.model: cannot load 'casalimpia-test/not-a-real-model'")
    assert "HF_HOME" in message and "\n" not in message


def test_s3_models_are_copied_once_per_node(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr("casalimpia.models.CACHE_DIR", tmp_path / "cache")
    uri = f"s3://{s3_bucket}/models/lora"
    storage.write_bytes(storage.join(uri, "config.json"), b"{}")
    first = local_path(uri)
    assert Path(first, "config.json").read_text() == "{}" and Path(first).is_relative_to(tmp_path / "cache")
    storage.delete(storage.join(uri, "config.json"))  # a second call must not read S3 again
    assert local_path(uri) == first


def save_tiny_lora(folder, rank: int = 4) -> None:
    """A diffusers-format LoRA for the tiny UNet, with non-zero weights so it changes the output."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_inpainting_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, parameter in pipe.unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers)


def test_lora_changes_the_painted_pixels(tmp_path):
    save_tiny_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / LORA_WEIGHTS).exists()
    room = render_room(3, 128, 96)
    photo = ([room.furnished], [room.mask], ["room.png"])
    base = InpaintConfig(model="tiny", resolution=64, steps=2)
    [plain] = Inpainter(base).paint(*photo)
    [by_folder] = Inpainter(dataclasses.replace(base, lora=str(tmp_path / "lora"))).paint(*photo)
    [by_file] = Inpainter(dataclasses.replace(base, lora=str(tmp_path / "lora" / LORA_WEIGHTS))).paint(*photo)
    assert not np.array_equal(by_folder, plain)
    assert np.array_equal(by_folder, by_file)
    assert np.array_equal(by_folder[~room.mask], room.furnished[~room.mask])


@pytest.mark.real_weights
def test_real_models_load_from_the_local_cache():
    from casalimpia.config import InpaintConfig, MaskingConfig
    from casalimpia.masking import FurnitureMasker

    try:
        check_available(MaskingConfig().model, "masking.model")
        check_available(InpaintConfig().model, "inpaint.model")
    except ModelUnavailableError as error:
        pytest.skip(f"real weights not available: {error}")
    masker = FurnitureMasker(MaskingConfig())
    room = render_room(0)
    masks = masker.segment([room.furnished])
    assert masks[0].shape == room.mask.shape
    painted = Inpainter(InpaintConfig(steps=4)).paint([room.furnished], [room.mask], ["room.png"])
    assert painted[0].shape == room.furnished.shape
