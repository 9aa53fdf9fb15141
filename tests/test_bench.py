"""The benchmark in quick mode, as CI runs it: every field of its record is there; no speed is asserted."""

import json
from pathlib import Path

import pytest

from casalimpia.bench import RECORD_FIELDS, steady_rate
from casalimpia.estimate import read_rates

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_a_complete_record_and_appends_its_row(
    ray_local, load_job, tmp_path, capsys, monkeypatch
):
    record_file = tmp_path / "BENCHMARKS.md"
    record_file.write_text("# Benchmarks\n\nNotes above the table stay.\n\n## Runs\n\n")
    monkeypatch.chdir(ROOT)
    arguments = ["--config", "configs/bench_demo.yaml", "--quick", "--output", str(tmp_path / "bench")]
    rates_file = tmp_path / "rates.yaml"
    settings = ["--set", f"record={record_file}", "--set", "variants=[channels_last]", "--set", f"rates={rates_file}"]
    assert load_job("bench").main([*arguments, *settings]) == 0
    printed = capsys.readouterr().out
    assert "stage alone:" in printed and "naive baseline:" in printed and "stage with channels_last:" in printed

    assert (tmp_path / "bench" / "config.yaml").exists()
    [path] = (tmp_path / "bench").glob("bench-*.json")
    record = json.loads(path.read_text())
    assert set(RECORD_FIELDS) <= record.keys()
    assert {"name", "type", "dtype", "memory_gb"} <= record["device"].keys()
    assert {"python", "torch", "diffusers", "ray", "casalimpia"} <= record["versions"].keys()
    job = record["job"]
    assert job["photos"] == job["ok"] == job["painted"] == 8, "quick mode paints two batches of four"
    # Two batches are too few to tell a rate once started: those figures may be missing, never wrong.
    assert {"seconds", "images_per_second", "steady_images_per_second", "efficiency"} <= job.keys()
    stage = record["stage"]
    assert stage["images_per_second"] > 0 and stage["unet_tflop_per_image"] > 0 and stage["warmup_seconds"] > 0
    [variant] = stage["variants"]
    assert variant["name"] == "channels_last"
    assert variant["speedup"] == pytest.approx(variant["images_per_second"] / stage["images_per_second"])
    assert variant["payback_images"] is None or variant["payback_images"] >= 0
    assert record["host"]["crop_ms_per_image"] > 0 and record["host"]["blend_ms_per_image"] > 0
    assert "masked blocks re-encoded" in printed
    write = record["write"]
    assert write["megapixels"] == 12 and 0 < write["mask_fraction"] < 1
    for kind in ("baseline", "progressive"):
        assert write[kind]["blocks_over_encode"] == pytest.approx(write[kind]["blocks_ms"] / write[kind]["encode_ms"])
    assert record["masking"]["images_per_second"] > 0
    assert record["baseline"]["images_per_second"] > 0 and "job_speedup" in record["baseline"]
    assert record["gpu"] is None and record["scaling"] == [], "CPU run: no GPU figures, no sweep in quick mode"
    assert record["settings"]["quick"] is True

    # A rate the estimate can use is appended when the job had one once started (two batches may not).
    rates = read_rates(rates_file)
    if job["steady_images_per_second"]:
        [rate] = rates
        assert (rate.model, rate.resolution, rate.steps, rate.guided) == ("tiny", 64, 2, True)
        assert rate.images_per_second == pytest.approx(job["steady_images_per_second"], rel=1e-3)
    else:
        assert rates == []

    lines = record_file.read_text().splitlines()
    assert "Notes above the table stay." in lines
    assert lines[-1].startswith("| ") and "tiny" in lines[-1] and "(quick)" in lines[-1]


def test_steady_rate_leaves_out_the_start_and_refuses_to_guess_from_bursts():
    # Start-up until 9 s, then a batch of four every half second: 8 photos per second once started.
    regular = [(9.0 + 0.5 * i, 4 * (i + 1)) for i in range(16)]
    assert steady_rate(regular) == pytest.approx(8.0)
    # Two arrivals, the second a burst of rows already done: no rate rather than a wrong one.
    assert steady_rate([(10.0, 4), (10.01, 8)]) is None
    assert steady_rate([]) is None
