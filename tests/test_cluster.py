"""Static checks of the cluster files in cluster/: they parse, fit together, run real jobs and hold no secrets.

No Ray, no network, no kubectl: the YAML is read as data, and the jobs' command lines are parsed by the
jobs' own argument parsers and config loader (stopped before anything runs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_FILES = sorted(CLUSTER.glob("*.yaml"))
RAYJOB_FILES = sorted(CLUSTER.glob("rayjob-*.yaml"))
IMAGE_GPU = "rayproject/ray:2.60.0-py311-gpu"
# EC2 instance types whose GPUs are A100s.
A100_INSTANCE_TYPES = {"p4d.24xlarge", "p4de.24xlarge"}
# An environment variable that holds a secret: *_KEY, *_KEY_ID, *_SECRET_*, *_TOKEN, *_PASSWORD, ...
SECRET_NAME = re.compile(r"(?:^|_)(?:KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)(?:_|$)")


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def only(path: Path, kind: str) -> dict[str, Any]:
    found = [doc for doc in documents(path) if isinstance(doc, dict) and doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def raycluster() -> dict[str, Any]:
    return only(CLUSTER / "raycluster.yaml", "RayCluster")


def pod_templates(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def ray_container(pod: dict[str, Any]) -> dict[str, Any]:
    # KubeRay runs Ray in the first container of each pod.
    return pod["containers"][0]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def a100_group() -> dict[str, Any]:
    groups = {group["groupName"]: group for group in raycluster()["spec"]["workerGroupSpecs"]}
    assert "a100" in groups, f"worker groups: {sorted(groups)}"
    return groups["a100"]


# --- every file ------------------------------------------------------------------------------------


def test_cluster_folder_has_the_expected_files():
    names = {path.name for path in CLUSTER_FILES}
    expected = {"raycluster.yaml", "runtime_env.yaml", "aws.yaml"}
    expected |= {f"rayjob-{job}.yaml" for job in ("defurnish", "train", "tune")}
    assert expected <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_every_yaml_parses_and_says_how_to_use_it(path: Path):
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    assert all(isinstance(doc, dict) for doc in docs)
    # A header comment that names the file's own command (kubectl apply -f cluster/x.yaml, ray up ...).
    header = "".join(line for line in path.read_text().splitlines(keepends=True)[:40] if line.startswith("#"))
    assert f"cluster/{path.name}" in header, f"{path.name}: the header comment should show how to use it"


# --- the RayCluster ---------------------------------------------------------------------------------


def test_raycluster_is_casalimpia_on_ray_2_60_with_autoscaling():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"] == "casalimpia"
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert int(options["idleTimeoutSeconds"]) > 0
    for name, pod in pod_templates(cluster):
        image = ray_container(pod)["image"]
        assert image.startswith("rayproject/ray:2.60.0-py311"), f"{name}: {image}"


def test_head_takes_no_work():
    head = raycluster()["spec"]["headGroupSpec"]
    cpus = head.get("resources", {}).get("CPU", head["rayStartParams"].get("num-cpus"))
    assert str(cpus) == "0", "tasks and actors must not land on the head"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    resources = ray_container(head["template"]["spec"])["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_a100_worker_group_scales_and_holds_gpus():
    group = a100_group()
    assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert group["maxReplicas"] >= 1
    pod = group["template"]["spec"]
    limits = ray_container(pod)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert ray_container(pod)["image"] == IMAGE_GPU
    # Scheduled on A100 nodes, past their GPU taint.
    assert "A100" in " ".join(str(value) for value in pod["nodeSelector"].values())
    assert any(toleration.get("key") == "nvidia.com/gpu" for toleration in pod["tolerations"])
    assert group["labels"]["ray.io/accelerator-type"] == "A100"


@pytest.mark.parametrize("config", ["train.yaml", "tune.yaml"])
def test_a100_group_offers_the_accelerator_the_configs_ask_for(config: str):
    # Ray Train turns ray.accelerator_type into a request for "accelerator_type:<type>"; the autoscaler can
    # only scale the group up from zero for it if the group declares that resource.
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    accelerator = data.get("train", data)["ray"]["accelerator_type"]
    assert f"accelerator_type:{accelerator}" in a100_group()["resources"]


def test_model_cache_is_mounted_on_every_pod_with_the_caches_inside():
    claim = only(CLUSTER / "model-cache-pvc.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    claim_name = claim["metadata"]["name"]
    for name, pod in pod_templates(raycluster()):
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        cache = [
            volume_name
            for volume_name, volume in volumes.items()
            if volume.get("persistentVolumeClaim", {}).get("claimName") == claim_name
        ]
        assert cache, f"{name}: no volume for the PVC {claim_name}"
        container = ray_container(pod)
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert cache[0] in mounts, f"{name}: the model cache is not mounted"
        path = mounts[cache[0]].rstrip("/") + "/"
        env = env_values(container)
        for variable in ("HF_HOME", "CASALIMPIA_CACHE"):
            assert env.get(variable, "").startswith(path), f"{name}: {variable} should point into {path}"
        # Ray's object store needs a real /dev/shm.
        shm = [key for key, volume in volumes.items() if volume.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and mounts.get(shm[0]) == "/dev/shm", f"{name}: /dev/shm is not memory-backed"


def test_pods_take_credentials_from_secrets_or_cloud_identity_only():
    for name, pod in pod_templates(raycluster()):
        assert pod.get("serviceAccountName"), f"{name}: no ServiceAccount for cloud identity"
        container = ray_container(pod)
        refs = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
        assert refs == ["casalimpia-credentials"], f"{name}: envFrom {refs}"
        for item in container.get("env", []):
            if SECRET_NAME.search(item["name"]):
                assert "secretKeyRef" in item.get("valueFrom", {}), f"{name}: {item['name']} must come from a Secret"


# --- the RayJobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=lambda path: path.name)
def test_rayjob_runs_on_the_shared_cluster(path: Path):
    job = only(path, "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}
    assert "rayClusterSpec" not in spec
    assert spec["shutdownAfterJobFinishes"] is False
    # KubeRay refuses spec.backoffLimit > 0 and SidecarMode together with clusterSelector.
    assert not spec.get("backoffLimit")
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode"}
    if spec["submissionMode"] == "K8sJobMode":
        assert spec["submitterConfig"]["backoffLimit"] >= 0
    assert int(spec["activeDeadlineSeconds"]) > 0


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=lambda path: path.name)
def test_rayjob_runtime_env_ships_the_code_and_the_dependencies(path: Path):
    runtime_env = yaml.safe_load(only(path, "RayJob")["spec"]["runtimeEnvYAML"])
    # A submitter pod has no checkout: the code must come from a remote zip.
    assert re.fullmatch(r"(s3|gs|https)://\S+\.zip", runtime_env["working_dir"])
    assert runtime_env["pip"] == pyproject_dependencies()
    assert not [name for name in runtime_env.get("env_vars", {}) if SECRET_NAME.search(name)]


class _Parsed(Exception):
    def __init__(self, config: Any) -> None:
        self.config = config


class _Refused(Exception):
    pass


def parse_job_command(argv: list[str], load_job: Callable[[str], ModuleType], monkeypatch) -> Any:
    """The config a `python jobs/<job>.py ...` command line resolves to, through the job's own main().

    main() builds its parser, parses argv and loads the config; it is stopped right there, before it
    prepares anything or connects to Ray.
    """
    assert argv[0] == "python", argv
    script = ROOT / argv[1]
    assert script.parent == ROOT / "jobs" and script.is_file(), f"no such job: {argv[1]}"
    module = load_job(script.stem)
    load = module.config_from_args

    def capture(*args: Any, **kwargs: Any) -> None:
        try:
            config = load(*args, **kwargs)
        except Exception as error:
            raise _Refused(f"{type(error).__name__}: {error}") from None
        raise _Parsed(config)

    monkeypatch.setattr(module, "config_from_args", capture)
    monkeypatch.setattr(module, "configure_logging", lambda: None)
    monkeypatch.chdir(ROOT)
    try:
        module.main(argv[2:])
    except _Parsed as parsed:
        return parsed.config
    except _Refused as refused:
        pytest.fail(f"{shlex.join(argv)}: the config does not load: {refused}")
    except SystemExit as exit:
        pytest.fail(f"{shlex.join(argv)}: the job's argument parser refused it (exit {exit.code})")
    pytest.fail(f"{shlex.join(argv)}: main() returned before loading its config")


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} should be given once: {argv}"
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=lambda path: path.name)
def test_rayjob_entrypoint_is_a_real_job_command(path: Path, load_job, monkeypatch):
    job = path.stem.removeprefix("rayjob-")
    argv = shlex.split(only(path, "RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{job}.py"]
    config_file = option(argv, "--config")
    assert config_file == f"configs/{job}.yaml" and (ROOT / config_file).is_file()
    # The nodes have no local copy of the data: input and output are object storage.
    for flag in ("--input", "--output"):
        assert option(argv, flag).startswith("s3://"), f"{path.name}: {flag} {option(argv, flag)}"
    config = parse_job_command(argv, load_job, monkeypatch)
    assert type(config).__name__.endswith("Config")


def test_defurnish_rayjob_grows_its_pools_onto_every_gpu(load_job, monkeypatch):
    argv = shlex.split(only(CLUSTER / "rayjob-defurnish.yaml", "RayJob")["spec"]["entrypoint"])
    resources = parse_job_command(argv, load_job, monkeypatch).ray
    # No ceiling but the cluster's: Ray Data asks the autoscaler for a100 pods while the pools are busy.
    assert resources.masking_actors.max is None and resources.inpainting_actors.max is None
    # Each GPU holds one painting actor and one segmenter, so the painting pool can have every GPU.
    assert resources.inpainting_gpus > 0.5 and resources.inpainting_gpus + resources.masking_gpus == 1


def commands_in_comments() -> list[tuple[str, str]]:
    """(file, command) for every `python jobs/...` command shown in the cluster files' comments."""
    found = []
    for path in CLUSTER_FILES:
        for line in path.read_text().splitlines():
            match = re.match(r"\s*#.*?\b(python jobs/\S+\.py\b.*)$", line)
            if match:
                found.append((path.name, match.group(1).rstrip(" \\")))
    return found


@pytest.mark.parametrize(("name", "command"), commands_in_comments())
def test_commands_shown_in_comments_parse(name: str, command: str, load_job, monkeypatch):
    parse_job_command(shlex.split(command), load_job, monkeypatch)


# --- the runtime environment ------------------------------------------------------------------------


def test_runtime_env_matches_pyproject_and_ships_the_checkout():
    runtime_env = documents(CLUSTER / "runtime_env.yaml")[0]
    assert runtime_env["working_dir"] == "."
    assert runtime_env["pip"] == pyproject_dependencies()
    excludes = runtime_env["excludes"]
    for generated in (".git", "outputs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"):
        assert any(pattern.strip("/") == generated for pattern in excludes), f"{generated} is not excluded"
    # The demo's bundled data must travel with the code.
    for pattern in excludes:
        assert not re.search(r"(^|/)(casalimpia|data)(/|$)", pattern.strip("/")), f"{pattern} drops package files"
    assert not [name for name in runtime_env.get("env_vars", {}) if SECRET_NAME.search(name)]


# --- the ray up YAML ----------------------------------------------------------------------------------


def test_ray_up_yaml_has_a_cpu_head_and_a100_workers():
    config = documents(CLUSTER / "aws.yaml")[0]
    assert config["cluster_name"] == "casalimpia"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert "aws_credentials" not in config["provider"]
    assert config["docker"]["image"] == IMAGE_GPU
    assert config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    workers = {name: spec for name, spec in types.items() if spec["node_config"]["InstanceType"] in A100_INSTANCE_TYPES}
    assert workers, "no A100 worker type"
    for name, spec in workers.items():
        assert 0 == spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], name
        assert spec["labels"]["ray.io/accelerator-type"] == "A100"
    for name, spec in types.items():
        assert spec["node_config"]["IamInstanceProfile"], f"{name}: S3 access comes from an instance profile"
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    assert "--labels=ray.io/accelerator-type=A100" in worker_start


# --- no secrets -----------------------------------------------------------------------------------------


TEXT_RULES = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret key setting": re.compile(r"aws_secret_access_key[ \t]*[=:]", re.IGNORECASE),
    # NAME=value or NAME: value for a secret-looking variable, unless the value is taken from elsewhere
    # ("$VAR", "$(command)"): YAML lists of env entries use `name:`/`valueFrom:` and never match.
    "a secret assigned a literal value": re.compile(
        r"\b[A-Z][A-Z0-9_]*(?:_KEY|_KEY_ID|_SECRET|_TOKEN|_PASSWORD)\b[ \t]*[=:][ \t]*(?![\"']?\$)[\"']?[^\s\"'$]"
    ),
    "a password": re.compile(r"password[ \t]*[=:][ \t]*(?![\"']?\$)[\"']?[^\s\"'$]", re.IGNORECASE),
}


def text_findings(text: str) -> list[str]:
    return [f"{what}: {match.group(0)!r}" for what, rule in TEXT_RULES.items() for match in rule.finditer(text)]


def structure_findings(node: Any, where: str = "") -> list[str]:
    """Secret-named environment variables given a literal value anywhere in parsed YAML."""
    found = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name) and "value" in node:
            found.append(f"{where}: {name} has a literal value (use valueFrom.secretKeyRef or envFrom)")
        for key, value in node.items():
            secret_key = isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and SECRET_NAME.search(key)
            if secret_key and isinstance(value, str | int | float) and not str(value).startswith("$"):
                found.append(f"{where}.{key}: a literal value")
            if key == "runtimeEnvYAML" and isinstance(value, str):
                value = yaml.safe_load(value)
            found += structure_findings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += structure_findings(item, f"{where}[{index}]")
    return found


def test_the_secret_checks_catch_secrets():
    access_key = "AKIA" + "Q" * 16
    assert text_findings(f"aws_access_key_id = {access_key}")
    assert text_findings("aws_secret_access_key = abc")
    assert text_findings("  WANDB_API_KEY: 0123456789abcdef")
    assert text_findings("-e WANDB_API_KEY=0123456789abcdef")
    assert text_findings("password: hunter2")
    assert not text_findings('export WANDB_API_KEY="$(python read_it.py)"')
    assert not text_findings('--from-literal=WANDB_API_KEY="$WANDB_API_KEY"')
    assert structure_findings({"env": [{"name": "WANDB_API_KEY", "value": "x"}]})
    assert structure_findings({"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}})
    assert structure_findings({"runtimeEnvYAML": "env_vars:\n  HF_TOKEN: x\n"})
    assert not structure_findings({"env": [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s"}}}]})


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_no_credentials_in_cluster_files(path: Path):
    findings = text_findings(path.read_text())
    for index, doc in enumerate(documents(path)):
        findings += structure_findings(doc, f"document {index}")
    assert not findings, f"{path.name}: " + "; ".join(findings)


def local_head_commands() -> list[str]:
    """The README's commands that start a local head, submit the demo job to it, watch it and stop it."""
    section = (ROOT / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "the cluster section has a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_cluster_commands_against_a_local_head():
    """`ray start --head` on 127.0.0.1, the demo job through `ray job submit`, then the head is stopped.

    The commands run as written, except that the head gets free ports and a temp dir of its own
    (this machine may run other Ray instances, the test session's included) and that the final
    `ray stop`, which would stop every Ray instance of this user, becomes killing this head's processes.
    """
    commands = local_head_commands()
    assert commands[0] == "export RAY_AUTH_MODE=token" and commands[-1] == "ray stop"
    assert any(c.startswith("ray start --head") for c in commands) and any("ray job submit" in c for c in commands)
    ports = {"6379": str(free_port()), "8265": str(free_port())}
    output = ROOT / "outputs" / "cluster-demo"
    shutil.rmtree(output, ignore_errors=True)
    # Nothing leaves this machine; and Ray's socket paths must stay short, which pytest's tmp_path is not.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-head-", dir="/tmp"))
    try:
        for command in commands[:-1]:
            for default, port in ports.items():
                command = command.replace(f"={default}", f"={port}").replace(f":{default}", f":{port}")
            if command.startswith("ray start --head"):
                command += f" --dashboard-agent-listen-port={free_port()} --temp-dir={temp_dir}"
            if command.startswith("export "):
                name, _, value = command.removeprefix("export ").partition("=")
                env[name] = value
                continue
            result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            if command.startswith("ray job status"):
                assert "Job 'demo-1' succeeded" in result.stdout
            if command.startswith("ray job logs"):
                assert "done: ok=8 failed=0 skipped=0" in result.stdout
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    rows = pq.read_table(output / "_manifest").to_pylist()
    assert len(rows) == 8 and {row["status"] for row in rows} == {"ok"}
    assert (output / "config.yaml").exists() and (output / "report.html").exists()


def stop_head(temp_dir: Path) -> None:
    """Kill every process of the Ray head started with ``--temp-dir=temp_dir``, and those they started."""
    import psutil

    started = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    processes = set(started)
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.update(process.children(recursive=True))
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
