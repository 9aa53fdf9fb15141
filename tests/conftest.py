"""Shared pytest fixtures: an S3 server (moto over real HTTP) that can be made flaky, and fresh buckets in it."""

from __future__ import annotations

import importlib.util
import os
import random
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

import boto3
import pytest
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

# The test process, the Ray workers it starts and the jobs it runs as subprocesses share two cores:
# one intra-op thread each keeps torch from oversubscribing them. Set before any test imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Real S3 error answers: the first two when S3 cannot serve a request right now, the last one
# never goes away by retrying.
S3_FAULTS = {
    "SlowDown": ("503 Service Unavailable", "Please reduce your request rate."),
    "InternalError": ("500 Internal Server Error", "We encountered an internal error. Please try again."),
    "AccessDenied": ("403 Forbidden", "Access Denied"),
}
TRANSIENT_S3_FAULTS = ("SlowDown", "InternalError")


class S3Faults:
    """WSGI middleware in front of moto that can answer requests with S3 errors instead.

    Switched off (the default) it passes every request to moto. ``fail(fraction)`` makes it answer
    that fraction of the requests arriving from then on, chosen by a seeded random generator, with
    a real S3 error response (status code and ``<Error>`` XML body) without moto seeing them.
    Requests from every process count, Ray workers included, since they reach the same server.
    ``requests`` and ``failures`` count all requests and the injected errors since the last reset.
    By default the errors are 503 SlowDown and 500 InternalError, picked at random.
    """

    def __init__(self, app: Callable) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._fraction = 0.0
        self._kinds = TRANSIENT_S3_FAULTS
        self._random = random.Random(0)
        self.requests = 0
        self.failures = 0

    def fail(self, fraction: float, seed: int = 0, kinds: Iterable[str] = TRANSIENT_S3_FAULTS) -> None:
        """Answer ``fraction`` (0 to 1) of the requests from now on with one of ``kinds`` (keys of S3_FAULTS)."""
        kinds = tuple(kinds)
        if not 0 <= fraction <= 1 or not kinds or not set(kinds) <= set(S3_FAULTS):
            raise ValueError(f"bad fault settings: fraction={fraction!r}, kinds={kinds!r}")
        with self._lock:
            self._fraction, self._kinds, self._random = fraction, kinds, random.Random(seed)

    def off(self) -> None:
        """Pass every request to moto again; the counts are kept."""
        with self._lock:
            self._fraction = 0.0

    def reset(self) -> None:
        """Switch off and zero the counts."""
        with self._lock:
            self._fraction, self.requests, self.failures = 0.0, 0, 0

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        with self._lock:
            self.requests += 1
            fault = None
            if self._fraction and self._random.random() < self._fraction:
                fault = self._random.choice(self._kinds)
                self.failures += 1
        if fault is None:
            return self.app(environ, start_response)
        # The unread body would otherwise be parsed as the next request on this keep-alive connection.
        stream = environ["wsgi.input"]
        if environ.get("wsgi.input_terminated"):
            while stream.read(65536):
                pass
        else:
            stream.read(int(environ.get("CONTENT_LENGTH") or 0))
        status, message = S3_FAULTS[fault]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault}</Code><Message>{message}</Message><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        start_response(status, [*headers, ("x-amz-request-id", request_id)])
        # A HEAD answer announces the body's length but carries none.
        return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [body]


@pytest.fixture(scope="session")
def s3_fault_switch() -> S3Faults:
    """The session S3 server's fault injector; tests use the function-scoped s3_faults instead."""
    return S3Faults(DomainDispatcherApplication(create_backend_app))


@pytest.fixture(scope="session")
def s3_server(s3_fault_switch: S3Faults) -> Iterator[str]:
    """Run moto's S3 on 127.0.0.1 for the session and yield its endpoint URL.

    The AWS settings go into os.environ, not just into a client, so that
    pyarrow and child processes (Ray workers, subprocess jobs) see them too.
    Served like moto's ThreadedMotoServer (werkzeug, a thread per request),
    but behind the S3Faults middleware so that s3_faults can make it flaky.
    """
    server = make_server("127.0.0.1", 0, s3_fault_switch, threaded=True)
    endpoint = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
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
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def s3_faults(s3_server: str, s3_fault_switch: S3Faults) -> Iterator[S3Faults]:
    """Make the session S3 server flaky for one test: call ``.fail(fraction, seed=...)``.

    Counts start at zero, and the server is well again after the test. It
    fails requests from Ray workers of the session Ray instance as well.
    Each failure the AWS SDK retries itself costs its backoff, most of a
    second, so keep fractions and request counts modest where the SDK has
    its default attempts (Ray workers, whose environment is fixed).
    """
    s3_fault_switch.reset()
    try:
        yield s3_fault_switch
    finally:
        s3_fault_switch.reset()


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
