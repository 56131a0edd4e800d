"""faceloop's local Ray is private: its own instance (never a cluster left on the machine), token
authentication on, every port on 127.0.0.1; and ``ray.address`` still joins the cluster it names.

A stray cluster is started with the venv's ``ray start`` (loopback only, its own token) under a
private ``RAY_TMPDIR``, so its ``ray_current_cluster`` file is the one ``ray.init()`` would read;
it is killed by process (its session's processes only, never ``ray stop``) at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from faceloop.config import RaySettings
from tasks.ray_faces import init_ray, ray_start_seconds

pytestmark = pytest.mark.integration

RAY_CLI = Path(sys.executable).with_name("ray")
# Ray's single-node switch: with it off a node keeps 127.0.0.1 as its IP (see tasks/ray_faces.py).
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class Stray:
    gcs_address: str
    node_id: str
    token: str
    session_dir: Path
    procs: list[psutil.Process] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _procs_mentioning(text: str) -> list[psutil.Process]:
    """Processes whose command line mentions ``text``, and all their descendants."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(text in a for a in p.info["cmdline"] or ()):
            found[p.pid] = p
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _canonical_ip(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)  # an IPv6 socket bound to ::ffff:127.0.0.1 is IPv4 loopback
    return str(addr)


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    """A private RAY_TMPDIR for this module (short: Ray's unix socket paths have a length limit)."""
    _shutdown_ray()  # a Ray left by another module would make init_ray a no-op
    d = Path(tempfile.mkdtemp(prefix="flr-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(d))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield d
    _shutdown_ray()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def stray(ray_tmp: Path) -> Iterator[Stray]:
    """A cluster left running by ``ray start`` on this machine, as a stray one would be."""
    port = _free_port()
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        SINGLE_NODE_ENV: "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(RAY_CLI),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    session_dir: Path | None = None
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
        session_dir = (ray_tmp / "ray" / "session_latest").resolve()
        procs = _procs_mentioning(str(session_dir))
        raylet = [p for p in procs if p.name() == "raylet"]
        assert len(raylet) == 1, [p.name() for p in procs]
        node_id = next(
            a.split("=", 1)[1] for a in raylet[0].cmdline() if a.startswith("--node_id=")
        )
        yield Stray(f"127.0.0.1:{port}", node_id, token, session_dir, procs)
    finally:
        # Only this session's processes: other Ray instances on the machine are not ours to stop.
        _kill(_procs_mentioning(str(session_dir or ray_tmp)))


def _assert_private_not_stray(stray: Stray) -> None:
    import ray

    try:
        before = ray_start_seconds()
        took = init_ray(RaySettings())  # no ray.address
        # The start is timed and counted for the process; a second call finds Ray up.
        assert took > 0 and ray_start_seconds() == pytest.approx(before + took)
        assert init_ray(RaySettings()) == 0.0
        gcs = ray.get_runtime_context().gcs_address
        node_ids = {n["NodeID"] for n in ray.nodes()}
        assert gcs != stray.gcs_address
        assert gcs.startswith("127.0.0.1:")
        assert len(node_ids) == 1
        assert stray.node_id not in node_ids
        # The stray cluster is untouched: its processes are all still there.
        assert all(p.is_running() for p in stray.procs)
    finally:
        ray.shutdown()


def test_no_address_ignores_ray_current_cluster(stray: Stray, ray_tmp: Path) -> None:
    # The lure: plain ray.init() joins the cluster named in <ray temp dir>/ray_current_cluster.
    current = (ray_tmp / "ray" / "ray_current_cluster").read_text().strip()
    assert current == stray.gcs_address
    _assert_private_not_stray(stray)


def test_no_address_ignores_RAY_ADDRESS(stray: Stray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", stray.gcs_address)
    _assert_private_not_stray(stray)


@pytest.mark.parametrize("how", ["auto", "host:port"])
def test_address_still_joins_that_cluster(
    stray: Stray, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The control for the two tests above: asked to, faceloop does join the stray cluster."""
    import ray
    from ray._private import ray_constants

    # The stray cluster is loopback-only, so a driver joining it must take 127.0.0.1 as its IP
    # too (Ray's single-node switch); and it needs that cluster's token.
    monkeypatch.setenv(SINGLE_NODE_ENV, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", stray.token)
    address = "auto" if how == "auto" else stray.gcs_address
    try:
        init_ray(RaySettings(address=address))
        assert ray.get_runtime_context().gcs_address == stray.gcs_address
        assert {n["NodeID"] for n in ray.nodes()} == {stray.node_id}
    finally:
        ray.shutdown()


def test_joining_with_the_wrong_token_names_the_token(
    stray: Stray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver without the cluster's token got ~20 s of Ray's InvalidAuthToken warnings, then
    "ConnectionError: Failed to connect to Ray cluster", naming neither setting."""
    import ray
    from ray._private import ray_constants

    from faceloop.errors import FaceloopError

    monkeypatch.setenv(SINGLE_NODE_ENV, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    try:
        with pytest.raises(FaceloopError, match="RAY_AUTH_TOKEN") as exc:
            init_ray(RaySettings(address=stray.gcs_address))
        assert "ray.address" in str(exc.value)
    finally:
        ray.shutdown()


def test_a_loopback_address_ray_turned_into_this_machines_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray turns 127.0.0.1 into the machine's own address unless its single-node switch is
    off: a cluster started on 127.0.0.1 was "not reachable at 192.0.2.2:..." with no why."""
    import ray
    from ray._private import ray_constants

    from faceloop.errors import FaceloopError

    monkeypatch.delenv(SINGLE_NODE_ENV, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(FaceloopError) as exc:
        init_ray(RaySettings(address=f"127.0.0.1:{port}"))
    text = str(exc.value)
    if "127.0.0.1:" not in text.split("(ray.address")[0]:  # this machine has another address
        assert f"{SINGLE_NODE_ENV}=0" in text


def test_an_address_nobody_answers_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong port in ``ray.address`` is one clear error within seconds; Ray alone retried
    for 5.5 minutes, printing "Failed to connect to GCS" every few seconds."""
    import time

    import ray
    from ray._private import ray_constants

    from faceloop.errors import FaceloopError

    monkeypatch.setenv(SINGLE_NODE_ENV, "0")  # keep 127.0.0.1, as a loopback cluster's driver
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.monotonic()
    with pytest.raises(FaceloopError) as exc:
        init_ray(RaySettings(address=f"127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 30
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in str(exc.value)
    assert "ray.address" in str(exc.value) and not ray.is_initialized()


def test_an_address_that_answers_but_is_no_ray_cluster_fails_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A container probe set ray.address to a Prefect server's port: the connection was
    accepted, and Ray retried "Failed to connect to GCS" until the run was killed at 240 s."""
    import http.server
    import threading
    import time

    import ray
    from ray._private import ray_constants

    from faceloop.errors import FaceloopError

    monkeypatch.setenv(SINGLE_NODE_ENV, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    srv = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    if ray.is_initialized():
        ray.shutdown()
    try:
        t0 = time.monotonic()
        with pytest.raises(FaceloopError) as exc:
            init_ray(RaySettings(address=f"127.0.0.1:{port}"))
        assert time.monotonic() - t0 < 30
        assert "accepts connections but is no Ray cluster" in str(exc.value)
        assert "fix ray.address" in str(exc.value) and not ray.is_initialized()
    finally:
        srv.shutdown()
        srv.server_close()


def test_private_ray_listens_on_loopback_only(ray_tmp: Path) -> None:
    import numpy as np
    import ray

    driver = os.getpid()

    def listening(batch: dict[str, Any]) -> dict[str, Any]:
        # Runs in a Ray worker while the job runs: the TCP sockets in LISTEN state of every
        # process of this Ray session (the driver and its process tree: GCS, raylet, agents,
        # workers, this one included).
        import psutil

        root = psutil.Process(driver)
        procs = {root.pid: root, **{p.pid: p for p in root.children(recursive=True)}}
        rows: list[tuple[int, str, str, int]] = []
        for c in psutil.net_connections(kind="tcp"):
            if c.status != psutil.CONN_LISTEN or c.pid not in procs:
                continue
            try:
                name = procs[c.pid].name()
            except psutil.NoSuchProcess:
                continue
            rows.append((c.pid, name, c.laddr.ip, c.laddr.port))
        return {
            "me": np.array([os.getpid()] * len(rows)),
            "pid": np.array([r[0] for r in rows]),
            "name": np.array([r[1] for r in rows]),
            "ip": np.array([r[2] for r in rows]),
            "port": np.array([r[3] for r in rows]),
        }

    try:
        init_ray(RaySettings())
        rows = (
            ray.data.range(10, override_num_blocks=1)
            .map_batches(listening, batch_size=None)
            .take_all()
        )
    finally:
        ray.shutdown()
    seen = [(str(r["name"]), str(r["ip"]), int(r["port"])) for r in rows]
    names = {name for name, _, _ in seen}
    # The snapshot did see Ray's processes: the GCS, the raylet, the worker that took it.
    assert {"gcs_server", "raylet"} <= names, seen
    assert int(rows[0]["me"]) in {int(r["pid"]) for r in rows}, seen
    # No exception needed: Ray 2.60 binds every one of them to the node IP when it is loopback.
    exposed = [s for s in seen if _canonical_ip(s[1]) != "127.0.0.1"]
    assert not exposed, f"Ray listening beyond loopback: {exposed}"


def _cluster_id_status(gcs_address: str, token: str | None) -> Any:
    """The gRPC status the GCS answers GetClusterId with, sent with ``token`` (or none)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    with grpc.insecure_channel(gcs_address, options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch)
        try:
            request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]
            stub.GetClusterId(request, metadata=metadata, timeout=60)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_private_ray_requires_its_token(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc
    import ray
    from ray._raylet import (  # type: ignore[attr-defined]  # not in ray's _raylet.pyi
        AuthenticationMode,
        get_authentication_mode,
    )

    # What faceloop used to set, and a token from elsewhere: neither may reach the private Ray.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    try:
        init_ray(RaySettings())
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        token = os.environ["RAY_AUTH_TOKEN"]
        assert token != "not-the-token"
        assert len(token) >= 32
        gcs = ray.get_runtime_context().gcs_address
        # The Ray processes started in token mode ...
        started = {p.name(): p for p in psutil.Process().children(recursive=True)}
        for name in ("gcs_server", "raylet"):
            assert started[name].environ().get("RAY_AUTH_MODE") == "token"
        # ... and the GCS refuses a caller without the token.
        assert _cluster_id_status(gcs, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _cluster_id_status(gcs, "not-the-token") == grpc.StatusCode.UNAUTHENTICATED
        assert _cluster_id_status(gcs, token) == grpc.StatusCode.OK
    finally:
        ray.shutdown()
    # Nothing Ray wrote (logs, session files) holds the token.
    for f in ray_tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert token.encode() not in f.read_bytes(), f


@pytest.mark.parametrize(
    "bad", ["notahost", "http://127.0.0.1:6379", "h:0", "ray://h:x", "ray://head:10001"]
)
def test_a_ray_address_in_no_form_ray_takes_is_a_config_error(bad: str) -> None:
    """It failed the refresh after discovery with Ray's bare ValueError (exit 1), not naming
    ray.address; `faceloop config show` accepted it."""
    from pydantic import ValidationError

    # A Ray Client address: Ray Data failed under it in Ray's own code, after discovery.
    said = "Ray Client address" if bad.startswith("ray://") else "is no Ray address"
    with pytest.raises(ValidationError, match=said):
        RaySettings(address=bad)
    for good in ("auto", "local", "10.0.0.5:6379", "[::1]:6379"):
        assert RaySettings(address=good).address == good
    assert RaySettings(address=" ").address is None


def test_ray_temp_folder_that_cannot_hold_ray_is_named_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container probe: with TMPDIR read-only, a run big enough for Ray failed with
    "permission denied: <TMPDIR>/ray: ... read and write the store" (a path that is no store's);
    with a 62-character TMPDIR, Ray's own "validate_socket_filename failed"."""
    from faceloop.errors import FaceloopError
    from storage.recovery import dead_temp_dirs
    from tasks.ray_faces import check_ray_temp

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / ("x" * 60)))
    with pytest.raises(FaceloopError, match=r"too long a path for Ray.s sockets.*RAY_TMPDIR"):
        check_ray_temp()
    monkeypatch.setenv("RAY_TMPDIR", "/dev/null")  # not a folder: nothing can be made in it
    with pytest.raises(FaceloopError, match=r"cannot be written.*set RAY_TMPDIR"):
        check_ray_temp()
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="fl", dir="/tmp")
    try:
        monkeypatch.setenv("RAY_TMPDIR", short)
        check_ray_temp()
    finally:
        shutil.rmtree(short)

    # No usable temp folder at all: the lock's recovery looks for none of faceloop's in it.
    def none() -> str:
        raise FileNotFoundError("[Errno 2] No usable temporary directory found in ['/tmp']")

    monkeypatch.setattr(tempfile, "gettempdir", none)
    assert dead_temp_dirs() == []


def test_a_start_interrupted_half_way_leaves_no_ray_process_behind(
    monkeypatch: pytest.MonkeyPatch, ray_tmp: Path
) -> None:
    """Ctrl-C while faceloop started its Ray (a notebook): the GCS, raylet and agents started
    so far stayed alive as children of the process, beside the next start's, until the
    interpreter exited."""
    import ray

    started: list[subprocess.Popen[bytes]] = []

    def half_started(*args: Any, **kwargs: Any) -> None:
        # A process as ray.init leaves it: a child named like Ray's GCS server.
        code = "import time; time.sleep(60)"
        started.append(subprocess.Popen([sys.executable, "-c", code, "gcs_server"]))
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", half_started)
    with pytest.raises(KeyboardInterrupt):
        init_ray(RaySettings())
    (child,) = started
    assert child.wait(timeout=10) is not None  # killed, not left running


def test_a_local_ray_without_room_for_the_actors_is_refused_not_waited_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's own ray.init(num_cpus=1) with an actor of theirs holding that CPU, or with
    too few CPUs in all: the face stage's actor pool waited for ever, saying only Ray's "No
    available node types can fulfill resource request"."""
    import logging

    import ray

    from faceloop.errors import FaceloopError
    from tasks.ray_faces import _check_room_for_actors

    cfg = RaySettings(actors=2, num_cpus_per_actor=0.5)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.5})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.5})
    with pytest.raises(FaceloopError, match=r"0\.5 CPUs in all.*need 1"):
        _check_room_for_actors(cfg)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    with caplog.at_level(logging.WARNING, logger="tasks.ray_faces"):
        _check_room_for_actors(cfg)
    assert "other work holds the rest" in caplog.text
    # A cluster's nodes may come up on demand: no error; but when no node now can hold one
    # actor, a warning says so at once (it hung silently for a minute, then for ever).
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0})
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0}}, {"Alive": False, "Resources": {"CPU": 8}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.ray_faces"):
        _check_room_for_actors(RaySettings(address="10.0.0.1:6379", num_cpus_per_actor=2))
        assert "no node" not in caplog.text
        _check_room_for_actors(RaySettings(address="10.0.0.1:6379", num_cpus_per_actor=4))
        assert "no node of the Ray cluster at 10.0.0.1:6379 has the 4 CPUs" in caplog.text
        caplog.clear()
        _check_room_for_actors(RaySettings(address="10.0.0.1:6379", num_gpus_per_actor=0.25))
        assert "has the 0.25 GPUs" in caplog.text


def test_a_private_ray_is_left_for_the_cluster_a_later_call_names(ray_tmp: Path) -> None:
    """A notebook that ran a local config, then a cluster's (ray.address): the second call went
    on running on the private Ray, whatever ray.address said."""
    import ray

    from faceloop.errors import FaceloopError

    init_ray(RaySettings())
    assert ray.is_initialized()
    with pytest.raises(FaceloopError, match="cannot reach the Ray cluster"):
        init_ray(RaySettings(address="127.0.0.1:9"))
    assert not ray.is_initialized()


def test_starting_ray_keeps_the_sigterm_handler_of_the_cli_or_prefect(ray_tmp: Path) -> None:
    """ray.init put its own SIGTERM handler (sys.exit(15)) in place of Prefect's engine's: a
    flow run cancelled from Prefect (its runner sends SIGTERM) after the face stage had started
    Ray showed Crashed, and the CLI's unwinding with a grace period was skipped."""
    import signal

    import ray

    def ours(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if ray.is_initialized():
        ray.shutdown()
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        init_ray(RaySettings())
        assert ray.is_initialized()
        assert signal.getsignal(signal.SIGTERM) is ours
        ray.shutdown()
        # With no handler of ours (the default), Ray's own stays: it shuts Ray down on SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        init_ray(RaySettings())
        assert callable(signal.getsignal(signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
