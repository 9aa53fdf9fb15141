"""The evaluation job: its scoring pieces on constructed arrays, fail-fast checks, and a run end to end."""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from casalimpia.config import EvalDataConfig, EvaluateConfig, MaskingConfig, SetupConfig, load_config
from casalimpia.evaluation import (
    QUALITY,
    SUMMARY_COLUMNS,
    Scorer,
    SetupPainter,
    cost_per_1000,
    outside_changed,
    prepare,
    summarize,
)
from casalimpia.pipeline import JobError
from casalimpia.synthetic import HELD_OUT_SEED, render_room, write_room_pairs

ROOT = Path(__file__).resolve().parents[1]
TOY_MASKING = MaskingConfig(model="toy", resolution=64)


def _objects(items):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def test_outside_changed_counts_only_pixels_outside_the_mask():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:3] = True
    output = image.copy()
    output[mask] = 255
    assert outside_changed(output, image, mask) == 0.0
    output[0, 0, 1] = 1  # one channel of one of the 16 pixels outside
    assert outside_changed(output, image, mask) == 1 / 16
    assert outside_changed(output, image, np.ones((4, 5), dtype=bool)) == 0.0


def test_summary_times_after_warmup_and_prices_actor_time():
    config = EvaluateConfig(output="out", price_per_hour=2.0, data=EvalDataConfig(pairs="pairs"))
    rows = [
        {
            "setup": "base",
            **dict.fromkeys(QUALITY, 1.0),
            "outside_changed": 0.0,
            "residual_furniture": residual,
            "target_furniture": 0.0,
            "closer_to_empty": closer,
            "flagged": flagged,
            "mask_recall": recall,
            "mask_ratio": 1.5,
            "structure_removed": 0.01,
            "seconds": seconds,
            "warmup": warmup,
            "peak_memory_gb": math.nan,
        }
        for seconds, warmup, residual, closer, flagged, recall in (
            (9.0, True, 0.1, 1.0, 0.0, 0.9),
            (3.6, False, 0.3, 0.0, 1.0, 0.5),
            (3.6, False, 0.2, 0.0, 0.0, 0.8),
            # A room: nothing was there to find, so no closer_to_empty and no mask scores.
            (3.6, False, 0.2, math.nan, 0.0, math.nan),
        )
    ]
    (summary,) = summarize(rows, config)
    assert list(summary) == list(SUMMARY_COLUMNS)
    assert summary["images"] == 4 and summary["seconds_per_image"] == 3.6
    assert summary["residual_furniture"] == pytest.approx(0.2)
    # Means and medians over the pairs that measured them; caught: flagged among those painted back.
    assert summary["closer_to_empty"] == pytest.approx(1 / 3) and summary["caught"] == pytest.approx(0.5)
    assert summary["flagged"] == pytest.approx(0.25) and summary["mask_recall"] == pytest.approx(0.8)
    # 3.6 s an image is 1,000 actor-hours per million, i.e. 1 hour per 1,000 images at 2.0 an hour.
    assert summary["cost_per_1000"] == pytest.approx(2.0) == cost_per_1000(3.6, 2.0)
    assert math.isnan(summary["peak_memory_gb"])


@pytest.mark.parametrize("method", ["telea", "navier-stokes"])
def test_opencv_painter_keeps_every_pixel_outside_the_mask(method):
    room = render_room(3, 96, 72)
    painter = SetupPainter(SetupConfig(method=method, radius=3))
    batch = {"source": np.array(["pairs/a.png"], dtype=object), "image": _objects([room.furnished])}
    batch["mask"] = batch["found_mask"] = _objects([room.mask])
    first, second = painter(batch), painter(batch)
    output = first["output"][0]
    assert output.dtype == np.uint8 and output.shape == room.furnished.shape
    assert np.array_equal(output[~room.mask], room.furnished[~room.mask])
    assert not np.array_equal(output[room.mask], room.furnished[room.mask])
    assert first["painted_mask"][0] is room.mask
    assert first["warmup"].tolist() == [True] and second["warmup"].tolist() == [False]
    assert first["seconds"][0] > 0 and math.isnan(first["peak_memory_gb"][0])


def test_scores_of_the_empty_room_and_of_the_furniture_pasted_back():
    scorer = Scorer(TOY_MASKING, max_residual=0.1)
    room = render_room(HELD_OUT_SEED, 96, 72)
    (in_empty,) = scorer.masker.furniture([room.empty])
    # A synthetic pair: the furnished photo is the input, the empty room the target.
    batch = {
        "source": np.array(["pairs/clean.png", "pairs/pasted.png"], dtype=object),
        "kind": np.array(["pair", "pair"], dtype=object),
        "image": _objects([room.furnished, room.furnished]),
        "target": _objects([room.empty, room.empty]),
        "mask": _objects([room.mask, room.mask]),
        "painted_mask": _objects([room.mask, room.mask]),
        "target_furniture": _objects([in_empty, in_empty]),
        # Painted to the truth, and the furniture pasted back (the furnished photo itself).
        "output": _objects([room.empty, room.furnished]),
        "seconds": np.array([0.5, 0.5]),
        "warmup": np.array([False, False]),
        "peak_memory_gb": np.array([math.nan, math.nan]),
    }
    scores = scorer(batch)
    clean, pasted = scores["residual_furniture"]
    assert clean == 0.0 and pasted > 0.5
    assert scores["psnr_mask"][0] == 100.0 and scores["psnr_mask"][1] < 100.0
    assert scores["target_furniture"][0] < 0.05
    assert scores["closer_to_empty"].tolist() == [1.0, 0.0]
    assert scores["flagged"].tolist() == [0.0, 1.0]
    # The painted mask is the exact one: all the furniture, no structure.
    assert scores["mask_recall"].tolist() == [1.0, 1.0] and scores["mask_ratio"].tolist() == [1.0, 1.0]
    assert scores["structure_removed"].tolist() == [0.0, 0.0]
    assert "output" not in scores and scores["preview"].tolist() == [b"", b""]


def test_prepare_fails_fast_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rooms = tmp_path / "rooms"
    rooms.mkdir()
    # room_000.png falls in the training split (see the hash split in casalimpia.training.data).
    shutil.copy(ROOT / "casalimpia/data/empty_rooms/room_000.png", rooms)
    write_room_pairs(tmp_path / "pairs", count=1, seed=300)
    (tmp_path / "pairs/masks/room_000.png.png").unlink()

    def config(*overrides):
        return load_config(
            ROOT / "configs/evaluate_demo.yaml", [f"output={tmp_path / 'out'}", *overrides], EvaluateConfig
        )

    cases = {
        f"data.rooms={rooms}": r"^data\.subset: none of the 1 rooms",
        f"data.pairs={tmp_path / 'pairs'}": r"^data\.pairs: no photo under",
        "setups.base.inpaint.lora=/nonexistent/lora": r"^setups\.base\.inpaint\.lora: ",
        "setups.base.inpaint.model=./models/missing": r"^setups\.base\.inpaint\.model: ",
    }
    for override, message in cases.items():
        with pytest.raises(JobError, match=message):
            prepare(config(override, "data.subset=test"))


def test_evaluation_job_with_two_setups_end_to_end(ray_local, load_job, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    job = load_job("evaluate")
    output = tmp_path / "evaluation"
    overrides = ["data.limit=2", "report_examples=2", "setups={base: {}, telea: {method: telea}}"]
    code = job.main(
        ["--config", "configs/evaluate_demo.yaml", "--output", str(output)]
        + [argument for override in overrides for argument in ("--set", override)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "| setup |" in printed and "report.html" in printed

    summary = pq.read_table(output / "summary.parquet").to_pylist()
    assert [row["setup"] for row in summary] == ["base", "telea"]
    assert all(list(row) == list(SUMMARY_COLUMNS) for row in summary)
    assert all(row["images"] == 4 and row["outside_changed_max"] == 0.0 for row in summary)

    scores = pq.read_table(output / "scores.parquet").to_pylist()
    assert len(scores) == 4 * 2  # 2 rooms and 2 pairs, by 2 set-ups
    assert {row["kind"] for row in scores} == {"room", "pair"}
    assert all(row["outside_changed"] == 0.0 for row in scores)
    assert all(math.isfinite(row[name]) for row in scores for name in ("psnr_mask", "ssim_mask", "lpips_mask"))

    report = (output / "report.html").read_text()
    assert "base" in report and "telea" in report and report.count("<svg") >= 4
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report)
    assert "<script" not in report
    assert (output / "summary.md").read_text().startswith("| setup |")
    assert "setups:" in (output / "config.yaml").read_text()
