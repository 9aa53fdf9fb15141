"""Tests for casalimpia.storage against local disk and a real moto S3 server over HTTP."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time

import boto3
import pytest

from casalimpia import storage
from casalimpia.storage import StorageError

# A tree exercising the listing rules; only WANTED should be listed.
TREE = {
    "a.png": b"a",
    "sub/b.png": b"b",
    "sub/deep/c.png": b"c",
    ".hidden": b"h",
    ".cache/x.png": b"x",
    "_SUCCESS": b"",
    "_manifest/part.json": b"{}",
    "sub/_tmp.png": b"t",
    "sub/.DS_Store": b"d",
}
WANTED = ["a.png", "sub/b.png", "sub/deep/c.png"]


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh folder URI, on local disk or under an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('s3_bucket')}/root"


def s3_keys(bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return sorted(obj["Key"] for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def assert_clean(error: pytest.ExceptionInfo[StorageError], uri: str) -> None:
    """The message is one line, names the URI and leaks no secret."""
    message = str(error.value)
    assert "\n" not in message
    assert uri in message
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        assert secret not in message
    assert error.value.__cause__ is None


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def retry_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """caplog, seeing storage's warnings even after configure_logging stopped casalimpia's propagation."""
    monkeypatch.setattr(logging.getLogger("casalimpia"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="casalimpia.storage")
    return caplog


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "casalimpia.storage" and "retrying" in r.getMessage()]


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Millisecond backoff, and one SDK attempt per try so that every injected failure reaches storage's retries."""
    monkeypatch.setattr(storage, "_RETRY_BASE_SECONDS", 0.001)
    monkeypatch.setattr(storage, "_RETRY_CAP_SECONDS", 0.005)
    # A new AWS_MAX_ATTEMPTS is a new client cache key, so the session's client is not reused.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


@pytest.mark.parametrize(
    ("uri", "parts", "expected"),
    [
        ("s3://b/p", ("a/b.png",), "s3://b/p/a/b.png"),
        ("s3://b/p/", ("a", "b.png"), "s3://b/p/a/b.png"),
        ("s3://b", ("x",), "s3://b/x"),
        ("out", ("x",), "out/x"),
        ("/data/out", ("x", "y.png"), "/data/out/x/y.png"),
        ("file:///data", ("x",), "file:///data/x"),
        ("out", (), "out"),
    ],
)
def test_join(uri: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(uri, *parts) == expected


def test_join_rejects_absolute_part() -> None:
    with pytest.raises(ValueError, match="absolute"):
        storage.join("s3://b/p", "/etc/passwd")


def test_is_s3() -> None:
    assert storage.is_s3("s3://bucket/key")
    assert storage.is_s3("S3://bucket")
    assert not storage.is_s3("/tmp/s3://x")
    assert not storage.is_s3("file:///tmp/x")
    assert not storage.is_s3("relative/path")


def test_filesystem_paths(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.filesystem("out/x")[1] == str(tmp_path / "out" / "x")
    assert storage.filesystem("file:///data/./x/")[1] == "/data/x"
    assert storage.filesystem("/data/x")[1] == "/data/x"


def test_filesystem_s3_paths_and_cache(s3_server: str) -> None:
    fs_a, path_a = storage.filesystem("s3://bucket-a/prefix/")
    fs_b, path_b = storage.filesystem("s3://bucket-b")
    assert (path_a, path_b) == ("bucket-a/prefix", "bucket-b")
    assert fs_a is fs_b


@pytest.mark.parametrize("uri", ["gs://bucket/x", "file://host/x", "s3:///key", "s3://key:secret@bucket/x", ""])
def test_filesystem_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(StorageError) as error:
        storage.filesystem(uri)
    assert "secret" not in str(error.value)


@pytest.mark.parametrize("suffix", ["", "/"])
def test_list_files_local(tmp_path, suffix: str) -> None:
    for relative, data in TREE.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tmp_path / "empty-dir").mkdir()
    assert storage.list_files(str(tmp_path) + suffix) == WANTED
    assert storage.list_files(f"file://{tmp_path}{suffix}") == WANTED
    assert storage.list_files(str(tmp_path / "empty-dir")) == []


@pytest.mark.parametrize("suffix", ["", "/"])
def test_list_files_s3(s3_bucket: str, suffix: str) -> None:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for relative, data in TREE.items():
        client.put_object(Bucket=s3_bucket, Key=f"photos/{relative}", Body=data)
    # A directory marker, a key pyarrow cannot address and a sibling prefix
    # sharing the name's start.
    client.put_object(Bucket=s3_bucket, Key="photos/sub/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="photos/sub//empty-part.png", Body=b"e")
    client.put_object(Bucket=s3_bucket, Key="photos-other/z.png", Body=b"z")
    assert storage.list_files(f"s3://{s3_bucket}/photos{suffix}") == WANTED
    assert storage.list_files(f"s3://{s3_bucket}{suffix}") == [
        "photos-other/z.png",
        *(f"photos/{path}" for path in WANTED),
    ]


def test_list_files_everything_keeps_hidden_and_underscored_names(root: str) -> None:
    for relative, data in TREE.items():
        storage.write_bytes(storage.join(root, relative), data)
    assert storage.list_files(root) == WANTED
    assert storage.list_files(root, everything=True) == sorted(TREE)


def test_round_trip(root: str) -> None:
    uri = storage.join(root, "nested/deeper/photo.png")
    storage.write_bytes(uri, b"\x89PNG data")
    assert storage.read_bytes(uri) == b"\x89PNG data"
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"
    assert storage.list_files(root) == ["nested/deeper/photo.png"]


def test_compressed_names_are_not_transcoded(root: str) -> None:
    uri = storage.join(root, "weights.bin.gz")
    storage.write_bytes(uri, b"not really gzip")
    assert storage.read_bytes(uri) == b"not really gzip"


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path) -> None:
    target = tmp_path / "out" / "photo.png"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["photo.png"]
    # Written through a temp file, yet with ordinary permissions rather than
    # mkstemp's owner-only 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_exists_and_delete(root: str) -> None:
    uri = storage.join(root, "sub/file.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"x")
    assert storage.exists(uri)
    assert storage.exists(storage.join(root, "sub"))
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)


def test_ensure_writable_local(tmp_path) -> None:
    out = tmp_path / "new" / "output"
    storage.ensure_writable(str(out))
    assert out.is_dir()
    assert os.listdir(out) == []


def test_ensure_writable_s3(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/runs/output"
    storage.ensure_writable(uri)
    # Only pyarrow's empty directory marker may remain, never the probe.
    assert s3_keys(s3_bucket) in ([], ["runs/output/"])
    assert storage.list_files(uri) == []


def test_ensure_writable_under_a_file_fails(tmp_path) -> None:
    (tmp_path / "file").write_bytes(b"")
    uri = str(tmp_path / "file" / "output")
    with pytest.raises(StorageError) as error:
        storage.ensure_writable(uri)
    assert_clean(error, uri)


@pytest.mark.parametrize("name", ["missing", "file"])
def test_list_files_not_a_local_folder(tmp_path, name: str) -> None:
    (tmp_path / "file").write_bytes(b"")
    uri = str(tmp_path / name)
    with pytest.raises(StorageError, match="not an existing folder") as error:
        storage.list_files(uri)
    assert_clean(error, uri)


@pytest.mark.parametrize("key", ["missing-prefix", "object.txt"])
def test_list_files_not_an_s3_prefix(s3_bucket: str, key: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/object.txt", b"x")
    uri = f"s3://{s3_bucket}/{key}"
    with pytest.raises(StorageError, match="not an existing folder") as error:
        storage.list_files(uri)
    assert_clean(error, uri)


def test_missing_bucket(s3_server: str) -> None:
    uri = "s3://no-such-bucket-casalimpia/photos"
    for operation in (
        storage.list_files,
        storage.ensure_writable,
        storage.read_bytes,
        lambda uri: storage.write_bytes(uri, b"x"),
    ):
        with pytest.raises(StorageError) as error:
            operation(uri)
        assert_clean(error, uri)
    assert not storage.exists(uri)


def test_read_missing_file(root: str) -> None:
    uri = storage.join(root, "missing.png")
    with pytest.raises(StorageError) as error:
        storage.read_bytes(uri)
    assert_clean(error, uri)


def test_unreachable_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch, retry_log) -> None:
    # Connection refused fails at once; a single attempt skips the SDK's
    # retry backoff, and storage's own retries never start, so a wrong
    # endpoint fails a pre-flight check fast. The new endpoint alone yields a
    # fresh client, no cache reset.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    uri = "s3://bucket/photos"
    for operation in (
        storage.list_files,
        storage.exists,
        storage.read_bytes,
        storage.ensure_writable,
        lambda uri: storage.write_bytes(uri, b"x"),
    ):
        with pytest.raises(StorageError) as error:
            operation(uri)
        assert_clean(error, uri)
    assert retries(retry_log) == []


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        # Exactly what pyarrow 26 said for each failure, seen against moto
        # behind fault-injecting middleware, a closed port, a port with a
        # full accept queue and an unresolvable host.
        (
            "When reading information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) during "
            "HeadObject operation: No response body.",
            True,
        ),
        (
            "When uploading object with key 'y' in bucket 'b': AWS Error SLOW_DOWN during PutObject operation: "
            "Please reduce your request rate. (Request ID: x)",
            True,
        ),
        (
            "When listing objects under key '' in bucket 'b': AWS Error INTERNAL_FAILURE during ListObjectsV2 "
            "operation: We encountered an internal error. Please try again. (Request ID: x)",
            True,
        ),
        (
            "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)",
            True,
        ),
        (
            "When listing objects under key '' in bucket 'b': AWS Error SERVICE_UNAVAILABLE during ListObjectsV2 "
            "operation: Service is unable to handle request. (Request ID: x)",
            True,
        ),
        (
            "When uploading object with key 'y' in bucket 'b': AWS Error UNKNOWN (HTTP status 429) during PutObject "
            "operation: Unable to parse ExceptionName: TooManyRequests Message: Too many requests (Request ID: x)",
            True,
        ),
        (
            "When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 504) during "
            "HeadObject operation: No response body.",
            True,
        ),
        (
            "When uploading object with key 'y' in bucket 'b': AWS Error THROTTLING during PutObject operation: "
            "Rate exceeded (Request ID: x)",
            True,
        ),
        (
            "When uploading object with key 'y' in bucket 'b': AWS Error REQUEST_TIMEOUT during PutObject operation: "
            "Your socket connection to the server was not read from or written to within the timeout period.",
            True,
        ),
        (
            "When reading information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
            "operation: curlCode: 56, Failure when receiving data from the peer; Details: Recv failure: "
            "Connection reset by peer",
            True,
        ),
        (
            "When uploading object with key 'y' in bucket 'b': AWS Error NETWORK_CONNECTION during PutObject "
            "operation: curlCode: 52, Server returned nothing (no headers, no data); Details: Empty reply from server",
            True,
        ),
        (
            "When listing objects under key '' in bucket 'b': AWS Error NETWORK_CONNECTION during ListObjectsV2 "
            "operation: curlCode: 28, Timeout was reached; Details: Operation too slow. Less than 1 bytes/sec "
            "transferred the last 1 seconds",
            True,
        ),
        # Connecting timed out: as likely a wrong endpoint as a busy one.
        (
            "When getting information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
            "operation: curlCode: 28, Timeout was reached; Details: Connection timed out after 3101 milliseconds",
            False,
        ),
        (
            "When listing objects under key 'p/' in bucket 'b': AWS Error NETWORK_CONNECTION during ListObjectsV2 "
            "operation: curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1:45601 "
            "after 0 ms: Could not connect to server",
            False,
        ),
        (
            "When getting information for key 'p' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
            "operation: curlCode: 6, Could not resolve hostname; Details: Could not resolve host: no-such-host.invalid",
            False,
        ),
        (
            "When getting information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
            "operation: No response body.",
            False,
        ),
        (
            "When uploading object with key 'y' in bucket 'b': AWS Error NO_SUCH_BUCKET during PutObject operation: "
            "The specified bucket does not exist (Request ID: x)",
            False,
        ),
        (
            "When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 400) during "
            "HeadObject operation: No response body.",
            False,
        ),
        ("[Errno 2] Path does not exist 'b/missing'. Detail: [errno 2] No such file or directory", False),
        ("[Errno 28] No space left on device", False),
    ],
)
def test_transient_error_classification(message: str, transient: bool) -> None:
    assert storage._is_transient(OSError(message)) is transient


def test_s3_survives_a_flaky_endpoint(s3_bucket: str, s3_faults, fast_retries, retry_log, tmp_path) -> None:
    root = f"s3://{s3_bucket}/flaky"
    objects = {f"photos/{i:02d}.png": os.urandom(64) + bytes([i]) for i in range(24)}
    s3_faults.fail(0.3, seed=1)
    storage.ensure_writable(root)
    for relative, data in objects.items():
        storage.write_bytes(storage.join(root, relative), data)
    assert storage.list_files(root) == sorted(objects)
    for relative, data in objects.items():
        assert storage.exists(storage.join(root, relative))
        assert storage.read_bytes(storage.join(root, relative)) == data
    storage.write_rows(storage.join(root, "_manifest/part.parquet"), [{"source": "a.png", "ok": True}])
    assert storage.read_rows(storage.join(root, "_manifest/part.parquet")) == [{"source": "a.png", "ok": True}]
    storage.copy_tree(storage.join(root, "photos"), str(tmp_path / "copy"))
    assert storage.list_files(str(tmp_path / "copy")) == sorted(relative[len("photos/") :] for relative in objects)
    for relative in objects:
        storage.delete(storage.join(root, relative))
        assert not storage.exists(storage.join(root, relative))
    assert storage.list_files(root) == []
    s3_faults.off()

    assert s3_faults.failures > 0.2 * s3_faults.requests > 0
    logged = retries(retry_log)
    # Every injected failure came back as one transient error, retried by
    # storage itself since the SDK was allowed a single attempt.
    assert 0 < len(logged) <= s3_faults.failures
    assert all(f"s3://{s3_bucket}/flaky" in line and "(attempt " in line for line in logged)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in line for line in logged)


def test_s3_gives_up_after_bounded_attempts(s3_bucket: str, s3_faults, fast_retries, retry_log) -> None:
    uri = f"s3://{s3_bucket}/photo.png"
    storage.write_bytes(uri, b"photo")
    s3_faults.fail(1.0, seed=2)
    for operation in (storage.read_bytes, lambda uri: storage.write_bytes(uri, b"x"), storage.list_files):
        requests = s3_faults.requests
        with pytest.raises(StorageError, match=r"HTTP status 50[03]|SLOW_DOWN|INTERNAL_FAILURE") as error:
            operation(uri)
        assert_clean(error, uri)
        # One request per try: the SDK was allowed a single attempt.
        assert s3_faults.requests - requests == storage._S3_RETRY_ATTEMPTS
    logged = retries(retry_log)
    assert len(logged) == 3 * (storage._S3_RETRY_ATTEMPTS - 1)
    assert f"(attempt {storage._S3_RETRY_ATTEMPTS - 1} of {storage._S3_RETRY_ATTEMPTS})" in logged[-1]
    s3_faults.off()
    assert storage.read_bytes(uri) == b"photo"


@pytest.mark.parametrize("fault", [None, "AccessDenied"])
def test_s3_definite_errors_are_not_retried(s3_bucket: str, s3_faults, retry_log, fault: str | None) -> None:
    # With the session's default SDK attempts and backoff: a wrong answer is
    # never worth waiting for.
    operations = [
        (f"s3://{s3_bucket}/missing.png", storage.read_bytes),
        ("s3://no-such-bucket-casalimpia/photos", storage.list_files),
        ("s3://no-such-bucket-casalimpia/photo.png", lambda uri: storage.write_bytes(uri, b"x")),
    ]
    if fault is not None:
        s3_faults.fail(1.0, kinds=[fault])
    started = time.monotonic()
    for uri, operation in operations:
        with pytest.raises(StorageError) as error:
            operation(uri)
        assert_clean(error, uri)
    assert time.monotonic() - started < 2
    assert s3_faults.requests <= 2 * len(operations)
    assert retries(retry_log) == []


def test_copy_tree_from_s3(s3_bucket: str, tmp_path) -> None:
    src = f"s3://{s3_bucket}/models/lora"
    for relative, data in TREE.items():
        storage.write_bytes(storage.join(src, relative), data)
    dst = tmp_path / "cache"
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "b.png").write_bytes(b"stale")
    storage.copy_tree(src, str(dst))
    assert storage.list_files(str(dst)) == WANTED
    for relative in WANTED:
        assert (dst / relative).read_bytes() == TREE[relative]
    assert not (dst / ".hidden").exists()


def test_copy_tree_local_to_local(tmp_path) -> None:
    storage.write_bytes(str(tmp_path / "src" / "a" / "w.bin"), b"weights")
    storage.copy_tree(str(tmp_path / "src"), f"file://{tmp_path}/dst")
    assert (tmp_path / "dst" / "a" / "w.bin").read_bytes() == b"weights"


def test_copy_tree_needs_local_destination(s3_bucket: str, tmp_path) -> None:
    with pytest.raises(StorageError, match="must be a local folder"):
        storage.copy_tree(str(tmp_path), f"s3://{s3_bucket}/dst")
