"""Cost estimates from measured painting rates, and the job's --dry-run that prints them."""

import shutil
from pathlib import Path

from casalimpia.config import InpaintConfig
from casalimpia.estimate import RATES, PaintingRate, append_rate, estimate_lines, read_rates

ROOT = Path(__file__).resolve().parents[1]
H100 = PaintingRate(
    date="2026-12-01",
    device="NVIDIA H100 80GB HBM3",
    model="stabilityai/stable-diffusion-2-inpainting",
    resolution=512,
    steps=25,
    guided=True,
    images_per_second=2.0,
    devices=1,
    price_per_hour=3.0,
)


def test_an_estimate_uses_only_rates_measured_with_the_same_painting_settings(tmp_path):
    rates_file = tmp_path / "rates.yaml"
    append_rate(rates_file, H100)
    append_rate(rates_file, PaintingRate(**{**H100.__dict__, "steps": 50, "images_per_second": 1.0}))
    rates = read_rates(rates_file)
    assert rates[0] == H100 and len(rates) == 2

    inpaint = InpaintConfig(model=H100.model, resolution=512, steps=25, guidance_scale=7.5, lora="s3://m/lora")
    [line] = estimate_lines(inpaint, 72_000, rates)
    # 72,000 photos at 2 per second: 10 hours of one H100, $30 at $3 an hour.
    assert "NVIDIA H100 80GB HBM3" in line and "10h 00m" in line and "10.00 device-hours" in line and "$30.00" in line

    unguided = InpaintConfig(model=H100.model, resolution=512, steps=25, guidance_scale=1.0)
    [missing] = estimate_lines(unguided, 10, rates)
    assert missing.startswith("estimate: no measured rate") and "guidance off" in missing and "jobs/bench.py" in missing


def test_the_shipped_rates_file_reads():
    assert all(rate.images_per_second > 0 and rate.devices >= 1 for rate in read_rates(RATES))


def test_dry_run_prints_the_plan_and_the_estimate_and_writes_nothing(load_job, tmp_path, capsys, monkeypatch):
    photos = tmp_path / "in"
    shutil.copytree(ROOT / "casalimpia/data/demo_rooms/living", photos / "living")
    (photos / "notes.txt").write_text("not a photo")
    (photos / "_drafts").mkdir()
    (photos / "_drafts/readme.md").write_text("not a photo either")
    out = tmp_path / "out"
    monkeypatch.chdir(ROOT)
    arguments = ["--config", "configs/demo.yaml", "--input", str(photos), "--output", str(out), "--dry-run"]
    assert load_job("defurnish").main(arguments) == 0
    printed = capsys.readouterr().out
    assert "2 photos to process, 0 done before, 2 refused" in printed
    assert "refused: 2 unsupported file type" in printed
    assert "estimate on " in printed and "photos take" in printed, "the shipped rate for the demo's settings"
    assert "dry run: nothing started, nothing written" in printed
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
