"""The job entrypoints as users run them: the README's commands, --help and fail-fast errors."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from casalimpia.evaluation import closer_to_empty
from casalimpia.images import decode_image, decode_mask
from casalimpia.synthetic import demo_room, demo_room_path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "README Quickstart has a bash block"
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2, "the Quickstart is exactly two commands"
    return commands


def run(command: str | list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    shell = isinstance(command, str)
    return subprocess.run(
        command,
        shell=shell,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        executable="/bin/bash" if shell else None,
    )


def test_ci_runs_the_readme_test_command():
    test_command = quickstart_commands()[1]
    assert "pytest" in test_command
    assert test_command in ROOT.joinpath(".ci/run").read_text()


def test_readme_demo_command_as_written(ray_local, load_job, capsys, monkeypatch):
    demo = quickstart_commands()[0]
    # The install half is what .ci/run has just done; run the job half exactly as written.
    job = demo.split("&&")[-1].strip()
    assert job.startswith("python jobs/defurnish.py")
    shutil.rmtree(ROOT / "outputs" / "demo", ignore_errors=True)
    result = run(job)
    assert result.returncode == 0, result.stderr[-3000:]
    out = ROOT / "outputs" / "demo"
    for name in ("images", "masks", "_manifest", "config.yaml", "report.html"):
        assert (out / name).exists(), name
    rows = {row["source"]: row for row in pq.read_table(out / "_manifest").to_pylist()}
    assert len(rows) == 8 and {row["status"] for row in rows.values()} <= {"ok", "review"}
    assert "toy models trained on synthetic rooms" in (out / "report.html").read_text()

    # The furniture leaves: each photo's output inside its mask against the room the photo was
    # rendered from, with and without its furniture.
    emptied = []
    for index in range(8):
        row, room = rows[demo_room_path(index)], demo_room(index)
        output = decode_image((out / row["output"]).read_bytes(), max_pixels=10**8, min_side=8)
        mask = decode_mask((out / row["mask"]).read_bytes(), size=output.shape[1::-1])
        painted = mask & room.mask
        if row["mask_fraction"] > 0.01 and painted.any():
            emptied.append(closer_to_empty(output, room.empty, room.furnished, painted) == 1.0)
    assert len(emptied) >= 6 and sum(emptied) >= 6, emptied

    # The rerun in this process, on the session's Ray instance: the same arguments.
    monkeypatch.chdir(ROOT)
    assert load_job("defurnish").main(job.split()[2:]) == 0
    assert "done: ok=0 failed=0 skipped=8" in capsys.readouterr().out


def test_help_lists_the_options():
    result = run([sys.executable, "jobs/defurnish.py", "--help"], timeout=120)
    assert result.returncode == 0
    for option in ("--config", "--input", "--output", "--set", "--overwrite"):
        assert option in result.stdout


def test_wrong_key_and_unreachable_input_fail_in_one_line_before_ray(tmp_path, s3_server):
    cases = {
        "--set inpaint.stepz=3": "error: inpaint.stepz: unknown key",
        f"--input {tmp_path}/missing": "error: input: cannot list",
        "--input s3://no-such-bucket-casalimpia/raw": "error: input: cannot list s3://no-such-bucket-casalimpia",
    }
    for arguments, message in cases.items():
        result = run(
            f"{sys.executable} jobs/defurnish.py --config configs/demo.yaml {arguments} --set ray.address=127.0.0.1:1",
            timeout=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(message), lines
        assert "Ray" not in result.stderr
