"""PSNR, SSIM and LPIPS against closed forms and their defining properties; where LPIPS gets its backbone."""

import logging
import logging.handlers
import math

import numpy as np
import pytest
import torch
import torchvision

from casalimpia.metrics import LPIPS, MAX_PSNR, alexnet_checkpoint, psnr, score, ssim

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _image(shape=(64, 80), low=20, high=200, seed=0):
    return np.random.default_rng(seed).integers(low, high + 1, (*shape, 3), dtype=np.uint8)


def _noisy(image, sigma, seed=1):
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _corner_mask(shape, side=32):
    mask = np.zeros(shape, dtype=bool)
    mask[:side, :side] = True
    return mask


def _gaussian_local_mean(image):
    """Local means under an 11x11 Gaussian window of sigma 1.5 with mirrored borders, built by hand."""
    offsets = np.arange(-5, 6)
    kernel = np.exp(-(offsets**2) / (2 * 1.5**2))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), ((5, 5), (5, 5), (0, 0)), mode="symmetric")
    rows = np.lib.stride_tricks.sliding_window_view(padded, 11, axis=0) @ kernel
    return np.lib.stride_tricks.sliding_window_view(rows, 11, axis=1) @ kernel


@pytest.fixture(scope="module")
def lpips_metric():
    return LPIPS()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME that torch.hub really uses: it caches its dir, so point that at TORCH_HOME too."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"LPIPS tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    yield tmp_path
    torch.hub.set_dir(previous)


def test_identical_images_score_perfectly(lpips_metric):
    image, mask = _image(), _corner_mask((64, 80))
    assert psnr(image, image) == psnr(image, image, mask) == MAX_PSNR
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert ssim(image, image, mask) == pytest.approx(1.0, abs=1e-12)
    whole, masked = lpips_metric([image], [image.copy()], [mask])
    assert whole[0] == pytest.approx(0.0, abs=1e-6) and masked[0] == pytest.approx(0.0, abs=1e-6)


def test_psnr_of_a_constant_shift():
    target = _image()
    output = target + np.uint8(10)
    assert psnr(output, target) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    assert psnr(output, target, _corner_mask((64, 80))) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


@pytest.mark.parametrize("side", [100, 256])
def test_psnr_is_capped(side):
    target = np.zeros((side, side, 3), dtype=np.uint8)
    output = target.copy()
    output[0, 0, 0] = 1  # 92.9 dB at side 100, 101.1 dB at side 256
    expected = 10 * math.log10(255**2 * 3 * side * side)
    assert psnr(output, target) == pytest.approx(min(expected, MAX_PSNR))


def test_ssim_of_flat_images_is_the_luminance_term():
    target = np.full((32, 32, 3), 100, dtype=np.uint8)
    output = np.full((32, 32, 3), 110, dtype=np.uint8)
    expected = (2 * 100 * 110 + C1) / (100**2 + 110**2 + C1)
    assert ssim(output, target) == pytest.approx(expected, abs=1e-12)
    assert ssim(output, target, _corner_mask((32, 32), 4)) == pytest.approx(expected, abs=1e-12)


def test_ssim_of_a_shifted_image_is_the_luminance_term_of_its_local_means():
    # A constant shift leaves variances and covariance equal, so the contrast-structure term is exactly 1.
    target = _image()
    output = target + np.uint8(10)
    mu_target = _gaussian_local_mean(target)
    mu_output = mu_target + 10
    expected = ((2 * mu_output * mu_target + C1) / (mu_output**2 + mu_target**2 + C1)).mean(axis=2)
    mask = _corner_mask((64, 80), 20)
    assert ssim(output, target) == pytest.approx(expected.mean(), abs=1e-9)
    assert ssim(output, target, mask) == pytest.approx(expected[mask].mean(), abs=1e-9)
    assert ssim(output, target) < 1


def test_ssim_drops_with_noise_and_handles_small_images():
    target = _image((7, 7))
    assert ssim(target, target) == pytest.approx(1.0)
    assert 0 < ssim(_noisy(target, 40), target) < ssim(_noisy(target, 5), target) < 1


def test_masked_scores_ignore_pixels_away_from_the_mask(lpips_metric):
    target = _image((256, 256))
    mask = _corner_mask((256, 256))
    output = _noisy(target, 30)
    output[~mask] = target[~mask]
    changed = output.copy()
    # Far enough that neither the SSIM window (5 px) nor AlexNet's receptive field reaches the mask.
    changed[192:, 192:] = 0
    assert psnr(changed, target, mask) == psnr(output, target, mask)
    assert psnr(changed, target) < psnr(output, target)
    assert ssim(changed, target, mask) == ssim(output, target, mask)
    assert ssim(changed, target) < ssim(output, target)
    (whole, changed_whole), (masked, changed_masked) = lpips_metric([output, changed], [target, target], [mask, mask])
    assert changed_masked == pytest.approx(masked, abs=1e-6)
    assert changed_whole > whole


def test_changes_inside_a_small_mask_weigh_more_in_the_masked_psnr():
    target = _image((64, 80))
    mask = _corner_mask((64, 80), 8)
    output = target.copy()
    output[mask] = _noisy(target, 30)[mask]
    assert psnr(output, target, mask) < psnr(output, target) < MAX_PSNR
    # The error lives on 1/80 of the pixels: the whole-image mean dilutes it 80 times.
    assert psnr(output, target) - psnr(output, target, mask) == pytest.approx(10 * math.log10(80), abs=1e-9)


def test_empty_mask_raises(lpips_metric):
    image, empty = _image((32, 32)), np.zeros((32, 32), dtype=bool)
    with pytest.raises(ValueError, match="empty mask"):
        psnr(image, image, empty)
    with pytest.raises(ValueError, match="empty mask"):
        ssim(image, image, empty)
    with pytest.raises(ValueError, match="empty mask"):
        lpips_metric([image], [image], [empty])


def test_mismatched_or_non_uint8_images_raise():
    image = _image((32, 32))
    with pytest.raises(ValueError, match="one size"):
        psnr(image, image[:16])
    with pytest.raises(ValueError, match="uint8"):
        ssim(image / 255.0, image / 255.0)


def test_lpips_grows_with_noise_and_is_symmetric(lpips_metric):
    target = _image((96, 128), 0, 255)
    slight, strong = _noisy(target, 5), _noisy(target, 40)
    (d_slight, d_strong, d_reverse), _ = lpips_metric([slight, strong, target], [target, target, strong])
    assert 0 < d_slight < d_strong
    assert d_reverse == pytest.approx(d_strong, rel=1e-5)


def test_lpips_takes_pairs_of_different_sizes_in_one_call(lpips_metric):
    targets = [_image((64, 80), seed=2), _image((48, 48), seed=3), _image((64, 80), seed=4)]
    outputs = [_noisy(target, 20) for target in targets]
    masks = [_corner_mask(target.shape[:2], 16) for target in targets]
    whole, masked = lpips_metric(outputs, targets, masks)
    for output, target, mask, distance, masked_distance in zip(outputs, targets, masks, whole, masked, strict=True):
        alone, alone_masked = lpips_metric([output], [target], [mask])
        assert distance == pytest.approx(alone[0], rel=1e-5)
        assert masked_distance == pytest.approx(alone_masked[0], rel=1e-5)
    unmasked, same = lpips_metric(outputs, targets)
    assert unmasked == same == pytest.approx(whole, rel=1e-5)


def test_lpips_whole_distance_is_the_package_forward(lpips_metric):
    target = _image((64, 96), 0, 255)
    output = _noisy(target, 25)
    (distance,), _ = lpips_metric([output], [target])

    def tensor(image):
        return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1

    with torch.inference_mode():
        expected = lpips_metric.model(tensor(output), tensor(target)).item()
    assert distance == pytest.approx(expected, rel=1e-5)


def test_lpips_loads_a_cached_backbone_without_network(torch_home):
    checkpoint = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert alexnet_checkpoint() == checkpoint
    checkpoint.parent.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # unlike LPIPS_SEED, so a silently untrained backbone would not match
        saved = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(saved, checkpoint)
    metric = LPIPS()
    assert metric.pretrained_backbone
    loaded = {name: param for part in metric.model.net.children() for name, param in part.state_dict().items()}
    features = {key.removeprefix("features."): value for key, value in saved.items() if key.startswith("features.")}
    assert loaded.keys() == features.keys()
    assert all(torch.equal(loaded[name], features[name]) for name in features)


def test_lpips_without_a_cached_backbone_is_seeded_and_warns_once(torch_home):
    # A handler on the emitting logger itself sees each record once, whatever earlier tests did to the
    # propagation and handlers of its parents (configure_logging, caplog).
    logger, records = logging.getLogger("casalimpia.metrics"), logging.handlers.BufferingHandler(capacity=100)
    records.setLevel(logging.WARNING)
    logger.addHandler(records)
    try:
        first = LPIPS()
    finally:
        logger.removeHandler(records)
    warnings = records.buffer
    assert not first.pretrained_backbone
    assert len(warnings) == 1
    assert "not with published LPIPS" in warnings[0].getMessage()
    assert "TORCH_HOME/hub/checkpoints" in warnings[0].getMessage()
    second = LPIPS()
    for a, b in zip(first.model.net.parameters(), second.model.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_score_means_over_the_set(lpips_metric):
    targets = [_image((64, 64), seed=5), _image((48, 72), seed=6)]
    outputs = [_noisy(targets[0], 10), targets[1] + np.uint8(10)]
    masks = [_corner_mask((64, 64), 16), _corner_mask((48, 72), 24)]
    result = score(outputs, targets, masks, lpips_metric)
    assert set(result) == {"psnr", "psnr_mask", "ssim", "ssim_mask", "lpips", "lpips_mask"}
    pairs = list(zip(outputs, targets, masks, strict=True))
    assert result["psnr"] == pytest.approx(np.mean([psnr(o, t) for o, t, _ in pairs]))
    assert result["psnr_mask"] == pytest.approx(np.mean([psnr(o, t, m) for o, t, m in pairs]))
    assert result["ssim"] == pytest.approx(np.mean([ssim(o, t) for o, t, _ in pairs]))
    assert result["ssim_mask"] == pytest.approx(np.mean([ssim(o, t, m) for o, t, m in pairs]))
    whole, masked = lpips_metric(outputs, targets, masks)
    assert result["lpips"] == pytest.approx(np.mean(whole))
    assert result["lpips_mask"] == pytest.approx(np.mean(masked))
    assert set(score(outputs, targets, None, None)) == {"psnr", "psnr_mask", "ssim", "ssim_mask"}
