"""One interface over a local folder and an S3 prefix: the faceloop store.

``open_store("/some/dir")`` or ``open_store("s3://bucket/prefix")`` returns an :class:`ObjectStore`
whose paths are relative, ``/``-separated keys under that root.

Guarantees:
- ``write_bytes`` / ``write_parquet`` / ``put_file`` are atomic: a reader sees the old object or
  the whole new one. Local: temp file in the same folder + ``os.replace``. S3: one PUT, or a
  multipart upload, which becomes visible only when completed.
- Missing objects raise :class:`FileNotFoundError`; failures that may go away (timeouts,
  connection refused/reset, HTTP 5xx, throttling) are retried with exponential backoff and full
  jitter, a bounded number of times, then raised as :class:`TransientStorageError`; anything
  else (access denied, no such bucket, bad request) is :class:`StorageError` at once.

Why boto3 for S3 rather than pyarrow's S3FileSystem for our own I/O: botocore exposes the HTTP
status and error code, so transient vs permanent classification is exact (pyarrow folds them into
``OSError`` text); it also gives multipart uploads with a :class:`TransferConfig` and streaming
reads. pyarrow's filesystem is still offered through :meth:`ObjectStore.pyarrow_fs` for engines
(Ray Data, pyarrow datasets) that read and write the store in bulk and retry on their own.

Configuration comes from the environment, read when a store is opened: ``FACELOOP_S3_ENDPOINT``
(e.g. ``http://127.0.0.1:8333``; unset means AWS), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (default ``us-east-1``). Addressing is path-style.
Credentials are never logged, and never leave the process that read them: the pyarrow filesystem
handed to Ray Data carries only the region and the endpoint, and every process that unpickles
it (a Ray worker) finds the credentials in its own environment or instance role.

A local store holds biometric data: the folders it creates are ``0700`` and the files it writes
``0600`` (:func:`set_local_modes` changes that process-wide, from ``storage.file_mode`` and
``storage.dir_mode``); :meth:`ObjectStore.secure_tree` applies the same modes to what another
writer (Ray Data's Parquet writer) put under a prefix.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import random
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from faceloop.errors import (
    BadInputError,
    ConfigError,
    SourceError,
    StorageError,
    TransientStorageError,
)
from faceloop.hashing import sha256_chunks
from faceloop.vocab import UNLISTED_FOLDER, InputCode, Reason

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

T = TypeVar("T")

# Multipart above this size; parts of this size. 5 MiB is S3's minimum part size.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
_TMP_MARK = ".tmp-"  # local temp files: ".<name>.tmp-<hex>"; never listed
TMP_MARK = _TMP_MARK


# Modes of what a LocalStore creates: owner only (face crops and embeddings are biometric data).
DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700
_local_modes = {"file": DEFAULT_FILE_MODE, "dir": DEFAULT_DIR_MODE}


def set_local_modes(file_mode: int | None = None, dir_mode: int | None = None) -> None:
    """Modes of the files and folders local stores create from now on, in this process."""
    if file_mode is not None:
        _local_modes["file"] = file_mode & 0o777
    if dir_mode is not None:
        _local_modes["dir"] = dir_mode & 0o777


def use_store_modes(settings: Any) -> None:
    """The modes ``settings.storage`` (faceloop.config.Settings) asks for, in this process: called
    where a process starts writing a store for a stage (the stages' entry points, their Ray
    workers and actors, the flows), so that every file of a refresh gets them, not only those
    the driver wrote (a Ray worker's shards kept the default 0600 under ``file_mode: 0640``)."""
    set_local_modes(settings.storage.file_mode, settings.storage.dir_mode)


def local_modes() -> tuple[int, int]:
    """``(file_mode, dir_mode)`` local stores use now."""
    return _local_modes["file"], _local_modes["dir"]


def temp_dir_prefix(kind: str = "") -> str:
    """Prefix of this process's local temp dirs: ``faceloop-[<kind>-]<pid>-``. The pid lets
    recovery (storage/recovery.py) remove the dirs of dead processes and only theirs."""
    return f"faceloop-{kind + '-' if kind else ''}{os.getpid()}-"


class PreconditionFailed(StorageError):
    """A conditional write or delete found the object changed (or present / absent)."""


@dataclass(frozen=True)
class ObjectInfo:
    rel: str  # key relative to the store root, "/"-separated
    size: int
    # S3: the object's ETag as listed (changes whenever its bytes do); on a local store
    # "<mtime_ns>:<inode>" (a replace renames a new file over the key: both change).
    # Not part of equality: two listings of the same keys and sizes are the same listing.
    etag: str = field(default="", compare=False)
    # Local store: the modification time (seconds); None on S3.
    mtime: float | None = field(default=None, compare=False)

    @property
    def stamp(self) -> str:
        """Says, without reading it, whether the object may have changed: size plus ETag (S3)
        or plus modification time and inode (local)."""
        return f"{self.size}:{self.etag}"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter: sleep U(0, min(cap, base * 2**i))."""

    attempts: int = 5
    base_s: float = 0.2
    cap_s: float = 5.0
    # No new attempt starts this long after the first began: an endpoint that takes the
    # connection and never answers costs one read timeout per attempt (five: five minutes).
    deadline_s: float = 90.0

    def run(self, what: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        for i in range(self.attempts):
            try:
                return fn()
            except TransientStorageError as exc:
                elapsed = time.monotonic() - start
                if i + 1 >= self.attempts or elapsed >= self.deadline_s:
                    tries = f"{i + 1} attempt{'s' if i else ''} in {elapsed:.0f} s"
                    raise TransientStorageError(f"{what}: gave up after {tries}: {exc}") from exc
                delay = random.uniform(0, min(self.cap_s, self.base_s * 2**i))
                log.warning(
                    "%s: transient failure (%s), retry %d/%d in %.2f s",
                    what,
                    exc,
                    i + 1,
                    self.attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


def _env_number(name: str, default: str, kind: type[int] | type[float], least: float) -> Any:
    """A numeric tuning variable: ``kind`` and at least ``least``, else a ConfigError naming
    it (exit 2: a setting to fix; it was a bare ValueError or AssertionError, exit 1)."""
    text = os.environ.get(name) or default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < least or value != value:  # NaN
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={text!r}: expected {what} >= {least:g}")
    return value


def _default_retry() -> RetryPolicy:
    return RetryPolicy(
        attempts=_env_number("FACELOOP_S3_RETRIES", "5", int, 1),
        base_s=_env_number("FACELOOP_S3_RETRY_BASE_S", "0.2", float, 0),
        deadline_s=_env_number("FACELOOP_S3_DEADLINE_S", "90", float, 0.001),
    )


# --------------------------------------------------------------------------------------------
# S3 client and error mapping


@dataclass(frozen=True)
class S3Config:
    endpoint: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    # Temporary credentials (roles, SSO) come with a session token.
    session_token: str | None = None

    @classmethod
    def from_env(cls) -> S3Config:
        endpoint = os.environ.get("FACELOOP_S3_ENDPOINT") or None
        if endpoint and (
            "://" not in endpoint
            or endpoint.split("://", 1)[0].lower() not in ("http", "https")
            or not urlsplit(endpoint).netloc
        ):
            # A setting to fix (exit 2), not a store that failed: "htp://..." was botocore's
            # EndpointResolutionError at the first call, exit 1.
            raise ConfigError(
                f"FACELOOP_S3_ENDPOINT={endpoint!r}: expected an http:// or https:// URL, like "
                f"http://{endpoint.split('://', 1)[-1]}"
            )
        if endpoint and "@" in urlsplit(endpoint).netloc:
            # Credentials in the URL were printed with it in every retry warning and error; the
            # keys belong in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (never echoed).
            raise ConfigError(
                "FACELOOP_S3_ENDPOINT holds credentials (user:password@): give the endpoint "
                "without them and the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        return cls(
            endpoint=endpoint,
            region=os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        )

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"S3Config(endpoint={self.endpoint!r}, region={self.region!r})"


_clients: dict[S3Config, Any] = {}
_clients_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    # A forked child (a DataLoader worker, a multiprocessing pool) must not reuse the parent's
    # clients: their urllib3 pools hold the parent's sockets, and two processes reading one
    # socket interleave responses (seen as botocore FlexibleChecksumError on get_object).
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def _s3_client(cfg: S3Config) -> Any:
    """A cached boto3 client (thread-safe) with botocore's own retries off: we retry ourselves,
    so attempts are bounded once and every failure is classified the same way."""
    with _clients_lock:
        client = _clients.get(cfg)
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3",
                endpoint_url=cfg.endpoint,
                region_name=cfg.region,
                aws_access_key_id=cfg.access_key,
                aws_secret_access_key=cfg.secret_key,
                aws_session_token=cfg.session_token,
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=5,
                    # Between bytes, not for a whole transfer: an answer this late is an
                    # endpoint that will not answer (RetryPolicy's deadline bounds the retries).
                    read_timeout=_env_number("FACELOOP_S3_READ_TIMEOUT_S", "30", float, 0.001),
                    max_pool_connections=32,
                ),
            )
            _clients[cfg] = client
        return client


_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestThrottled",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _map_s3_error(exc: Exception, what: str) -> Exception:
    """botocore exception -> FileNotFoundError | TransientStorageError | StorageError."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket"):
            return FileNotFoundError(what)
        if status >= 500 or status == 429 or code in _THROTTLE_CODES:
            return TransientStorageError(f"{what}: {code or status}")
        return StorageError(f"{what}: {code or status} {err.get('Message', '')}".strip())
    if isinstance(
        exc,
        (
            bx.EndpointConnectionError,
            bx.ConnectionClosedError,
            bx.ConnectTimeoutError,
            bx.ReadTimeoutError,
            bx.ResponseStreamingError,
        ),
    ):
        url = urlsplit(str(getattr(exc, "kwargs", {}).get("endpoint_url") or ""))
        at = f" ({url.scheme}://{url.netloc})" if url.netloc else ""
        return TransientStorageError(f"{what}: {type(exc).__name__}{at}")
    if isinstance(exc, (bx.HTTPClientError, ConnectionError, TimeoutError)):
        return TransientStorageError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, bx.NoCredentialsError):
        return StorageError(
            f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, bx.BotoCoreError):
        return StorageError(f"{what}: {type(exc).__name__}: {exc}")
    return exc


def _s3_call(retry: RetryPolicy, what: str, fn: Callable[[], T]) -> T:
    def once() -> T:
        try:
            return fn()
        except Exception as exc:  # classified below; unknown errors re-raise unchanged
            mapped = _map_s3_error(exc, what)
            if mapped is exc:
                raise
            raise mapped from exc

    return retry.run(what, once)


def _split_s3(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``. Split by hand: a key may hold ``#``, ``?`` or
    ``;``, which a URL parser takes for a fragment, a query or parameters (``photo#2.jpg``
    read as ``photo``)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise StorageError(f"not an s3:// URI: {uri}")
    return bucket, key.strip("/")


def _file_uri_path(uri: str) -> str:
    """The path of a ``file://`` URI as faceloop writes them (``file://`` + the path as is, so a
    name with ``#`` or ``?`` stays whole); ``file://localhost/...`` is the same path."""
    rest = uri.removeprefix("file://")
    if rest.startswith("localhost/"):
        rest = rest.removeprefix("localhost")
    if not rest.startswith("/"):
        raise StorageError(f"a file:// URI names an absolute path: {uri}")
    return rest


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").strip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError(f"path escapes the store: {rel!r}")
    return "/".join(parts)


def _local_info(rel: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(rel, st.st_size, f"{st.st_mtime_ns}:{st.st_ino}", st.st_mtime_ns / 1e9)


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base and rel else (base or rel)


# --------------------------------------------------------------------------------------------
# Stores


class ObjectStore:
    """Common interface; see :func:`open_store`. Paths are relative keys, ``/``-separated."""

    root: str

    def uri(self, rel: str) -> str:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def iter_bytes(self, rel: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object's content (e.g. to hash a shard without holding it in memory)."""
        raise NotImplementedError

    def local_file(self, rel: str) -> str | None:
        """The local file that holds ``rel``, for readers that open a path themselves (a
        faiss index: read from its file, not copied out of a bytes object); None when the
        store is not on this machine's filesystem."""
        return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        """Upload a local file as ``rel`` atomically (multipart on S3 when big)."""
        raise NotImplementedError

    def _write_buffer(self, rel: str, buf: pa.Buffer) -> None:
        """:meth:`write_bytes` of an Arrow buffer (a store that can write it without a copy
        into a ``bytes`` object does)."""
        self.write_bytes(rel, buf.to_pybytes())

    def move(self, src: str, dst: str) -> None:
        """Make the object ``src`` the object ``dst`` (replacing it) and remove ``src``. Local:
        one ``os.replace``, atomic and needing no new space. S3: server-side copy, then delete."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        """Objects under the folder ``prefix`` (not a string prefix: ``a/b`` does not match
        ``a/bc``), sorted by key. Non-recursive: direct children that are objects only."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove one object; a missing one is not an error."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under the folder ``prefix``; returns how many."""
        raise NotImplementedError

    # -- conditional writes (the store lock, storage/lock.py) --------------------------------

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """``(content, token)``; the token changes whenever the object is replaced."""
        raise NotImplementedError

    def age_seconds(self, rel: str) -> float | None:
        """Seconds since ``rel`` was last written, by the store's own clock (not the writer's
        nor this process's: machines whose clocks disagree judge a lease alike); None when
        the store cannot tell. Raises FileNotFoundError for a missing object."""
        return None

    def write_if(self, rel: str, data: bytes, expect: str | None) -> str:
        """Write ``rel`` only if it is absent (``expect=None``) or still has token ``expect``;
        returns the new token, raises :class:`PreconditionFailed` otherwise."""
        raise NotImplementedError

    def delete_if(self, rel: str, expect: str) -> None:
        """Delete ``rel`` only if it still has token ``expect`` (else PreconditionFailed)."""
        raise NotImplementedError

    def pyarrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, base_path)`` such that ``f"{base_path}/{rel}"`` on ``filesystem`` is
        ``rel`` in this store; for Ray Data and pyarrow datasets. The filesystem pickles without
        credentials (it is sent to Ray workers)."""
        raise NotImplementedError

    def secure_tree(self, prefix: str) -> None:
        """Give what another writer (Ray Data) wrote under ``prefix`` the store's modes (local
        stores only; an S3 store's access is the bucket's policy)."""

    # -- Parquet, shared by both stores -------------------------------------------------------

    def write_parquet(self, rel: str, table: pa.Table, **kwargs: Any) -> None:
        """Write ``table`` as one Parquet object, replacing any old one atomically.

        Dictionary encoding is used for the top-level string columns only (ids, statuses,
        groups repeat; embeddings and crops never do): pyarrow's default tries it on every
        column, which made a 200-face group file 4x slower to write, 2x slower to read and
        47% larger (measured: 15.0 vs 4.0 ms, 688 vs 467 kB)."""
        kwargs.setdefault("use_dictionary", dictionary_columns(table.schema))
        if table.nbytes <= PARQUET_IN_MEMORY_MAX:
            # Encoded in memory and written once: no temporary folder and no second copy
            # (the store's own write is still a fsynced temp file renamed into place).
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, **kwargs)
            self._write_buffer(rel, sink.getvalue())
            return
        with tempfile.TemporaryDirectory(prefix=temp_dir_prefix()) as tmp:
            path = os.path.join(tmp, "t.parquet")
            try:
                pq.write_table(table, path, **kwargs)
            except OSError as exc:  # the local temp folder, not the store, is full or read-only
                raise write_error(f"{path} (temporary copy of {self.uri(rel)})", exc) from exc
            self.put_file(rel, path)

    def parquet_files(self, rel: str) -> builtins.list[str]:
        """``[rel]`` if it is an object, else the ``*.parquet`` objects under that folder."""
        rel = _clean_rel(rel)
        if rel.endswith(".parquet") and self.exists(rel):
            return [rel]
        files = [o.rel for o in self.list(rel) if o.rel.endswith(".parquet")]
        if not files and not rel.endswith(".parquet") and self.exists(rel):
            return [rel]
        return files

    def read_parquet(
        self,
        rel: str,
        columns: builtins.list[str] | None = None,
        filter: pc.Expression | None = None,
        schema: pa.Schema | None = None,
    ) -> pa.Table:
        """One Parquet object, or every ``*.parquet`` under the folder ``rel``, as one table.

        ``filter`` is a pyarrow compute expression applied row-wise. Raises FileNotFoundError
        when there is nothing at ``rel``; pass ``schema`` to get an empty table instead.
        """
        files = self.parquet_files(rel)
        if not files:
            if schema is not None:
                return _empty(schema, columns)
            raise FileNotFoundError(self.uri(rel))
        tables = [self.read_parquet_file(f, columns=columns, filter=filter) for f in files]
        if schema is not None:
            target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
            tables = [conform(t, target) for t in tables]
        return pa.concat_tables(tables, promote_options="default")

    def read_parquet_file(
        self,
        rel: str,
        columns: builtins.list[str] | None = None,
        filter: pc.Expression | None = None,
    ) -> pa.Table:
        """One Parquet object. Requested ``columns`` the file lacks (written before the column
        was added) are left out; :func:`conform` fills them with nulls."""
        if columns is not None and filter is None:
            return self.read_parquet_columns(rel, columns, ranged=False)
        data = self.read_bytes(rel)
        try:
            if filter is not None:
                # The dataset API filters while it decodes (the images table's history reads
                # keep a few rows of each file); its scanner reads from a copy Arrow owns,
                # never from the Python bytes (read_parquet_bytes says why).
                owned = _arrow_owned(data)
                if columns is not None:
                    names = set(pq.read_schema(pa.BufferReader(owned)).names)
                    columns = [c for c in columns if c in names]
                return pq.read_table(
                    pa.BufferReader(owned), columns=columns, filters=filter, use_threads=False
                )
            return _read_parquet(pa.BufferReader(data), columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"{self.uri(rel)}: not a readable Parquet file: {exc}") from exc

    def read_parquet_columns(
        self, rel: str, columns: builtins.list[str], ranged: bool = True
    ) -> pa.Table:
        """The ``columns`` of one Parquet object, reading only their bytes where the store can:
        a local file is opened and the reader fetches its footer and those column chunks; on
        S3 (``ranged``) they are ranged GETs. Readers of a few small columns of large files (the
        keys of a dataset's shards, whose crops are nearly all of their bytes) use this; a
        whole small object is one request, so S3 reads without ``ranged`` fetch it whole."""
        source = self._parquet_source(rel, ranged)
        try:
            return _read_parquet(source, columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"{self.uri(rel)}: not a readable Parquet file: {exc}") from exc
        finally:
            source.close()

    def _parquet_source(self, rel: str, ranged: bool) -> pa.NativeFile:
        """What a Parquet reader reads ``rel`` from: its bytes, unless a subclass can do better."""
        return pa.BufferReader(self.read_bytes(rel))


def read_parquet_bytes(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file held in memory (``columns``: None for all), decoded in this thread.

    Not ``pq.read_table``: that goes through pyarrow's dataset API, whose scanner can let one
    of Arrow's worker threads drop the last reference to the Python ``bytes`` it read from
    after the call returned. When that happens while the interpreter shuts down, the release
    asks for the GIL, the finalizing interpreter ends the thread, and the unwind through
    Arrow's destructor aborts the process (``terminate called without an active exception``;
    apache/arrow#34314): `faceloop doctor` exited with SIGABRT after printing its report about
    once in 180 runs on a loaded 2-core machine, the core dump showing exactly that stack."""
    return _read_parquet(
        pa.BufferReader(data), list(columns) if columns is not None else None, strict=True
    )


def _arrow_owned(data: bytes) -> pa.Buffer:
    """``data`` copied into memory Arrow owns: a reader's worker thread may release it without
    the GIL (see :func:`read_parquet_bytes`)."""
    buf = pa.allocate_buffer(len(data))
    memoryview(buf).cast("B")[:] = data
    return buf


def _read_parquet(
    source: pa.NativeFile, columns: builtins.list[str] | None, strict: bool = False
) -> pa.Table:
    """``columns`` (None: all; those the file lacks are left out, or with ``strict`` fail as
    ``pq.read_table`` fails) of the Parquet file ``source``."""
    # The file reader in batches: read_table (the dataset API) held ~7x a file's size in decode
    # buffers for list<float> embeddings (+210 MB for a 21 MB detections file) and was slower
    # on small group files (5.4 vs 3.1 ms for 200 faces). One thread: Arrow's pool per column
    # cost more than it saved (a 200-face group file without crops: 5.5 -> 2.5 ms on 2 cores;
    # the 85 MB identities file the same).
    pf = pq.ParquetFile(source)
    schema = pf.schema_arrow
    if columns is not None:
        if strict and (missing := [c for c in columns if c not in schema.names]):
            raise pa.ArrowInvalid(f"no column named {', '.join(missing)} in the Parquet file")
        columns = [c for c in columns if c in schema.names]
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    if pf.metadata.num_rows <= _READ_BATCH_ROWS or any(
        pa.types.is_dictionary(f.type) for f in schema
    ):
        # A file of one batch's rows is read whole: the batch reader's set-up cost more than
        # its decoding (a 200-face group file without crops: 3.5 -> 1.3 ms; the decide pass
        # reads one per album). In batches, every batch of a dictionary column would carry its
        # own copy of the row group's dictionary (+282 MB for an 8 MB keys cache of 10^6 rows).
        return pf.read(columns=columns, use_threads=False)
    return pa.Table.from_batches(
        list(pf.iter_batches(batch_size=_READ_BATCH_ROWS, columns=columns, use_threads=False)),
        schema=schema,
    )


def write_chunked(
    path: str | os.PathLike[str], data: bytes | memoryview, mode: int | None = None
) -> None:
    """Write ``data`` to the file ``path`` (truncated) in calls of at most :data:`WRITE_CHUNK`
    bytes. ``mode``: the permissions of a file it creates, whatever the umask (e.g. 0o600).

    The kernel sizes the page-cache folios of a buffered write by the call's length: one call
    of a few MB gets huge-page-sized folios. On a VM whose host takes back the memory its
    guest freed (free page reporting; docs/SCALING.md, forty-second session), such folios are
    slow to get: a 4.4 MB file written in one call took 11.6-65.5 ms on ext4 (mostly 35-65)
    after the first, in calls of 1 MiB 0.8-1.4 ms (tmpfs, which uses small pages, 1.3-2.0 ms
    in one call). Elsewhere the few extra calls cost nothing measurable."""
    view = memoryview(data).cast("B")
    if mode is None:
        f = open(path, "wb")  # noqa: SIM115 - closed by the with below
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)  # the umask narrowed it at most; a file already there keeps its own
        f = os.fdopen(fd, "wb")
    with f:
        for at in range(0, len(view), WRITE_CHUNK):
            f.write(view[at : at + WRITE_CHUNK])


# A local Parquet file up to this size is read in one call and its columns decoded from memory
# (see LocalStore._parquet_source); a larger one is read column chunk by column chunk.
_READ_WHOLE_MAX = 2 << 20

# Bytes per write call of a local store (see write_chunked).
WRITE_CHUNK = 1 << 20

# Rows per batch when a Parquet object is decoded (bounds the reader's scratch memory).
_READ_BATCH_ROWS = 1024

# Tables up to this size are encoded to Parquet in memory before the store writes them; larger
# ones go through a local temporary file (bounded memory).
PARQUET_IN_MEMORY_MAX = 64 * 1024 * 1024


def dictionary_columns(schema: pa.Schema) -> builtins.list[str]:
    """The columns worth dictionary-encoding: top-level strings."""
    return [
        f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns in order; missing nullable columns are null.

    Raises ValueError when a column cannot be cast or a non-nullable one is missing.
    """
    if table.schema.equals(schema, check_metadata=False):
        # Already conformed (what the store's own writers wrote): the per-column casts cost
        # ~1 ms per read of a faces group file, most of the decide pass's reading overhead.
        return table.replace_schema_metadata(schema.metadata)
    cols = []
    for f in schema:
        if f.name in table.column_names:
            try:
                cols.append(table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"column {f.name}: cannot cast to {f.type}: {exc}") from exc
        elif f.nullable:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"missing non-nullable column {f.name}")
    return pa.Table.from_arrays(cols, schema=schema)


def write_error(where: str, exc: OSError) -> StorageError:
    """A failed local write as one line that says what to do (raised ``from`` the OSError)."""
    what = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"no space left on the device writing {where}: free space (or move the store to a "
            "bigger disk) and rerun; the failed write left the old content in place"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
        return StorageError(
            f"cannot write {where} ({what}): the store must be a writable folder; fix its "
            "permissions or point the configured store at one"
        )
    return StorageError(f"cannot write {where}: {what}")


def _empty(schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    return target.empty_table()


class LocalStore(ObjectStore):
    """A folder on the local filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().absolute()
        self.root = str(self._root)

    def _mkdirs(self, path: Path) -> None:
        """Create ``path`` and missing parents with the store's folder mode (exactly: not
        widened by the umask, nor narrowed below what the owner needs)."""
        if path.is_dir():
            return
        _, dir_mode = local_modes()
        missing: list[Path] = []
        p = path
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, dir_mode)
            except FileExistsError:
                continue
            os.chmod(d, dir_mode)

    def _create_private(self, path: Path) -> None:
        """Create the empty file ``path`` with the store's file mode (before any byte is in it)."""
        file_mode, _ = local_modes()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
        os.close(fd)
        os.chmod(path, file_mode)

    def secure_tree(self, prefix: str) -> None:
        file_mode, dir_mode = local_modes()
        base = self._path(prefix)
        if not base.is_dir():
            if base.is_file():
                os.chmod(base, file_mode)
            return
        for dirpath, dirs, files in os.walk(base):
            os.chmod(dirpath, dir_mode)
            for name in dirs:
                os.chmod(os.path.join(dirpath, name), dir_mode)
            for name in files:
                os.chmod(os.path.join(dirpath, name), file_mode)

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, rel: str) -> Path:
        return self._root / _clean_rel(rel) if _clean_rel(rel) else self._root

    def uri(self, rel: str) -> str:
        return str(self._path(rel))

    def local_file(self, rel: str) -> str | None:
        return str(self._path(rel))

    def _parquet_source(self, rel: str, ranged: bool) -> pa.NativeFile:
        # The open file: the reader seeks to the footer and the column chunks it needs (the
        # keys of a shard of crops: a few percent of its bytes). A file replaced while it is
        # read stays the one opened. A small file (an album's group file, an overlay) is read
        # in one call instead: its columns' reads one by one cost more than the bytes they
        # skip (an album of 200 faces' label-pass columns through this store: 1.56-1.66 ms
        # read column by column, 1.21-1.27 ms whole; with 4.5 KB crops in it, 1.61-1.66
        # against 1.38-1.40 ms).
        path = self._path(rel)
        try:
            f = pa.OSFile(str(path), "r")
            if f.size() <= _READ_WHOLE_MAX:
                with f:
                    return pa.BufferReader(f.read())
            return f
        except FileNotFoundError:
            raise FileNotFoundError(self.uri(rel)) from None
        except OSError as exc:
            if path.is_dir() or not path.parent.is_dir():  # a folder, or through a file
                raise FileNotFoundError(self.uri(rel)) from exc
            raise StorageError(f"{self.uri(rel)}: {exc}") from exc

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except (IsADirectoryError, NotADirectoryError) as exc:
            # A folder, or a path through a file: no object there.
            raise FileNotFoundError(self.uri(rel)) from exc
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.uri(rel)}: {exc}") from exc

    def iter_bytes(self, rel: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with open(self._path(rel), "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def _replace(self, rel: str, fill: Callable[[Path], object]) -> None:
        """Atomically replace ``rel``: ``fill`` writes a temp file beside it, which is fsynced
        and renamed over it; on any failure the temp file is removed and nothing changes."""
        path = self._path(rel)
        tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            try:
                self._mkdirs(path.parent)
                self._create_private(tmp)  # fill() writes into it, keeping its mode
                fill(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        except OSError as exc:
            raise write_error(str(path), exc) from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._replace(rel, lambda tmp: write_chunked(tmp, data))

    def _write_buffer(self, rel: str, buf: pa.Buffer) -> None:
        self._replace(rel, lambda tmp: write_chunked(tmp, memoryview(buf)))

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        self._replace(rel, lambda tmp: shutil.copyfile(local_path, tmp))

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        try:
            self._mkdirs(target.parent)
            os.replace(self._path(src), target)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise write_error(str(target), exc) from exc

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def age_seconds(self, rel: str) -> float | None:
        # The file system stamps a write with this host's clock (local stores are one host's).
        return max(0.0, time.time() - self._path(rel).stat().st_mtime)

    def _info(self, p: Path) -> ObjectInfo:
        return _local_info(p.relative_to(self._root).as_posix(), p.stat())

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        # os.scandir with string keys: a Path, a stat call and relative_to per object were
        # most of listing a 10^6-face store's 5,000 group files (0.12 -> 0.03 s each time).
        rel0 = _clean_rel(prefix)
        base = os.path.join(self.root, rel0) if rel0 else self.root
        if not os.path.isdir(base):
            return []
        out: list[ObjectInfo] = []
        stack = [(base, rel0)]
        while stack:
            path, rel = stack.pop()
            with os.scandir(path) as it:
                for e in it:
                    key = f"{rel}/{e.name}" if rel else e.name
                    # As os.walk: a link to a folder is not followed, and is no object.
                    if e.is_dir():
                        if recursive and not e.is_symlink():
                            stack.append((e.path, key))
                        continue
                    if e.name.startswith(".") and _TMP_MARK in e.name:
                        continue
                    if not recursive and not e.is_file():
                        continue
                    out.append(_local_info(key, e.stat()))
        out.sort(key=lambda o: o.rel)
        return out

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(rel).unlink()

    def delete_prefix(self, prefix: str) -> int:
        if not _clean_rel(prefix):
            raise StorageError("refusing to delete the whole store")
        base = self._path(prefix)
        if not base.is_dir():
            return 0
        n = sum(len(files) for _d, _s, files in os.walk(base))
        shutil.rmtree(base)
        return n

    @contextlib.contextmanager
    def _cas(self, rel: str) -> Iterator[Path]:
        """Serialise conditional operations on ``rel`` (flock on a sidecar file; local stores
        are one host's, so a kernel lock is exact and dies with its process)."""
        import fcntl

        path = self._path(rel)
        try:
            self._mkdirs(path.parent)
            fd = os.open(
                path.with_name(f".{path.name}.cas"), os.O_RDWR | os.O_CREAT, local_modes()[0]
            )
        except OSError as exc:
            raise write_error(str(path), exc) from exc
        with open(fd, "a+b") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(guard.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _token(data: bytes) -> str:
        import hashlib

        return hashlib.sha256(data).hexdigest()

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        data = self.read_bytes(rel)
        return data, self._token(data)

    def write_if(self, rel: str, data: bytes, expect: str | None) -> str:
        with self._cas(rel) as path:
            try:
                current: str | None = self._token(path.read_bytes())
            except FileNotFoundError:
                current = None
            if current != expect:
                raise PreconditionFailed(f"{self.uri(rel)}: changed")
            self.write_bytes(rel, data)
            return self._token(data)

    def delete_if(self, rel: str, expect: str) -> None:
        with self._cas(rel) as path:
            try:
                current = self._token(path.read_bytes())
            except FileNotFoundError as exc:
                raise PreconditionFailed(f"{self.uri(rel)}: gone") from exc
            if current != expect:
                raise PreconditionFailed(f"{self.uri(rel)}: changed")
            path.unlink()

    def pyarrow_fs(self) -> tuple[pafs.FileSystem, str]:
        import pyarrow.fs as pafs

        self._mkdirs(self._root)
        return pafs.LocalFileSystem(), self.root


class S3Store(ObjectStore):
    """``s3://bucket/prefix`` through boto3 (see the module docstring for why)."""

    def __init__(
        self, root: str, config: S3Config | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.bucket, self.prefix = _split_s3(root)
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.config = config or S3Config.from_env()
        self.retry = retry or _default_retry()
        _s3_client(self.config)  # made at open, so a malformed endpoint fails here, not mid-run

    @property
    def _client(self) -> Any:
        """This process's client from the shared cache, which a fork empties: a store object
        that crossed a fork (a DataLoader worker) never uses its parent's sockets."""
        return _s3_client(self.config)

    def __repr__(self) -> str:
        return f"S3Store({self.root!r}, endpoint={self.config.endpoint!r})"

    def _key(self, rel: str) -> str:
        return _join(self.prefix, _clean_rel(rel))

    def uri(self, rel: str) -> str:
        return _join(self.root, _clean_rel(rel))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return _s3_call(self.retry, what, fn)

    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)
        return self._call(
            f"get {self.uri(rel)}",
            lambda: self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read(),
        )

    def _parquet_source(self, rel: str, ranged: bool) -> pa.NativeFile:
        if not ranged:
            return pa.BufferReader(self.read_bytes(rel))
        return pa.PythonFile(_S3RangeFile(self, rel), mode="r")

    def iter_bytes(self, rel: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        key = self._key(rel)
        what = f"get {self.uri(rel)}"
        body = self._call(
            what, lambda: self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        )
        try:
            while True:
                # A failure mid-stream cannot be retried transparently (the caller has chunks).
                chunk = _s3_call(RetryPolicy(attempts=1), what, lambda: body.read(chunk_size))
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    def write_bytes(self, rel: str, data: bytes) -> None:
        if len(data) > MULTIPART_THRESHOLD:
            self._upload(rel, lambda: io.BytesIO(data))
            return
        key = self._key(rel)
        self._call(
            f"put {self.uri(rel)}",
            lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data),
        )

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        # The opener's file is closed by the with-block in _upload, once per attempt.
        self._upload(rel, lambda: open(local_path, "rb"))  # noqa: SIM115

    def move(self, src: str, dst: str) -> None:
        src_key, dst_key = self._key(src), self._key(dst)
        self._call(
            f"copy {self.uri(src)} -> {self.uri(dst)}",
            lambda: self._client.copy_object(
                Bucket=self.bucket, Key=dst_key, CopySource={"Bucket": self.bucket, "Key": src_key}
            ),
        )
        self.delete(src)

    def _upload(self, rel: str, opener: Callable[[], Any]) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=4,
            use_threads=True,
        )
        key = self._key(rel)

        def once() -> None:
            # A failed multipart upload is aborted by s3transfer; the object stays unchanged.
            with opener() as f:
                self._client.upload_fileobj(f, self.bucket, key, Config=cfg)

        self._call(f"upload {self.uri(rel)}", once)

    def exists(self, rel: str) -> bool:
        key = self._key(rel)
        try:
            self._call(
                f"head {self.uri(rel)}",
                lambda: self._client.head_object(Bucket=self.bucket, Key=key),
            )
            return True
        except FileNotFoundError:
            return False

    def age_seconds(self, rel: str) -> float | None:
        # The server's Last-Modified against its own Date header: both the server's clock.
        from email.utils import parsedate_to_datetime

        key = self._key(rel)
        resp = self._call(
            f"head {self.uri(rel)}",
            lambda: self._client.head_object(Bucket=self.bucket, Key=key),
        )
        date = (resp.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
        modified = resp.get("LastModified")
        if not date or modified is None:
            return None
        try:
            now = parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return None
        return max(0.0, (now - modified).total_seconds())

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        folder = self._key(prefix)
        key_prefix = f"{folder}/" if folder else ""
        base_len = len(self.prefix) + 1 if self.prefix else 0

        def run() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key_prefix}
            if not recursive:
                kwargs["Delimiter"] = "/"
            for page in self._client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):  # folder markers some servers create
                        continue
                    etag = str(obj.get("ETag") or "")
                    out.append(ObjectInfo(key[base_len:], int(obj["Size"]), etag))
            return out

        out = self._call(f"list {self.uri(prefix)}", run)
        out.sort(key=lambda o: o.rel)
        return out

    def holds_any_object(self, sub: str = "") -> bool:
        """Whether some object lies under this store's prefix (or its folder ``sub``): one
        LIST of at most 2 keys."""
        key_prefix = "/".join(p for p in (self.prefix, sub.strip("/")) if p)
        key_prefix = f"{key_prefix}/" if key_prefix else ""

        def run() -> bool:
            page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=key_prefix, MaxKeys=2)
            return any(not o["Key"].endswith("/") for o in page.get("Contents", []))

        return self._call(f"list {self.uri('')}", run)

    def delete(self, rel: str) -> None:
        key = self._key(rel)
        self._call(
            f"delete {self.uri(rel)}",
            lambda: self._client.delete_object(Bucket=self.bucket, Key=key),
        )

    def delete_prefix(self, prefix: str) -> int:
        if not _clean_rel(prefix) and not self.prefix:
            raise StorageError("refusing to delete a whole bucket")
        objs = self.list(prefix)
        for i in range(0, len(objs), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(o.rel)} for o in objs[i : i + 1000]]

            def run(batch: list[dict[str, str]] = batch) -> None:
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if resp.get("Errors"):
                    raise StorageError(f"delete {self.uri(prefix)}: {resp['Errors'][:3]}")

            self._call(f"delete {self.uri(prefix)}", run)
        return len(objs)

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        key = self._key(rel)

        def get() -> tuple[bytes, str]:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            return resp["Body"].read(), str(resp["ETag"])

        return self._call(f"get {self.uri(rel)}", get)

    def _conditional(self, what: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import ClientError

        def once() -> T:
            try:
                return fn()
            except ClientError as exc:
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                code = str(exc.response.get("Error", {}).get("Code", ""))
                # 412: the condition failed; 409: a concurrent conditional write won the race;
                # 404 on a conditional delete: the object is gone.
                if status in (409, 412) or code in (
                    "PreconditionFailed",
                    "ConditionalRequestConflict",
                ):
                    raise PreconditionFailed(f"{what}: {code or status}") from exc
                raise

        return self._call(what, once)

    def write_if(self, rel: str, data: bytes, expect: str | None) -> str:
        # S3 conditional writes (If-None-Match: * / If-Match: <etag>); SeaweedFS >= 4 and AWS
        # both enforce them (checked in tests/test_lock.py against the real server).
        key = self._key(rel)
        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        resp = self._conditional(
            f"put-if {self.uri(rel)}",
            lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **cond),
        )
        return str(resp["ETag"])

    def delete_if(self, rel: str, expect: str) -> None:
        key = self._key(rel)
        try:
            self._conditional(
                f"delete-if {self.uri(rel)}",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=expect),
            )
        except FileNotFoundError as exc:
            raise PreconditionFailed(f"{self.uri(rel)}: gone") from exc

    def pyarrow_fs(self) -> tuple[pafs.FileSystem, str]:
        import pyarrow.fs as pafs

        # No credentials here: an S3FileSystem built with explicit keys pickles them, and this
        # one is sent to Ray workers. Without them the AWS SDK's default chain finds them in each
        # process's own environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN,
        # which local Ray workers inherit), profile or instance role, as S3Config.from_env does.
        kwargs: dict[str, Any] = {"region": self.config.region}
        if self.config.endpoint:
            ep = urlparse(self.config.endpoint)
            kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        # Bounded: a dead endpoint fails a call in seconds instead of the SDK's long defaults
        # (Ray Data retries on top; tasks/ray_faces.py bounds the whole stage).
        kwargs.update(
            connect_timeout=5,
            request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        fs = pafs.S3FileSystem(**kwargs)
        return fs, _join(self.bucket, self.prefix)


# The top-level folders a faceloop store writes (storage/layout.py); a store holds one of them.
STORE_FOLDERS = ("state", "tables", "datasets", "runs", "models", "audit", "reports", "staging")


def holds_anything(store: ObjectStore) -> bool:
    """Whether ``store`` holds any of a store's folders (an empty folder or prefix: a store no
    run has made yet, or a wrong path or an unmounted mount point). At most one short LIST per
    folder on S3."""
    if isinstance(store, LocalStore):
        return any(os.path.isdir(os.path.join(store.root, f)) for f in STORE_FOLDERS)
    if isinstance(store, S3Store):
        return any(store.holds_any_object(f) for f in STORE_FOLDERS)
    return any(store.list(f) for f in STORE_FOLDERS)


def holds_a_store(store: ObjectStore) -> bool:
    """Whether ``store`` is a faceloop store: a local folder that is empty (a fresh store) or
    holds one of :data:`STORE_FOLDERS`, or an S3 prefix holding one of them (at most one short
    LIST each, whatever the store's size). Commands that read or amend a store refuse a path
    without one: a mistyped ``--store`` is not an empty store, and a photo folder or bucket named
    by mistake must not get a store's state files."""
    if isinstance(store, LocalStore):
        if not os.path.isdir(store.root):
            return False
        with os.scandir(store.root) as it:
            if next(it, None) is None:
                return True
    return holds_anything(store)


def open_store(root: str, *, retry: RetryPolicy | None = None) -> ObjectStore:
    """The store at ``root``: a local path (or ``file://`` URI) or ``s3://bucket/prefix``."""
    if root.startswith("s3://"):
        return S3Store(root, retry=retry)
    if root.startswith("file://"):
        root = _file_uri_path(root)
    if "://" in root:
        raise StorageError(f"unsupported store URI: {root}")
    return LocalStore(root)


# --------------------------------------------------------------------------------------------
# URIs that may live anywhere (source images)


@functools.lru_cache(maxsize=64)
def _store_for_bucket(bucket: str, config: S3Config) -> S3Store:
    return S3Store(f"s3://{bucket}", config=config)


def read_uri_bytes(uri: str, etag: str | None = None) -> bytes:
    """Bytes of a local path (Windows drive paths included), ``file://`` URI or
    ``s3://bucket/key``.

    A ``file://`` URI's path is taken as is, not percent-decoded: :func:`list_uri` writes
    ``file://<path>`` without encoding, and this reads back exactly what it listed. Raises
    ``OSError`` for a local file that cannot be read, :class:`BadInputError`
    (``not_a_regular_file``) for a FIFO, socket or device (checked before reading, so it never
    blocks) and (``unreadable``) for any other scheme; storage errors pass through (a
    :class:`TransientStorageError` must reach the caller's retry logic). ``etag``: an S3
    object is read only while it has the ETag its listing gave (else ``changed_while_read``),
    so that the bytes hashed and the listing's stamp belong together.
    """
    if uri.startswith("s3://"):
        bucket, key = _split_s3(uri)
        store = _store_for_bucket(bucket, S3Config.from_env())

        # The key as the listing gave it: a store path is normalised (``a//b``, ``a\\b`` and
        # ``a/./b`` are ``a/b`` in the store), but a source key names its object verbatim, and
        # on S3 those are other objects than ``a/b``.
        def get() -> bytes:
            from botocore.exceptions import ClientError

            extra = {"IfMatch": etag} if etag else {}
            try:
                obj = store._client.get_object(Bucket=bucket, Key=key, **extra)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if etag and status == 412:
                    # Written over after the listing: its digest was recorded under the
                    # listing's ETag, and the old bytes put back were never read again.
                    raise BadInputError(
                        InputCode.CHANGED_WHILE_READ, "written over after it was listed"
                    ) from None
                raise
            return bytes(obj["Body"].read())

        return store._call(f"get {uri}", get)
    return b"".join(_iter_local(_local_path(uri)))


def _local_path(uri: str) -> str:
    """The local path of a local path or ``file://`` URI; BadInputError for other schemes."""
    if uri.startswith("file://"):
        try:
            return _file_uri_path(uri)
        except StorageError as exc:
            raise BadInputError(InputCode.UNREADABLE, str(exc)) from None
    scheme = urlparse(uri).scheme
    if scheme == "" or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        return uri
    raise BadInputError(InputCode.UNREADABLE, f"unsupported URI scheme {scheme!r}")


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


def _iter_local(path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A local regular file's bytes. Opened non-blocking and checked with fstat before any read:
    a FIFO or device put where a photo was listed raises BadInputError (never blocks)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadInputError(InputCode.NOT_A_REGULAR_FILE, f"a {_file_kind(mode)}, not a file")
        while chunk := f.read(chunk_size):
            yield chunk


def sha256_uri(uri: str, etag: str | None = None) -> tuple[str, int]:
    """``(hex sha256, size)`` of a source file, streamed (local paths, ``file://``, ``s3://``).

    Raises FileNotFoundError (gone), OSError (unreadable), BadInputError (not a regular file)
    and, for S3, the storage errors of :func:`read_uri_bytes`.
    """
    if uri.startswith("s3://"):
        data = read_uri_bytes(uri, etag)  # (etag: see read_uri_bytes)
        return hashlib.sha256(data).hexdigest(), len(data)
    return sha256_chunks(_iter_local(_local_path(uri)))


def remote_sha256(uri: str) -> str | None:
    """The sha256 of the object at ``uri`` as it is now (:func:`faceloop.hashing.image_keys`'s
    ``remote``); None when there is none or it cannot be read (the store's records of the URI
    still count; a warning says so)."""
    try:
        return sha256_uri(uri)[0]
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning(
            "could not read %s (%s: %s): only what the store recorded under it is found",
            uri,
            type(exc).__name__,
            exc,
        )
        return None


class _S3RangeFile(io.RawIOBase):
    """One S3 object as a read-only seekable file, through ranged GETs: a Parquet reader
    fetches the footer and the column chunks it reads, not the object. The first request takes
    the object's tail (its size comes with it; a small object is whole in it), which holds the
    footer; every later one asks for the same version (If-Match on its ETag), so a file
    replaced while it is read fails instead of mixing two versions."""

    TAIL = 64 << 10

    def __init__(self, store: S3Store, rel: str) -> None:
        super().__init__()
        self._store, self._key, self._what = store, store._key(rel), f"get {store.uri(rel)}"
        resp = store._call(
            self._what,
            lambda: store._client.get_object(
                Bucket=store.bucket, Key=self._key, Range=f"bytes=-{self.TAIL}"
            ),
        )
        self._tail = resp["Body"].read()
        total = resp.get("ContentRange", "").rsplit("/", 1)[-1]
        self._size = int(total) if total.isdigit() else len(self._tail)
        self._tail_at = self._size - len(self._tail)
        self._etag = resp.get("ETag")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        # Fills ``b`` up to the end of the object: a reader may take a short read for the end.
        want = min(len(b), self._size - self._pos)
        got = 0
        while got < want:
            lo = self._pos
            if lo >= self._tail_at:
                data = self._tail[lo - self._tail_at : lo - self._tail_at + want - got]
            else:
                hi = min(lo + want - got, self._tail_at)  # the rest is in the tail
                data = self._get(lo, hi)
            if not data:
                break
            b[got : got + len(data)] = data
            got += len(data)
            self._pos += len(data)
        return got

    def _get(self, lo: int, hi: int) -> bytes:
        """Bytes ``lo`` to ``hi`` (exclusive) of the version whose tail was read."""
        extra = {"IfMatch": self._etag} if self._etag else {}
        store = self._store
        return bytes(
            store._call(
                self._what,
                lambda: store._client.get_object(
                    Bucket=store.bucket, Key=self._key, Range=f"bytes={lo}-{hi - 1}", **extra
                )["Body"].read(),
            )
        )


@dataclass(frozen=True)
class SourceEntry:
    """One entry a source lists: ``problem`` is None for a regular file (a symlink to one inside
    the source included), else why it cannot be an image; such entries are never opened.

    ``stamp`` says, without reading a byte, whether the file may have changed since it was last
    hashed: ``"<size>:<mtime_ns>:<inode>"`` of the file (a symlink's target) locally,
    ``"<size>:<ETag>"`` on S3; ``""`` when there is none (problem entries). ``mtime`` (seconds,
    local only, else None) lets discovery refuse to trust a stamp taken within the file
    system's timestamp granularity of a write (tasks/discover.py)."""

    uri: str
    size: int
    problem: Reason | None = None
    stamp: str = ""
    mtime: float | None = None


def local_source_stat(uri: str) -> os.stat_result:
    """The ``stat`` of a local source's root (a symlink there is followed); SourceError when it
    is missing or cannot be read. A refresh asks before it touches the store, so a mistyped
    source leaves no store folder behind."""
    try:
        return os.stat(_local_path(uri))
    except FileNotFoundError:
        raise SourceError(
            f"source {uri} does not exist: create it or fix the source's path (the config's "
            "sources:, FACELOOP_SOURCES or --source)"
        ) from None
    except OSError as exc:
        raise SourceError(
            f"source {uri} cannot be read ({exc.strerror}): fix its permissions or the config"
        ) from None


def list_source(uri: str) -> list[SourceEntry]:
    """Every entry under a source ``uri`` (recursive), sorted by URI; a URI naming one object
    gives just that object.

    Local sources are walked with ``lstat``, never following a symlink to a folder and never
    opening anything: FIFOs, sockets, devices, dangling symlinks, symlinks that resolve outside
    the source root and folders that cannot be listed come back with their ``problem``. Raises
    :class:`SourceError` when the source itself is missing or cannot be listed. An S3 prefix
    without objects is empty (S3 has no folders to be missing).
    """
    if uri.startswith("s3://"):
        bucket, key = _split_s3(uri)
        store = _store_for_bucket(bucket, S3Config.from_env())
        infos = store.list(key)
        if not infos and key and store.exists(key):
            size, etag = _head(store, key)
            return [SourceEntry(f"s3://{bucket}/{key}", size, stamp=f"{size}:{etag}")]
        if not infos:
            log.warning("source %s has no objects", uri)
        return [
            SourceEntry(
                f"s3://{bucket}/{info.rel}",
                info.size,
                stamp=f"{info.size}:{info.etag}" if info.etag else "",
            )
            for info in infos
        ]
    file_scheme = uri.startswith("file://")
    base = _local_path(uri)

    def name(p: str) -> str:
        return f"file://{p}" if file_scheme else p

    st = local_source_stat(uri)
    if stat.S_ISREG(st.st_mode):
        return [_regular(uri, st)]
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(
            f"source {uri} is a {_file_kind(st.st_mode)}, not a folder: fix the config"
        )
    root_real = os.path.realpath(base)
    out: list[SourceEntry] = []
    folders = [base]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                paths = [e.path for e in it]
        except OSError as exc:
            if folder == base:
                raise SourceError(
                    f"source {uri} cannot be listed ({exc.strerror}): fix its permissions"
                ) from None
            why = Reason(InputCode.UNREADABLE, f"{UNLISTED_FOLDER}: {exc.strerror}")
            out.append(SourceEntry(name(folder), 0, why))
            continue
        for p in paths:
            if (escaped := _non_utf8(name(p))) is not None:
                # No string can carry such a name into the tables (Parquet strings are UTF-8):
                # recorded under its escaped form, neither opened nor, for a folder, walked.
                what = "folder" if os.path.isdir(p) and not os.path.islink(p) else "file"
                why = Reason(
                    InputCode.NON_UTF8_NAME,
                    f"the {what} name is not valid UTF-8"
                    + (" (its files are not listed)" if what == "folder" else "")
                    + ": rename it",
                )
                out.append(SourceEntry(escaped, 0, why))
                continue
            entry = _local_entry(p, root_real, name(p))
            if entry is None:
                folders.append(p)
            else:
                out.append(entry)
    out.sort(key=lambda e: e.uri)
    return out


def _non_utf8(path: str) -> str | None:
    """None when ``path`` (as ``os.scandir`` gives it: undecodable bytes as lone surrogates) is
    valid UTF-8; else the path with those bytes written ``\\xNN``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None


def _regular(uri: str, st: os.stat_result) -> SourceEntry:
    """The entry of a regular file from its (l)stat: size, and the stamp of SourceEntry."""
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    return SourceEntry(uri, st.st_size, stamp=stamp, mtime=st.st_mtime_ns / 1e9)


def _local_entry(path: str, root_real: str, uri: str) -> SourceEntry | None:
    """The entry of one local path (None: a real folder, to walk). Only stats, never opens."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return SourceEntry(uri, 0, Reason(InputCode.VANISHED, "listed, then gone"))
    except OSError as exc:
        return SourceEntry(uri, 0, Reason(InputCode.UNREADABLE, f"lstat: {exc.strerror}"))
    mode = lst.st_mode
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISREG(mode):
        return _regular(uri, lst)
    if not stat.S_ISLNK(mode):
        why = Reason(InputCode.NOT_A_REGULAR_FILE, f"a {_file_kind(mode)}, not a file")
        return SourceEntry(uri, 0, why)
    target = os.path.realpath(path)
    if target != root_real and not target.startswith(root_real.rstrip(os.sep) + os.sep):
        why = Reason(InputCode.OUTSIDE_SOURCE_ROOT, "symlink to a path outside the source")
        return SourceEntry(uri, 0, why)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return SourceEntry(uri, 0, Reason(InputCode.DANGLING_SYMLINK, "symlink to nothing"))
    except OSError as exc:
        return SourceEntry(uri, 0, Reason(InputCode.UNREADABLE, f"stat: {exc.strerror}"))
    if stat.S_ISREG(st.st_mode):
        return _regular(uri, st)
    # A symlink to a folder is not walked (it could loop or list files twice).
    why = Reason(InputCode.NOT_A_REGULAR_FILE, f"symlink to a {_file_kind(st.st_mode)}")
    return SourceEntry(uri, 0, why)


def list_uri(uri: str) -> Iterator[tuple[str, int]]:
    """Every readable-looking object under ``uri`` (recursive), as ``(uri, size)`` sorted by
    URI (:func:`list_source` without its problem entries). A URI naming one object yields just
    that object; a missing location yields nothing."""
    try:
        entries = list_source(uri)
    except SourceError:
        return
    for e in entries:
        if e.problem is None:
            yield e.uri, e.size


def _head(store: S3Store, key: str) -> tuple[int, str]:
    """``(size, ETag)`` of one object (a HEAD: no bytes)."""
    resp = store._call(
        f"head {store.uri(key)}", lambda: store._client.head_object(Bucket=store.bucket, Key=key)
    )
    return int(resp["ContentLength"]), str(resp.get("ETag") or "")


def sha256_of(store: ObjectStore, rel: str) -> tuple[str, int]:
    """``(hex sha256, size)`` of an object, streamed."""
    return sha256_chunks(store.iter_bytes(rel))
