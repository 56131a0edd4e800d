"""The refresh on a real two-node Ray cluster (two ``ray start`` nodes on 127.0.0.1, token
authentication on), joined through ``ray.address``: the face stage's actors land on both nodes,
and the faces, identities and published version equal those of a local-mode run on the same
input.

Each node offers 3 logical CPUs and its own custom resource (``node1`` / ``node2``, which name
the nodes here); the run asks for two face actors of 2 CPUs each, so no node can hold both and
the scheduler must use the two. On the cluster ``ray.label_min_groups`` is 1, so the label
stage's per-album passes are Ray Data maps even for this small store, and ``ray.publish_min_rows``
is 1, so the publish writes its shards as a Ray Data map too; Ray Data spreads their tasks, and
the run record says on how many nodes they ran. Both nodes are stopped by process
(this session's processes only, never ``ray stop``, which would stop other people's Ray too).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from faceloop.config import SourceSpec, load_settings
from storage.objectstore import open_store
from storage.tables import read_faces
from storage.versions import load_manifest

pytestmark = pytest.mark.integration

SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # see tasks/ray_faces.py
REPO = Path(__file__).resolve().parents[1]
# `ray start` as the venv's `ray` runs it, with two changes for this test:
# - a busy machine: `ray start` gives the new node 30 s (hard-coded) to register with the GCS;
#   here each look-up waits up to 180 s;
# - the second node (argv "worker"): Ray refuses a worker node while its single-node switch is
#   off ("multi-node clusters are not supported on Windows and OSX"), and with the switch on it
#   turns --node-ip-address=127.0.0.1 into the machine's routable IP. The check is passed and
#   127.0.0.1 kept, so both nodes listen on loopback only.
RAY_START = """
import sys, time
from ray._private import ray_constants, services
from ray.scripts.scripts import main
_get_node = services.get_node
def get_node(*args, **kwargs):
    deadline = time.monotonic() + 180
    while True:
        try:
            return _get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
services.get_node = get_node
if sys.argv[1] == "worker":
    ray_constants.ENABLE_RAY_CLUSTER = True
    services.resolve_ip_for_localhost = lambda host: host
sys.argv[0:2] = ["ray"]
sys.exit(main())
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_procs(*markers: str) -> list[psutil.Process]:
    """Processes whose command line mentions one of ``markers`` (our private RAY_TMPDIR, our
    GCS address: the Ray Client server names only the latter), and their descendants."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(m in a for a in p.info["cmdline"] or () for m in markers):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _node_ports() -> list[str]:
    """Every port a node would otherwise take at a fixed default (and clash with another Ray
    on the machine or with the other node): free ones, picked now."""
    nm, om, agent_http, agent_grpc, metrics, runtime_env, client = _free_ports(7)
    return [
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """Two Ray nodes on 127.0.0.1: the head (``node1``) and a worker (``node2``)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="flmn-", dir="/tmp"))  # short: unix socket path limit
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_TMPDIR": str(tmp),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # Off: a node keeps 127.0.0.1 as its IP instead of the machine's routable one.
        SINGLE_NODE_ENV: "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # The raylet waits this long for its (Python) agent to come up; the default is too short
        # on a busy machine ("Timed out waiting for file .../dashboard_agent_listen_port_...").
        "RAY_agent_register_timeout_ms": "120000",
        # Workers import faceloop's stages from this checkout, as a cluster's image would have
        # faceloop installed.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    for k in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(k, None)
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=3",
        "--disable-usage-stats",
    ]
    (gcs_port,) = _free_ports(1)
    gcs = f"127.0.0.1:{gcs_port}"
    head = [
        sys.executable,
        "-c",
        RAY_START,
        "head",
        "start",
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=false",
        *common,
    ]
    worker = [sys.executable, "-c", RAY_START, "worker", "start", f"--address={gcs}", *common]
    try:
        for base, res in ((head, "node1"), (worker, "node2")):
            errors = []
            for _ in range(2):  # a port taken meanwhile by someone else's Ray: retry once
                cmd = [*base, *_node_ports(), f"--resources={json.dumps({res: 1})}"]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    break
                errors.append(f"{res}: {done.stderr[-1500:]}")
                if res == "node1":  # a half-started head: clear it before trying again
                    _kill(_session_procs(str(tmp), gcs))
                    shutil.rmtree(tmp / "ray", ignore_errors=True)
            else:
                pytest.fail("ray start failed:\n" + "\n---\n".join(errors))
        yield {"address": gcs, "token": token, "tmp": tmp}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _kill(_session_procs(str(tmp), gcs))
        shutil.rmtree(tmp, ignore_errors=True)
        assert not _session_procs(str(tmp), gcs), "a Ray process of the test cluster survived"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Path:
    """Two small albums of augmented copies of the sample photos (faceloop.demo)."""
    from faceloop.config import ModelSettings
    from faceloop.demo import build_demo_inputs
    from tasks.backends import load_backend

    out = tmp_path_factory.mktemp("inputs")
    backend = load_backend(ModelSettings(root=str(model_root)))
    build_demo_inputs(out, backend.detect, copies=2, bad_files=False)
    return out


def _settings(store: Path, inputs: Path, model_root: Path, address: str | None) -> Any:
    # On the cluster: 2 actors of 2 CPUs, one per node (3 CPUs each). Locally: one small actor
    # (a 2-CPU actor would leave Ray Data's read tasks no CPU on a 2-core machine).
    actors = (
        {"actors": 2, "num_cpus_per_actor": 2.0, "label_min_groups": 1, "publish_min_rows": 1}
        if address
        else {"actors": 1}
    )
    return load_settings(
        None,
        store=str(store),
        sources=[
            SourceSpec(kind="album", uri=str(inputs / "albums")),
            SourceSpec(kind="idcard", uri=str(inputs / "idcards")),
        ],
        models={"root": str(model_root)},
        ray={"address": address, "batch_size": 2, **actors},
        review={"enabled": False},
        # Small shards: the publish's write pass has several tasks to spread over the nodes.
        dataset={"shard_rows": 8},
    )


def _faces(store: Path) -> dict[str, dict]:
    cols = ["face_id", "image_uri", "bbox", "status", "identity_id", "reason_code", "embedding"]
    return {r["face_id"]: r for r in read_faces(open_store(str(store)), columns=cols).to_pylist()}


def _published(store: Path) -> list[tuple]:
    """(face_id, identity, label) of the newest version, an ID-card subject's class given back
    its subject id: each store names subjects by its own keyed pseudonym (tasks.publish), and
    labels follow the names' order, so a label is only compared through its identity."""
    from storage.secret import pseudonym
    from storage.tables import read_faces
    from storage.versions import read_shards
    from tasks.publish import SUBJECT_PREFIX

    st = open_store(str(store))
    subjects = {
        SUBJECT_PREFIX + pseudonym(st, "subject", g): g
        for g in set(
            read_faces(st, columns=["source_group"], kinds=["idcard"]).column(0).to_pylist()
        )
    }
    t = read_shards(st, "faces", columns=["face_id", "identity_id", "label"])
    ident = [subjects.get(i, i) for i in t.column("identity_id").to_pylist()]
    label_of = dict(zip(ident, t.column("label").to_pylist(), strict=True))
    assert len(set(label_of.values())) == len(label_of)  # one label per identity
    return sorted(zip(t.column("face_id").to_pylist(), ident, strict=True))


def test_multinode_refresh(
    cluster: dict[str, Any],
    inputs: Path,
    model_root: Path,
    prefect_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray
    from ray._private import ray_constants
    from ray._private.state import actors

    from flows.refresh import run_refresh

    # Local mode first: faceloop's private single-node Ray.
    local = tmp_path / "local"
    run_refresh(_settings(local, inputs, model_root, None))
    ray.shutdown()

    # The same input through the cluster. The driver joins a loopback-only cluster, so it too
    # keeps 127.0.0.1 as its IP, and it needs the cluster's token.
    monkeypatch.setenv(SINGLE_NODE_ENV, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster["token"])
    on_cluster = tmp_path / "cluster"
    summary = run_refresh(_settings(on_cluster, inputs, model_root, cluster["address"]))
    assert ray.get_runtime_context().gcs_address == cluster["address"]

    nodes = {
        n["NodeID"]: next(r for r in ("node1", "node2") if r in n["Resources"])
        for n in ray.nodes()
        if n["Alive"]
    }
    assert sorted(nodes.values()) == ["node1", "node2"]
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    face_actors = [
        a for a in actors().values() if "MapWorker" in a["ActorClassName"] and a["NumRestarts"] == 0
    ]
    assert len(face_actors) == 2, [a["ActorClassName"] for a in actors().values()]
    assert {nodes[a["Address"]["NodeID"]] for a in face_actors} == {"node1", "node2"}
    assert summary.run.new_faces > 0
    # Label work: the per-album passes ran as Ray Data tasks on both nodes (locally: in the
    # driver, below label_min_groups).
    assert summary.run.label_nodes == 2, summary.run
    # Publish: its new shards were written by Ray Data tasks on both nodes (locally: in the
    # driver, below publish_min_rows).
    assert summary.run.publish_nodes == 2, summary.run

    # Same faces, statuses, identities and published version as the local run.
    a, b = _faces(local), _faces(on_cluster)
    assert a.keys() == b.keys() and len(a) > 0
    for fid, ra in a.items():
        rb = b[fid]
        for k in ("image_uri", "status", "identity_id", "reason_code"):
            assert ra[k] == rb[k], (k, fid)
        assert np.allclose(ra["bbox"], rb["bbox"], atol=1e-3)
        if ra["embedding"] is None:
            assert rb["embedding"] is None
        else:
            assert np.allclose(ra["embedding"], rb["embedding"], atol=1e-5)
    assert _published(local) == _published(on_cluster) != []
    # The same shards, face for face, in the same order: the cut does not depend on where the
    # shards were written (byte for byte too, but for the ID-card subjects' names: each store
    # has its own pseudonyms).
    shards = []
    for s in (local, on_cluster):
        st = open_store(str(s))
        m = load_manifest(st, "faces")
        shards.append(
            [
                st.read_parquet_columns(m.shard_rel(sh), ["face_id"]).column(0).to_pylist()
                for sh in m.shards
            ]
        )
    assert shards[0] == shards[1] and len(shards[0]) > 2
