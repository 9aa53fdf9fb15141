"""Shared pytest fixtures: an S3 server (moto over real HTTP) and fresh buckets in it."""

from __future__ import annotations

import importlib.util
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import boto3
import pytest
from moto.server import ThreadedMotoServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Run moto's S3 on 127.0.0.1 for the session and yield its endpoint URL.

    The AWS settings go into os.environ, not just into a client, so that
    pyarrow and child processes (Ray workers, subprocess jobs) see them too.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", "casalimpia-fake-access-key-id")
            env.setenv("AWS_SECRET_ACCESS_KEY", "casalimpia-fake-secret-access-key")
            env.setenv("AWS_REGION", "us-east-1")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            # Anything that could send clients elsewhere or pair the fake key
            # with a real token.
            for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
                env.delenv(name, raising=False)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty, uniquely named bucket on the test S3 server."""
    name = f"test-{uuid.uuid4().hex}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray instance for the whole session, sized like this 2-core machine.

    It starts after the S3 server because Ray workers inherit the environment Ray started with,
    and they need the AWS settings the S3 fixture puts there.

    The job's stages ask for fractional CPUs (see configs/demo.yaml), so the actor pools and the
    read tasks fit on two CPUs together without deadlocking.
    """
    import ray

    from casalimpia import configure_logging

    configure_logging()
    ray.init(
        address="local",
        num_cpus=2,
        # Ray Train's placement-group cleaner asks the dashboard's state API whether a stopped
        # trial's controller is gone; without it, workers of trials ASHA stops keep their CPUs.
        include_dashboard=True,
        runtime_env={"worker_process_setup_hook": "casalimpia.configure_logging"},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def load_job() -> Callable[[str], ModuleType]:
    """Import jobs/<name>.py as a module, to run its main() in this process on the session's Ray instance."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"casalimpia_job_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
