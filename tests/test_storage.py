"""Tests for casalimpia.storage against local disk and a real moto S3 server over HTTP."""

from __future__ import annotations

import os
import socket
import stat

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


def test_unreachable_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Connection refused fails at once; a single attempt skips the retry
    # backoff. The new endpoint alone yields a fresh client, no cache reset.
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
