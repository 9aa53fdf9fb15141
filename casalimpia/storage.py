"""Read and write files by URI on local disk or S3.

Accepted URIs are local paths (relative or absolute), ``file:///absolute/path``
and ``s3://bucket/prefix``. ``file://`` URIs are taken literally (no
percent-decoding) so that :func:`join` results always round-trip.

S3 credentials, region and endpoint come only from the standard AWS settings:
the ``AWS_*`` environment variables and the shared config/credentials files.
Credentials are left to the AWS SDK's default provider chain and never pass
through this module, so they cannot end up in a message or a pickle.

Everything here takes and returns URI strings. Work runs inside Ray worker
processes, and a pickled ``S3FileSystem`` would carry its configuration
(credentials included) across the wire, so filesystems are built lazily in
each process and cached there.

Relative local paths resolve against the calling process's working
directory; Ray workers run elsewhere, so make them absolute on the driver
before handing them to tasks.

S3 operations survive transient failures in two layers. The AWS SDK retries
each request a few times (``AWS_MAX_ATTEMPTS``, 3 by default) with short
backoff. On top of that, every public operation here is tried up to 8 times
(``_S3_RETRY_ATTEMPTS``) with exponential backoff and full jitter, logging
one warning per retry, when the error says S3 was reached but could not
serve the request right now: throttling (503 SlowDown, 429), 500, 502, 503
and 504 answers, a read timeout, a reset or closed connection. Everything
else fails at once: access denied, missing bucket or key, and failures to
connect at all (refused, unresolvable or unreachable endpoint), so a
misconfigured endpoint still fails a job's pre-flight check within a couple
of seconds. Local files are never retried. Every operation is safe to
repeat: reads and listings change nothing, an S3 PUT replaces the whole
object atomically and deleting a missing object is not an error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import botocore.exceptions
import botocore.session
import pyarrow
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "copy_tree",
    "delete",
    "ensure_writable",
    "exists",
    "filesystem",
    "is_s3",
    "join",
    "list_files",
    "read_bytes",
    "write_bytes",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# The AWS "standard" retry mode default. Each extra attempt backs off longer,
# so a larger default would make a wrong endpoint take tens of seconds to
# report. Long jobs that meet throttling are covered by the retries of whole
# operations (_S3_RETRY_ATTEMPTS), which a wrong endpoint never reaches.
_DEFAULT_MAX_ATTEMPTS = 3

# Environment variables that change how the S3 client is built. Their values
# are part of the cache key, so a process whose environment changes gets a
# fresh client rather than a stale one. Secrets are deliberately absent: the
# SDK reads them itself.
_S3_SETTINGS_ENV = (
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS",
    "AWS_CA_BUNDLE",
)

# Values that must never appear in an error message, even if some layer
# below were to echo them.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# How many times an S3 operation is tried in all before a transient error is
# reported; each try is itself up to AWS_MAX_ATTEMPTS requests. Deliberately
# not an environment variable: AWS_MAX_ATTEMPTS already tunes the SDK layer,
# and a second knob would only make the product of the two harder to reason
# about. Eight tries with the backoff below keep retrying for up to ~23 s
# (~11 s on average), long enough for S3 to absorb a burst of SlowDowns,
# while an outage still fails each photo in well under a minute.
_S3_RETRY_ATTEMPTS = 8

# Full-jitter exponential backoff between tries: the n-th wait is uniform in
# [0, min(cap, base * 2**(n-1))], so thousands of workers throttled at the
# same moment spread their retries out instead of returning in lockstep.
# Tests shrink these to keep an always-failing endpoint fast.
_RETRY_BASE_SECONDS = 0.2
_RETRY_CAP_SECONDS = 10.0

# pyarrow reports S3 failures as OSError with the SDK's error name and, when
# S3 sent no parsable error code (always for HEAD, which has no body), the
# HTTP status. These mean that S3 was reached and may well succeed shortly.
_TRANSIENT_S3_ERROR = re.compile(
    r"\bAWS Error (?:SLOW_DOWN|THROTTLING|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|REQUEST_TIMEOUT)\b"
    r"|\bHTTP (?:status|response code:?) (?:429|500|502|503|504)\b"
    # curl: 18 body cut short, 52 empty reply, 55 send failed, 56 receive
    # failed (connection reset), 28 only as a read timeout. A connect or
    # resolve timeout is also code 28, but like a refused connection (7) or an
    # unknown host (6) it usually means a wrong endpoint, which must not wait
    # through backoff to be reported.
    r"|\bcurlCode: (?:18|52|55|56)\b"
    r"|\bcurlCode: 28\b.*\bOperation (?:too slow|timed out)\b"
)

# Large enough that a multi-gigabyte weights file needs few ranged GETs,
# small enough that several concurrent copies fit comfortably in memory.
_COPY_CHUNK_BYTES = 16 * 1024 * 1024

_LOCAL = pafs.LocalFileSystem()


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message names the URI (never credentials)."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it.

    The path is ``bucket/key`` for S3 (trailing slashes removed) and an
    absolute, normalised path locally. S3 filesystems are cached per process
    and per S3 configuration; buckets share one client and its connection
    pool.
    """
    if not uri:
        raise StorageError("empty URI")
    match = _SCHEME.match(uri)
    if match is None:
        return _LOCAL, os.path.abspath(uri)
    scheme = match.group(1).lower()
    rest = uri[match.end() :]
    if scheme == "file":
        if not rest.startswith("/"):
            raise StorageError(f"unsupported file URI {uri}: expected file:///absolute/path")
        return _LOCAL, os.path.abspath(rest)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if "@" in bucket:
            # The URI itself holds credentials, so it must not be echoed.
            raise StorageError("s3 URIs must not embed credentials; use the standard AWS settings instead")
        if not bucket:
            raise StorageError(f"missing bucket name in {uri}")
        try:
            s3 = _s3_filesystem(os.getpid(), tuple(os.environ.get(name) for name in _S3_SETTINGS_ENV))
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(f"cannot configure S3 for {uri}: {_reason(exc)}") from None
        return s3, f"{bucket}/{key}".rstrip("/")
    raise StorageError(f"unsupported URI scheme {scheme!r} in {uri}")


def join(uri: str, *parts: str) -> str:
    """Join relative POSIX ``parts`` onto ``uri``, keeping its scheme.

    ``join("s3://b/p", "a/b.png") == "s3://b/p/a/b.png"`` and
    ``join("out", "x") == "out/x"``.
    """
    for part in parts:
        # posixpath.join would silently drop everything before an absolute
        # part, scheme and bucket included.
        if part.startswith("/"):
            raise ValueError(f"cannot join absolute path {part!r} onto {uri}")
    return posixpath.join(uri, *parts)


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix."""
    match = _SCHEME.match(uri)
    return match is not None and match.group(1).lower() == "s3"


def list_files(uri: str, *, everything: bool = False) -> list[str]:
    """Return the relative POSIX paths of all files under ``uri``, sorted.

    Hidden entries (a path component starting with ``.``) and components
    starting with ``_`` (``_SUCCESS``, ``_manifest``, temp files) are
    skipped, as are S3 keys with empty, ``.`` or ``..`` components (``a//b``,
    ``a/../b``), which could climb out of a folder they are joined onto.
    ``everything=True`` skips none of them, for a caller that accounts for
    each file (the bulk job processes ``_drafts/room.jpg`` like any photo
    and gives an unsafe key a failed manifest row). On S3 this is one
    paginated recursive listing with no request per object, so it scales to
    prefixes with millions of keys.

    Raises StorageError if ``uri`` is not an existing folder or prefix, or
    cannot be reached.
    """
    fs, base = filesystem(uri)

    def listing() -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(base, recursive=True))
        except (FileNotFoundError, NotADirectoryError):
            raise StorageError(f"cannot list {uri}: not an existing folder or prefix") from None

    infos = _run("list", uri, fs, listing)
    # On S3 the listing also holds directories inferred from key names and
    # empty "dir/" marker objects; only real files are wanted.
    prefix = base.rstrip("/") + "/"
    paths = (info.path[len(prefix) :] for info in infos if info.type == pafs.FileType.File)
    return sorted(paths) if everything else sorted(path for path in paths if not _is_skipped(path))


def read_bytes(uri: str) -> bytes:
    """Return the whole content of the file at ``uri``."""
    fs, path = filesystem(uri)

    def read() -> bytes:
        # compression=None: the default would transparently decompress
        # anything named *.gz, *.bz2, ...
        with fs.open_input_stream(path, compression=None) as stream:
            return stream.read()

    return _run("read", uri, fs, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, replacing any existing file.

    Parent folders are created as needed. Readers never see a half-written
    file: local writes go to a temporary file in the same folder that is
    fsynced and then renamed over the target, and S3 puts are atomic.
    """
    fs, path = filesystem(uri)
    _run("write", uri, fs, lambda: _write(fs, path, data))


def write_rows(uri: str, rows: list[dict], schema: pyarrow.Schema | None = None) -> None:
    """Write rows (dicts of plain values) as one parquet file at uri; schema, when given, fixes the columns."""
    sink = pyarrow.BufferOutputStream()
    pq.write_table(pyarrow.Table.from_pylist(rows, schema=schema), sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_rows(uri: str) -> list[dict]:
    """The rows of the parquet file at uri, as dicts."""
    return pq.read_table(pyarrow.BufferReader(read_bytes(uri))).to_pylist()


def exists(uri: str) -> bool:
    """Whether a file or folder (on S3: an object, or a prefix with keys under it) exists at ``uri``."""
    fs, path = filesystem(uri)
    return _run("check", uri, fs, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def delete(uri: str) -> None:
    """Delete the file at ``uri``; a missing file is not an error."""
    fs, path = filesystem(uri)
    _run("delete", uri, fs, lambda: _delete(fs, path))


def ensure_writable(uri: str) -> None:
    """Create the folder or prefix ``uri`` if needed and prove it is writable.

    A small probe object is written and deleted, so missing buckets, denied
    access or read-only mounts surface before any work is done rather than
    after it. On S3, pyarrow leaves an empty ``prefix/`` marker object behind
    once the probe is deleted, which is what makes the prefix exist.
    """
    fs, path = filesystem(uri)
    # The leading underscore keeps a probe orphaned by a crash out of
    # list_files; the random part keeps concurrent workers apart.
    probe = posixpath.join(path, f"_casalimpia-write-probe-{uuid.uuid4().hex}")
    # Retried separately, so a transient failure of the delete does not put
    # the probe again.
    _run("write to", uri, fs, lambda: _write(fs, probe, b""))
    _run("write to", uri, fs, lambda: _delete(fs, probe))


def copy_tree(src_uri: str, dst_dir: str) -> None:
    """Copy every file :func:`list_files` finds under ``src_uri`` into local ``dst_dir``.

    Relative paths are kept and existing files replaced. Files are streamed
    in chunks, so multi-gigabyte model weights never sit in memory whole,
    and each lands atomically, so an interrupted copy never leaves a
    truncated file that looks complete.
    """
    dst_fs, dst_root = filesystem(dst_dir)
    if dst_fs is not _LOCAL:
        raise StorageError(f"cannot copy into {dst_dir}: destination must be a local folder")
    src_fs, src_root = filesystem(src_uri)

    def copy(relative: str) -> None:
        # A retry starts the file over: a failed try's temp file is already
        # gone, and the target is only ever replaced by a complete copy.
        with src_fs.open_input_stream(posixpath.join(src_root, relative), compression=None) as stream:
            _atomic_local_write(
                os.path.join(dst_root, *relative.split("/")),
                lambda out: shutil.copyfileobj(stream, out, _COPY_CHUNK_BYTES),
            )

    for relative in list_files(src_uri):
        _run("copy", join(src_uri, relative), src_fs, functools.partial(copy, relative))


@functools.cache
def _s3_filesystem(pid: int, settings: tuple[str | None, ...]) -> pafs.S3FileSystem:
    # pid is only part of the cache key, so that a forked child (e.g. a
    # DataLoader worker) never reuses its parent's client, whose connections
    # and SDK threads do not survive fork.
    del pid
    env = dict(zip(_S3_SETTINGS_ENV, settings, strict=True))
    # botocore resolves AWS_PROFILE and the shared config file exactly as
    # boto3 does. The region is never left unset: the C++ SDK would then try
    # EC2 instance metadata, which stalls off EC2.
    session = botocore.session.Session()
    region = env["AWS_REGION"] or session.get_config_variable("region") or "us-east-1"
    max_attempts = session.get_config_variable("max_attempts") or _DEFAULT_MAX_ATTEMPTS
    # pyarrow does not read AWS_ENDPOINT_URL itself. It accepts a full URL
    # such as http://127.0.0.1:9000 and takes the scheme from it.
    endpoint = env["AWS_ENDPOINT_URL_S3"] or env["AWS_ENDPOINT_URL"]
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint,
        tls_ca_file_path=session.get_config_variable("ca_bundle"),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(max_attempts)),
        # Small objects become a single PutObject instead of a three-request
        # multipart upload: cheaper per output image, and S3 emulators such
        # as moto 5 answer CompleteMultipartUpload in a form pyarrow rejects.
        allow_delayed_open=True,
    )


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    if fs is _LOCAL:
        _atomic_local_write(path, lambda out: out.write(data))
        return
    with fs.open_output_stream(path, compression=None) as stream:
        stream.write(data)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def _atomic_local_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # Hidden name: list_files ignores a temp file orphaned by a killed
    # worker. Mode "xb" rather than tempfile.mkstemp so the result gets the
    # usual umask-based permissions instead of 0600.
    temp = os.path.join(folder, f".casalimpia-{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "xb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _is_skipped(relative: str) -> bool:
    # "." covers "." and ".." too, so a listed path can never climb out of a
    # copy_tree destination. Empty parts come from S3 keys such as "a//b",
    # which pyarrow refuses to open ("Empty path component").
    return any(not part or part.startswith((".", "_")) for part in relative.split("/"))


def _run(action: str, uri: str, fs: pafs.FileSystem, operation: Callable[[], _T]) -> _T:
    """Run ``operation`` (which does the ``action`` on ``uri``) with S3 retries, raising StorageError on failure."""
    with _storage_errors(action, uri):
        if fs is _LOCAL:
            # A local error (disk full, permissions, missing file) does not go
            # away by itself; retrying would only delay the report.
            return operation()
        for attempt in range(1, _S3_RETRY_ATTEMPTS):
            try:
                return operation()
            except OSError as exc:
                if not _is_transient(exc):
                    raise
                delay = random.uniform(0, min(_RETRY_CAP_SECONDS, _RETRY_BASE_SECONDS * 2 ** (attempt - 1)))
                log.warning(
                    "cannot %s %s (attempt %d of %d), retrying in %.2f s: %s",
                    action,
                    uri,
                    attempt,
                    _S3_RETRY_ATTEMPTS,
                    delay,
                    _reason(exc),
                )
                time.sleep(delay)
        return operation()


def _is_transient(exc: OSError) -> bool:
    # Matched on the message because pyarrow raises a plain OSError for every
    # S3 failure except a missing key; see _TRANSIENT_S3_ERROR.
    return _TRANSIENT_S3_ERROR.search(" ".join(str(exc).split())) is not None


@contextlib.contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    try:
        yield
    except (OSError, pyarrow.ArrowException) as exc:
        # "from None": the reason is already in the message, and the bare
        # pyarrow error would repeat it unredacted and over several lines.
        raise StorageError(f"cannot {action} {uri}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return text
