"""ObjectStore contract, run against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
import os
import socket
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from faceloop.errors import ConfigError, StorageError, TransientStorageError
from faceloop.localnet import free_port
from storage.objectstore import (
    LocalStore,
    ObjectInfo,
    RetryPolicy,
    S3Store,
    list_uri,
    open_store,
    read_uri_bytes,
    sha256_of,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_root"))


def test_open_store_kinds(tmp_path, s3_root):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s = open_store(s3_root + "/")
    assert isinstance(s, S3Store) and s.uri("a/b") == s3_root + "/a/b"
    with pytest.raises(StorageError):
        open_store("gs://x/y")


def test_bytes_roundtrip_list_delete(store):
    store.write_bytes("a/one.bin", b"1")
    store.write_bytes("a/b/two.bin", b"22")
    store.write_bytes("ab/three.bin", b"333")
    store.write_bytes("a/one.bin", b"111")  # replace
    assert store.read_bytes("a/one.bin") == b"111"
    assert store.exists("a/one.bin") and not store.exists("a/nope") and not store.exists("a")
    assert store.list("a") == [ObjectInfo("a/b/two.bin", 2), ObjectInfo("a/one.bin", 3)]
    assert store.list("a", recursive=False) == [ObjectInfo("a/one.bin", 3)]
    assert [o.rel for o in store.list("")] == ["a/b/two.bin", "a/one.bin", "ab/three.bin"]
    assert store.list("missing") == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/nope")
    with pytest.raises(StorageError):
        store.read_bytes("../escape")
    store.delete("a/one.bin")
    store.delete("a/one.bin")  # idempotent
    assert not store.exists("a/one.bin")
    assert store.delete_prefix("a") == 1
    assert [o.rel for o in store.list("")] == ["ab/three.bin"]
    assert sha256_of(store, "ab/three.bin")[1] == 3


def test_big_object_multipart(store, tmp_path):
    data = os.urandom(20 * 1024 * 1024)  # above the multipart threshold
    store.write_bytes("big/blob", data)
    assert store.read_bytes("big/blob") == data
    assert b"".join(store.iter_bytes("big/blob")) == data
    p = tmp_path / "f.bin"
    p.write_bytes(data[: 6 * 1024 * 1024])
    store.put_file("big/file", p)
    assert store.list("big") == [
        ObjectInfo("big/blob", len(data)),
        ObjectInfo("big/file", 6 * 1024 * 1024),
    ]


def test_parquet_file_and_folder(store):
    t1 = pa.table({"k": [1, 2, 3], "v": ["a", "b", "c"]})
    t2 = pa.table({"k": [4], "v": ["d"]})
    store.write_parquet("tbl/p1.parquet", t1)
    store.write_parquet("tbl/sub/p2.parquet", t2)
    assert store.read_parquet("tbl/p1.parquet").equals(t1)
    both = store.read_parquet("tbl", columns=["k"], filter=pc.field("k") >= 2)
    assert both.column("k").to_pylist() == [2, 3, 4]
    with pytest.raises(FileNotFoundError):
        store.read_parquet("nothing")
    schema = pa.schema([("k", pa.int64()), ("v", pa.string())])
    assert store.read_parquet("nothing", schema=schema).schema == schema


def test_local_writes_go_in_bounded_calls(tmp_path, monkeypatch):
    """A local store writes an object in calls of at most WRITE_CHUNK bytes (one call of
    several MB gets huge page-cache folios, slow on some VMs), and the object is whole:
    bytes, an Arrow buffer (write_parquet's, written without a copy) and the reader's cache."""
    import storage.objectstore as objectstore

    monkeypatch.setattr(objectstore, "WRITE_CHUNK", 1000)
    calls: list[int] = []
    real_open = open

    class Counting(io.FileIO):
        def write(self, b):  # type: ignore[override]
            calls.append(len(memoryview(b)))
            return super().write(b)

    def counting_open(path, mode="r", *args, **kwargs):
        if mode == "wb":
            return Counting(path, "wb")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(objectstore, "open", counting_open, raising=False)
    st = open_store(str(tmp_path / "store"))
    data = os.urandom(4321)
    st.write_bytes("a/blob", data)
    assert st.read_bytes("a/blob") == data
    assert calls == [1000, 1000, 1000, 1000, 321]
    calls.clear()
    t = pa.table({"k": list(range(2000)), "v": [f"x{i}" for i in range(2000)]})
    st.write_parquet("a/t.parquet", t)
    assert st.read_parquet("a/t.parquet").equals(t)
    assert calls and max(calls) == 1000 and sum(calls) == os.path.getsize(st.uri("a/t.parquet"))
    calls.clear()
    objectstore.write_chunked(tmp_path / "empty", b"")
    assert (tmp_path / "empty").read_bytes() == b"" and calls == []


def test_parquet_columns_read_only_their_bytes(store, monkeypatch):
    """A few small columns of a large object (a shard's keys beside its crops) are read
    without its other bytes: a local file is opened and read where the reader seeks; on S3
    the tail (with the footer) and the columns' ranges are fetched, not the object. Same
    table as a whole read; a missing object or a folder is FileNotFoundError."""
    import numpy as np

    n = 2000
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(2000) for _ in range(n)]  # incompressible: ~4 MB of "crops"
    t = pa.table({"face_id": [f"f{i:05d}" for i in range(n)], "image": blobs, "q": range(n)})
    store.write_parquet("ds/shard.parquet", t, row_group_size=500)
    fetched: list[int] = []
    if isinstance(store, S3Store):
        real = store._client.get_object

        def counting(**kw):
            resp = real(**kw)
            body = resp["Body"].read()
            fetched.append(len(body))
            resp["Body"] = io.BytesIO(body)
            return resp

        monkeypatch.setattr(store._client, "get_object", counting)
    keys = store.read_parquet_columns("ds/shard.parquet", ["face_id", "q", "absent"])
    assert keys.equals(t.select(["face_id", "q"]))
    assert store.read_parquet_file("ds/shard.parquet", columns=["q"]).equals(t.select(["q"]))
    if isinstance(store, S3Store):
        ranged = sum(fetched[:-1])  # the last read_parquet_file above is one whole GET
        assert len(fetched) >= 3 and ranged < 200_000, fetched  # the object: ~4 MB
    with pytest.raises(FileNotFoundError):
        store.read_parquet_columns("ds/missing.parquet", ["face_id"])
    with pytest.raises(FileNotFoundError):
        store.read_parquet_columns("ds", ["face_id"])


@pytest.mark.parametrize("read_whole_max", [2 << 20, 0])
def test_parquet_reads_small_and_large_files_alike(tmp_path, monkeypatch, read_whole_max):
    """A file of at most one batch's rows is decoded whole, a larger one in batches; a local
    file up to _READ_WHOLE_MAX bytes is read in one call, a larger one column chunk by column
    chunk (0: every file): the same table every way (values, types, nulls, the schema's
    metadata), whatever columns."""
    import numpy as np
    import pyarrow.parquet as pq

    import storage.objectstore as objectstore
    from storage.objectstore import _READ_BATCH_ROWS

    monkeypatch.setattr(objectstore, "_READ_WHOLE_MAX", read_whole_max)

    store = open_store(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    schema = pa.schema(
        [
            ("face_id", pa.string()),
            ("embedding", pa.list_(pa.field("element", pa.float32()))),
            ("bbox", pa.list_(pa.field("element", pa.float32()), 4)),
            ("q", pa.float32()),
        ],
        metadata={"faceloop.write_id": "w1"},
    )
    for n in (0, 7, _READ_BATCH_ROWS, _READ_BATCH_ROWS + 1, 3 * _READ_BATCH_ROWS + 5):
        emb = [None if i % 5 == 3 else rng.random(8).astype(np.float32).tolist() for i in range(n)]
        t = pa.table(
            {
                "face_id": [f"f{i:05d}" for i in range(n)],
                "embedding": emb,
                "bbox": [[float(i)] * 4 for i in range(n)],
                "q": [None if i % 7 == 0 else i / 10 for i in range(n)],
            },
            schema=schema,
        )
        store.write_parquet(f"t/{n}.parquet", t, row_group_size=700)
        path = str(tmp_path / "store" / "t" / f"{n}.parquet")
        for cols in (None, ["q", "embedding", "absent"]):
            got = store.read_parquet_file(f"t/{n}.parquet", columns=cols)
            want = t if cols is None else t.select(["q", "embedding"])
            assert got.equals(want, check_metadata=True)
            ref = pq.read_table(path, columns=None if cols is None else ["q", "embedding"])
            assert got.equals(ref, check_metadata=True)


def test_s3_range_file_reads_across_its_tail(s3_root):
    """The ranged view of an S3 object: reads before, inside and across the tail it fetched
    first, and to the end, give the object's bytes (a read is never short before the end)."""
    from storage.objectstore import _S3RangeFile

    store = open_store(s3_root)
    data = os.urandom(200_000)
    store.write_bytes("blob", data)
    f = _S3RangeFile(store, "blob")
    cut = len(data) - _S3RangeFile.TAIL
    for lo, n in [(0, 1000), (cut - 500, 1000), (cut + 10, 300), (len(data) - 100, 500)]:
        f.seek(lo)
        assert f.read(n) == data[lo : lo + n]
    f.seek(-7, io.SEEK_END)
    assert f.read() == data[-7:] and f.read(10) == b""
    f.seek(0)
    assert f.read() == data


def test_pyarrow_fs_sees_the_store(store):
    store.write_parquet("ds/x.parquet", pa.table({"k": [1, 2]}))
    fs, base = store.pyarrow_fs()
    assert pads.dataset(f"{base}/ds", filesystem=fs).to_table().num_rows == 2
    pads.write_dataset(pa.table({"k": [7]}), f"{base}/out", filesystem=fs, format="parquet")
    assert store.read_parquet("out").column("k").to_pylist() == [7]


def test_uri_helpers_local(tmp_path):
    (tmp_path / "src" / "g").mkdir(parents=True)
    (tmp_path / "src" / "g" / "b.jpg").write_bytes(b"bb")
    (tmp_path / "src" / "a.jpg").write_bytes(b"a")
    got = list(list_uri(str(tmp_path / "src")))
    assert got == [(str(tmp_path / "src" / "a.jpg"), 1), (str(tmp_path / "src" / "g" / "b.jpg"), 2)]
    assert next(u for u, _ in list_uri(f"file://{tmp_path}/src")).startswith("file://")
    assert read_uri_bytes(f"file://{tmp_path}/src/g/b.jpg") == b"bb"
    assert list(list_uri(str(tmp_path / "missing"))) == []


def test_uri_helpers_s3(s3_root):
    s = open_store(s3_root)
    s.write_bytes("src/g/b.jpg", b"bb")
    s.write_bytes("src/a.jpg", b"a")
    assert list(list_uri(s3_root + "/src")) == [
        (s3_root + "/src/a.jpg", 1),
        (s3_root + "/src/g/b.jpg", 2),
    ]
    assert list(list_uri(s3_root + "/src/a.jpg")) == [(s3_root + "/src/a.jpg", 1)]
    assert read_uri_bytes(s3_root + "/src/g/b.jpg") == b"bb"
    with pytest.raises(FileNotFoundError):
        read_uri_bytes(s3_root + "/src/none.jpg")


# Characters a URL parser reads as a query, a fragment or parameters, and others S3 keys and
# file names may hold: every one is part of the name.
ODD_NAMES = ["photo#2.jpg", "what?.jpg", "x;y.jpg", "a b+c.jpg", "%41.jpg", "caf\u00e9 \u4e2d.jpg"]


def test_uri_helpers_read_names_that_look_like_url_syntax(s3_root, tmp_path):
    """An S3 key or a ``file://`` path with ``#``, ``?`` or ``;`` names that object, not a
    shorter one (a URL parser cut ``photo#2.jpg`` to ``photo``: the file read as vanished, or
    another object's bytes taken for it)."""
    from storage.objectstore import sha256_uri

    s = open_store(s3_root)
    s.write_bytes("src/g/photo", b"another object")
    for i, name in enumerate(ODD_NAMES):
        s.write_bytes(f"src/g/{name}", f"bytes {i}".encode())
        (tmp_path / name).write_bytes(f"local {i}".encode())
    listed = dict(list_uri(s3_root + "/src/g"))
    assert set(listed) == {f"{s3_root}/src/g/{n}" for n in [*ODD_NAMES, "photo"]}
    for i, name in enumerate(ODD_NAMES):
        uri = f"{s3_root}/src/g/{name}"
        assert read_uri_bytes(uri) == f"bytes {i}".encode(), name
        assert sha256_uri(uri)[0] == sha256_of(s, f"src/g/{name}")[0], name
        assert list(list_uri(uri)) == [(uri, len(f"bytes {i}"))], name
        assert read_uri_bytes(f"file://{tmp_path}/{name}") == f"local {i}".encode(), name
        assert read_uri_bytes(str(tmp_path / name)) == f"local {i}".encode(), name


def test_a_source_key_is_read_verbatim(s3_root):
    """A source object is read by the key its listing gave, not normalised as a store path is:
    on S3 ``src//a.jpg``, ``src/./a.jpg`` and ``src\\a.jpg`` are other objects than ``src/a.jpg``
    (reading that one instead took another image's bytes for theirs). The GET requests sent to
    the real server are watched (SeaweedFS itself folds such keys, so their bytes cannot show
    it)."""
    import contextlib

    s = open_store(s3_root)
    s.write_bytes("src/a.jpg", b"a")
    keys: list[str] = []

    def watch(params: dict, **kwargs: object) -> None:
        keys.append(params["Key"])

    events = s._client.meta.events
    events.register("provide-client-params.s3.GetObject", watch)
    odd = ["src//a.jpg", "src/./a.jpg", "src\\a.jpg"]
    try:
        for name in odd:
            with contextlib.suppress(FileNotFoundError, StorageError):
                read_uri_bytes(f"{s3_root}/{name}")
    finally:
        events.unregister("provide-client-params.s3.GetObject", watch)
    assert keys == [f"{s.prefix}/{name}" for name in odd]
    assert read_uri_bytes(f"{s3_root}/src/a.jpg") == b"a"


def test_wrong_secret_is_permanent(s3_env, s3_root, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s = open_store(s3_root, retry=RetryPolicy(attempts=5, base_s=0.5))
    with pytest.raises(StorageError) as info:
        s.write_bytes("x", b"1")
    assert not isinstance(info.value, TransientStorageError)
    assert not any("retry" in r.message for r in caplog.records)  # permanent: no retries
    assert "not-the-secret" not in str(info.value)


def test_connection_refused_is_transient_and_bounded(monkeypatch, caplog):
    port = free_port()
    monkeypatch.setenv("FACELOOP_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s = open_store("s3://bucket/p", retry=RetryPolicy(attempts=4, base_s=0.01, cap_s=0.05))
    # the endpoint that refused is named (it said only "EndpointConnectionError")
    with pytest.raises(TransientStorageError, match=rf"4 attempts.*\(http://127.0.0.1:{port}\)"):
        s.read_bytes("x")
    assert sum("retry" in r.message for r in caplog.records) == 3


def test_an_endpoint_that_never_answers_is_given_up_on_by_the_deadline(monkeypatch):
    """An endpoint that took the connection and never answered held every command for minutes:
    a 60 s read timeout per attempt, five attempts. The retries now stop at a deadline."""
    import socket
    import threading
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(srv.accept()[0])  # taken, never answered
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("FACELOOP_S3_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        monkeypatch.setenv("FACELOOP_S3_READ_TIMEOUT_S", "0.5")
        monkeypatch.setenv("FACELOOP_S3_DEADLINE_S", "1.2")
        s = open_store("s3://bucket/silent")  # the default policy: five attempts
        start = time.monotonic()
        with pytest.raises(TransientStorageError, match=r"gave up after [23] attempts in \d+ s"):
            s.read_bytes("x")
        assert time.monotonic() - start < 4
    finally:
        done.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


def test_an_endpoint_without_its_scheme_is_named(monkeypatch):
    """FACELOOP_S3_ENDPOINT=127.0.0.1:8333 failed inside botocore: 'Invalid endpoint'."""
    monkeypatch.setenv("FACELOOP_S3_ENDPOINT", "127.0.0.1:8333")
    with pytest.raises(ConfigError, match=r"like http://127.0.0.1:8333"):  # exit 2
        open_store("s3://bucket/p").read_bytes("x")
    # A mistyped scheme was botocore's EndpointResolutionError at the first call (exit 1).
    monkeypatch.setenv("FACELOOP_S3_ENDPOINT", "htp://127.0.0.1:8333")
    with pytest.raises(ConfigError, match=r"like http://127.0.0.1:8333"):
        open_store("s3://bucket/p").read_bytes("x")
    # Credentials in the URL were printed with it in every retry warning and error.
    monkeypatch.setenv("FACELOOP_S3_ENDPOINT", "http://key:pw-SECRET@127.0.0.1:8333")
    with pytest.raises(ConfigError, match=r"holds credentials") as info:
        open_store("s3://bucket/p").read_bytes("x")
    assert "pw-SECRET" not in str(info.value)


def test_an_upper_case_s3_scheme_is_the_s3_scheme(tmp_path):
    """`S3://bucket/x` passed the config and failed at the store as "unsupported store URI"
    (a source: "unsupported URI scheme 's3'"), exit 1."""
    from faceloop.config import load_settings

    s = load_settings(None, store="S3://bucket/x", sources=[{"kind": "album", "uri": "S3://b/y/"}])
    assert s.store == "s3://bucket/x" and s.sources[0].uri == "s3://b/y"


class _FlakyS3Proxy:
    """An HTTP server answering the first ``fail`` requests with 503 SlowDown, later ones 404."""

    def __init__(self, fail: int) -> None:
        self.fail, self.seen, self.stop = fail, 0, False
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)  # so close() does not wait on a blocked accept
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                conn.recv(65536)
                self.seen += 1
                if self.seen <= self.fail:
                    status, body = b"503 Slow Down", b"<Error><Code>SlowDown</Code></Error>"
                else:
                    status, body = b"404 Not Found", b"<Error><Code>NoSuchKey</Code></Error>"
                conn.sendall(
                    b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (status, len(body), body)
                )

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.mark.parametrize(
    "fail, expected, seen", [(2, FileNotFoundError, 3), (10, TransientStorageError, 3)]
)
def test_5xx_retried_then_mapped(monkeypatch, fail, expected, seen):
    proxy = _FlakyS3Proxy(fail=fail)
    try:
        monkeypatch.setenv("FACELOOP_S3_ENDPOINT", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        s = open_store("s3://bucket/p", retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02))
        with pytest.raises(expected):
            s.read_bytes("x")  # a GET: a PUT would wait for "100 Continue" first
        assert proxy.seen == seen
    finally:
        proxy.close()


def _read_in_child(store, rel: str, parent_client_id: int, q) -> None:
    try:
        data = [store.read_bytes(rel) for _ in range(20)]
        q.put(
            (id(store._client) != parent_client_id, all(d == data[0] for d in data), len(data[0]))
        )
    except BaseException as exc:
        q.put(repr(exc))


def test_forked_children_get_their_own_s3_client(s3_root):
    # DataLoader workers fork from a process that already talked to S3. A child that reused the
    # parent's client would share its pooled sockets, and concurrent reads would interleave
    # (CI saw botocore FlexibleChecksumError this way).
    import multiprocessing as mp

    store = open_store(s3_root)
    payload = os.urandom(3 << 20)
    store.write_bytes("fork/blob.bin", payload)
    assert store.read_bytes("fork/blob.bin") == payload  # the parent's pool now holds a socket
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    children = [
        ctx.Process(target=_read_in_child, args=(store, "fork/blob.bin", id(store._client), q))
        for _ in range(3)
    ]
    for c in children:
        c.start()
    for _ in range(20):  # the parent keeps reading on its own socket meanwhile
        assert store.read_bytes("fork/blob.bin") == payload
    results = [q.get(timeout=120) for _ in children]
    for c in children:
        c.join(timeout=60)
    assert results == [(True, True, len(payload))] * 3


def test_holds_a_store_tells_a_store_from_a_mistyped_path(store):
    """doctor, explain, datasets, forget and review refuse a path without a store: forget on a
    typo wrote its tombstones into a new folder and the person stayed in the real store."""
    from storage.objectstore import holds_a_store, open_store

    assert not holds_a_store(sibling := open_store(store.uri("").rstrip("/") + "-none"))
    if isinstance(store, LocalStore):
        os.makedirs(store.root)
        assert holds_a_store(store), "an empty folder is a fresh store"
    # A photo folder or bucket is no store: forget wrote its secret and tombstones into one.
    store.write_bytes("albums/a1/p.jpg", b"jpeg")
    assert not holds_a_store(store)
    store.write_bytes("datasets/faces/latest", b"1")  # a store that holds only datasets counts
    assert holds_a_store(store)
    sibling = open_store(store.uri("").rstrip("/") + "-typo")
    assert not holds_a_store(sibling)


@pytest.mark.parametrize(
    "name,value",
    [
        ("FACELOOP_S3_RETRIES", "0"),
        ("FACELOOP_S3_RETRIES", "abc"),
        ("FACELOOP_S3_DEADLINE_S", "-5"),
        ("FACELOOP_S3_DEADLINE_S", "nan"),
        ("FACELOOP_S3_RETRY_BASE_S", "x"),
    ],
)
def test_s3_tuning_variables_are_checked(monkeypatch, name, value):
    """FACELOOP_S3_RETRIES=0 failed with "AssertionError: unreachable" at the first request,
    'abc' with a bare ValueError (exit 1), and a negative deadline was taken; a setting to fix
    is a ConfigError naming it (exit 2)."""
    from faceloop.errors import ConfigError
    from storage.objectstore import _default_retry

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        _default_retry()


def test_an_interrupted_face_stage_in_this_process_writes_nothing_after_it(tmp_path, monkeypatch):
    """SIGTERM during the face stage in the driver: the refresh removed the run's staging while
    the stage's thread went on writing detection parts into it, and `doctor` then reported an
    orphan staging and stale temp files."""
    import threading
    import time as _time

    import tasks.ray_faces as rf

    store = open_store(str(tmp_path / "store"))
    stop = threading.Event()
    written: list[float] = []

    def work() -> None:
        while not stop.is_set():
            written.append(_time.monotonic())
            _time.sleep(0.01)

    def interrupted(t, st, deadline):
        _time.sleep(0.1)
        raise KeyboardInterrupt

    monkeypatch.setattr(rf, "_watch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rf._bounded(work, store, 10.0, stop)
    after = _time.monotonic()
    assert stop.is_set() and written
    _time.sleep(0.1)
    assert not [w for w in written if w > after]  # the stage had stopped when it returned


def test_an_s3_object_written_over_after_its_listing_is_not_hashed_under_its_stamp(s3_root):
    """Listed at ETag A, written over with B before discovery read it: B's digest was recorded
    under A's stamp, and when A was put back the next refresh trusted the stamp (A never read,
    the store sure the path held B). It is read at the listed ETag only."""
    import hashlib

    from storage.objectstore import list_source
    from tasks.discover import _hash

    st = open_store(s3_root)
    st.write_bytes("src/a1/x.jpg", b"photo A" * 50)
    (entry,) = list_source(f"{s3_root}/src")
    assert _hash(entry) == (hashlib.sha256(b"photo A" * 50).hexdigest(), None)
    st.write_bytes("src/a1/x.jpg", b"photo B" * 50)  # same size, another ETag
    digest, why = _hash(entry)
    assert why is not None and why.code == "changed_while_read" and digest.startswith("unread:")
    (again,) = list_source(f"{s3_root}/src")
    assert _hash(again) == (hashlib.sha256(b"photo B" * 50).hexdigest(), None)
