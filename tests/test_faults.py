"""The bulk job under injected faults: each run ends with every input accounted for exactly once and
with the same outputs as a run without faults.

The faults are real: an actor process that exits mid-batch, S3 requests answered with errors over
HTTP, a driver killed with SIGKILL. Only ``CASALIMPIA_FAULTS`` (see casalimpia.faults) and the
test S3 endpoint's failure switch turn them on.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from casalimpia import faults, storage
from casalimpia.config import load_config
from casalimpia.pipeline import execute, prepare, read_manifest
from casalimpia.synthetic import write_demo_rooms, write_room_pairs

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 8
BAD = {"broken/empty.jpg": b"", "broken/text.jpg": b"<html>not a photo</html>", "broken/notes.txt": b"hello"}
# The demo's mechanics with the fast random models: no LoRA, no quality gate.
TINY = ["masking.model=tiny", "inpaint.model=tiny", "inpaint.lora=null", "qa.max_residual=null"]


def write_catalogue(uri: str, staging: Path) -> list[str]:
    """Eight good photos in nested folders and three bad files under uri; returns every relative path."""
    for path in write_demo_rooms(staging, count=PHOTOS, seed=11):
        storage.write_bytes(storage.join(uri, path.relative_to(staging).as_posix()), path.read_bytes())
    for relative, data in BAD.items():
        storage.write_bytes(storage.join(uri, relative), data)
    return storage.list_files(uri)


def job_config(input_uri: str, output_uri: str, *extra: str):
    return load_config(ROOT / "configs/demo.yaml", [*TINY, *extra], values={"input": input_uri, "output": output_uri})


def outputs(output_uri: str) -> dict[str, bytes]:
    """Every written file under images/ and masks/, by relative path."""
    return {
        f"{folder}/{path}": storage.read_bytes(storage.join(output_uri, folder, path))
        for folder in ("images", "masks")
        for path in storage.list_files(storage.join(output_uri, folder))
    }


def check_accounted(output_uri: str, inputs: list[str]) -> dict[str, dict]:
    """Every input has exactly one manifest row, the good photos ok or skipped, the bad ones failed."""
    rows = read_manifest(output_uri)
    sources = [row["source"] for row in rows]
    assert sorted(sources) == sorted(inputs), "every input has exactly one manifest row"
    folder = storage.join(output_uri, "_manifest")
    every_row = [row for part in storage.list_files(folder) for row in storage.read_rows(storage.join(folder, part))]
    assert len(every_row) == len(inputs), "no source is left in two manifest parts"
    by_source = {row["source"]: row for row in rows}
    assert all(by_source[source]["status"] == "failed" for source in BAD)
    assert all(row["status"] in ("ok", "skipped") for source, row in by_source.items() if source not in BAD)
    return by_source


@pytest.fixture(scope="module")
def fault_free(ray_local, tmp_path_factory):
    """The catalogue, and the outputs of a run without faults."""
    root = tmp_path_factory.mktemp("fault_free")
    inputs = write_catalogue(str(root / "in"), root / "staging")
    summary = execute(prepare(job_config(str(root / "in"), str(root / "out"))))
    assert summary.counts == {"ok": PHOTOS, "failed": len(BAD)}
    return root / "in", inputs, outputs(str(root / "out"))


def test_fault_names_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.FAULTS_ENV, f"inpainter={tmp_path / 'a'}, train_worker={tmp_path / 'b'}")
    assert faults.armed("inpainter") == str(tmp_path / "a")
    assert faults.armed("train_worker") == str(tmp_path / "b")
    monkeypatch.setenv(faults.FAULTS_ENV, "inpainters=/tmp/x")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        faults.armed("inpainter")
    monkeypatch.setenv(faults.FAULTS_ENV, "inpainter_oom=a.jpg")
    with pytest.raises(ValueError, match="inpainter_oom=N or inpainter_oom=N:PHOTO"):
        faults.armed("inpainter_oom")
    monkeypatch.delenv(faults.FAULTS_ENV)
    assert faults.armed("inpainter") is None
    # Unarmed, and armed but already fired: nothing happens.
    faults.die_once(None, "test")
    (tmp_path / "fired").touch()
    faults.die_once(str(tmp_path / "fired"), "test")


def test_inpainting_actor_that_dies_is_replaced_and_its_batch_redone(fault_free, tmp_path, monkeypatch):
    input_dir, inputs, expected = fault_free
    marker = tmp_path / "inpainter-died"
    monkeypatch.setenv(faults.FAULTS_ENV, f"inpainter={marker}")
    summary = execute(prepare(job_config(str(input_dir), str(tmp_path / "out"))))
    assert marker.exists(), "an inpainting actor died"
    print(f"inpainting actor killed on its first batch: {summary.line()}")
    assert summary.counts == {"ok": PHOTOS, "failed": len(BAD)}
    check_accounted(str(tmp_path / "out"), inputs)
    assert outputs(str(tmp_path / "out")) == expected


def test_out_of_memory_costs_only_the_photo_that_runs_out_alone(ray_local, tmp_path, monkeypatch):
    # Two synthetic rooms with their exact masks, so that both are painted, in one batch.
    write_room_pairs(tmp_path / "rooms", count=2, seed=0)
    photos, out = str(tmp_path / "rooms" / "furnished"), str(tmp_path / "out")
    # The painting model runs out of memory on two photos at once, and on room_001 even alone.
    monkeypatch.setenv(faults.FAULTS_ENV, "inpainter_oom=1:room_001.png")
    masks = f"masking.masks={tmp_path / 'rooms' / 'masks'}"
    summary = execute(prepare(job_config(photos, out, masks, "ray.inpainting_actors=1")))
    print(f"out of memory on two photos at once and on room_001.png alone: {summary.line()}")
    assert summary.counts == {"ok": 1, "failed": 1}
    painted, doomed = (row for row in sorted(read_manifest(out), key=lambda row: row["source"]))
    assert (painted["source"], painted["status"], painted["output"]) == ("room_000.png", "ok", "images/room_000.png")
    error = f"inpainting failed: injected fault: out of memory on 1 photo(s) ({faults.FAULTS_ENV})"
    assert (doomed["source"], doomed["status"], doomed["error"], doomed["output"]) == (
        "room_001.png",
        "failed",
        error,
        "",
    )
    assert storage.list_files(str(tmp_path / "out" / "images")) == ["room_000.png"]


def test_flaky_s3_endpoint_is_retried_until_every_photo_is_written(fault_free, s3_faults, s3_bucket):
    input_dir, inputs, expected = fault_free
    input_uri, output_uri = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/empty"
    for relative in inputs:
        storage.write_bytes(storage.join(input_uri, relative), (input_dir / relative).read_bytes())
    # One request in five, from the driver and every Ray worker, answered with 503 SlowDown or 500.
    s3_faults.fail(0.2, seed=5)
    summary = execute(prepare(job_config(input_uri, output_uri)))
    s3_faults.off()
    print(f"S3 failed {s3_faults.failures} of {s3_faults.requests} requests: {summary.line()}")
    assert s3_faults.failures > 0
    assert summary.counts == {"ok": PHOTOS, "failed": len(BAD)}
    check_accounted(output_uri, inputs)
    assert outputs(output_uri) == expected


def stop_mid_run(arguments: list[str], signal_number: int) -> tuple[int, str]:
    """Run the job as a subprocess on the session's cluster, with slow painting; send it the signal once
    its progress line says photos are done (give it a short progress_every). Returns its exit code and
    what it logged."""
    import ray

    driver = subprocess.Popen(
        [sys.executable, "jobs/defurnish.py", *arguments, f"--set=ray.address={ray.get_runtime_context().gcs_address}"],
        cwd=ROOT,
        env={**os.environ, faults.FAULTS_ENV: "inpainter_slow=1.5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    working = threading.Event()

    def read() -> None:
        for line in driver.stdout:
            lines.append(line)
            if re.search(r"progress: [1-9][\d,]*/", line):
                working.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert working.wait(timeout=240), "".join(lines)[-3000:]
    driver.send_signal(signal_number)
    driver.wait(timeout=120)
    reader.join(timeout=30)
    return driver.returncode, "".join(lines)


def test_ctrl_c_then_a_killed_driver_then_the_same_command_finishes_the_catalogue(
    fault_free, load_job, tmp_path, capsys, monkeypatch
):
    """Three runs of one command: Ctrl-C mid-run, a driver killed mid-run, then one that finishes.

    Ctrl-C (SIGTERM takes the same path: tests/test_progress.py) persists every row the driver has
    received, here with no manifest part written before it; a driver killed without cleanup loses
    at most the rows since its last part; each rerun skips what was persisted, and the last one
    ends with every input accounted for once and the outputs of a run without faults.
    """
    import ray

    input_dir, inputs, expected = fault_free
    out = tmp_path / "out"
    arguments = ["--config", "configs/demo.yaml", "--input", str(input_dir), "--output", str(out)]
    arguments += ["--set=inpaint.batch_size=1", *(f"--set={item}" for item in TINY)]

    code, log = stop_mid_run([*arguments, "--set=progress_every=0.5"], signal.SIGINT)

    assert code == 130, log[-3000:]
    assert "interrupted: stopped by SIGINT" in log and "run the same command again to resume" in log
    assert re.search(r"progress: \d+/\d+ photos \(\d+%\) at [\d.]+ images/s, ETA ", log)
    after_ctrl_c = {row["source"]: row for row in persisted_rows(out)}
    done = [source for source, row in after_ctrl_c.items() if row["status"] == "ok"]
    assert "broken/notes.txt" in after_ctrl_c and 0 < len(done) < PHOTOS, sorted(after_ctrl_c)
    assert all((out / after_ctrl_c[source]["output"]).exists() for source in done)

    # A driver process on the session's cluster, which outlives it as a real cluster would. It dies
    # (os._exit: no cleanup) right after persisting its first processed rows, while the rest of its
    # photos are still in flight; waiting for that from here would race a fast run.
    marker = tmp_path / "driver-died"
    cluster = f"--set=ray.address={ray.get_runtime_context().gcs_address}"
    driver = subprocess.run(
        [sys.executable, "jobs/defurnish.py", *arguments, "--set=manifest_every=2", cluster],
        cwd=ROOT,
        env={**os.environ, faults.FAULTS_ENV: f"driver={marker}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert marker.exists() and driver.returncode == 1, driver.stdout[-2000:] + driver.stderr[-3000:]
    after_kill = {row["source"] for row in persisted_rows(out)}
    assert after_kill >= after_ctrl_c.keys(), "a killed run keeps the parts of earlier runs"

    monkeypatch.chdir(ROOT)
    assert load_job("defurnish").main(arguments) == 0
    rerun = capsys.readouterr().out.splitlines()[-2]
    print(f"{len(done)} photos persisted by Ctrl-C, {len(after_kill)} rows after the kill; rerun: {rerun}")
    rows = check_accounted(str(out), inputs)
    assert all(rows[source]["status"] == "skipped" for source in done), "not redone"
    assert outputs(str(out)) == expected


def persisted_rows(output: Path) -> list[dict]:
    folder = output / "_manifest"
    parts = sorted(folder.glob("*.parquet")) if folder.exists() else []
    return [row for part in parts for row in storage.read_rows(str(part))]


def test_two_nodes_then_one_is_lost_mid_run(fault_free, tmp_path):
    import ray
    from ray.util.state import list_tasks

    input_dir, inputs, expected = fault_free
    out = tmp_path / "out"
    node_id, kill_node = join_worker_node(cpus=2)
    written_when_lost: list[int] = []

    def written() -> int:
        return len(storage.list_files(str(out / "images"))) if (out / "images").exists() else 0

    def lose_node_once_it_has_worked() -> None:
        # Mid-run: photos are being written and the second node has run part of the job (on a loaded
        # machine the scheduler may keep the first photos on the head node).
        while not (written() and list_tasks(filters=[("node_id", "=", node_id)], limit=1)):
            time.sleep(0.2)
        written_when_lost.append(written())
        kill_node()

    killer = threading.Thread(target=lose_node_once_it_has_worked, daemon=True)
    try:
        killer.start()
        summary = execute(prepare(job_config(str(input_dir), str(out))))
        killer.join(timeout=60)
    finally:
        kill_node()
    assert written_when_lost and written_when_lost[0] < PHOTOS, "the node was lost while photos remained to do"
    # The cluster marks the node dead once its health checks fail.
    deadline = time.monotonic() + 120
    while any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())
    # Tasks keep the node they ran on; an actor reports the node it was restarted on.
    ran_there = Counter(task.name for task in list_tasks(filters=[("node_id", "=", node_id)], limit=10_000))
    assert ran_there, "the job used the second node"
    lost_after = f"the second lost after {written_when_lost[0]} photos"
    print(f"two nodes, {lost_after}: {summary.line()}; it ran {dict(ran_there)}")
    assert summary.counts == {"ok": PHOTOS, "failed": len(BAD)}
    check_accounted(str(out), inputs)
    assert outputs(str(out)) == expected


def join_worker_node(cpus: float):
    """Start a second node in the session's Ray cluster with ``ray start``; returns its id and a killer.

    The killer SIGKILLs the node's raylet, the processes under it and its log monitor at once, as a
    pre-empted machine would vanish; calling it again does nothing.
    """
    import ray

    before = {process.pid for process in psutil.process_iter()}
    port = free_port()
    # `ray start` records the cluster's address for later `ray.init()` calls on this machine; a
    # record left after the session would send them to a cluster that is gone.
    address_file = Path(ray.get_runtime_context().get_temp_dir()) / "ray_current_cluster"
    recorded = address_file.read_text() if address_file.exists() else None
    subprocess.run(
        [
            "ray",
            "start",
            f"--address={ray.get_runtime_context().gcs_address}",
            f"--num-cpus={cpus}",
            f"--node-manager-port={port}",
            # The session's own node holds the default agent and metrics ports.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    if recorded is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(recorded)
    started = [process for process in psutil.process_iter(["cmdline", "ppid"]) if process.pid not in before]
    raylet = next(p for p in started if f"--node_manager_port={port}" in " ".join(p.info["cmdline"] or []))
    # `ray start` exits once the node is up, leaving the raylet and a log monitor to init.
    log_monitors = [p for p in started if p.info["ppid"] == 1 and "log_monitor" in " ".join(p.info["cmdline"] or [])]
    node_id = next(node["NodeID"] for node in ray.nodes() if node["NodeManagerPort"] == port)

    def kill() -> None:
        try:
            processes = [raylet, *raylet.children(recursive=True), *log_monitors]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    return node_id, kill


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
