"""Run the detect → align → score → embed stage over a work list with Ray Data.

This module is the Ray edge: ``ray`` is imported only inside its functions. The model work is
``tasks.faces.FaceProcessor``, a plain callable class; here it becomes an actor pool in a
streaming ``map_batches`` pipeline that reads the work list from the store and writes
detections back to it, so nothing large passes through the driver and memory stays flat as
inputs grow. :func:`ray_map` is the other stages' way onto Ray: a map of small work items
(the label passes, the publish's write pass) or the same loop in this process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.config import RaySettings, Settings
from faceloop.crashpoints import crash_point
from faceloop.errors import FaceloopError, TransientStorageError
from faceloop.memory import SETTINGS_ENV
from faceloop.progress import enabled as progress_enabled
from faceloop.progress import iterate
from faceloop.schema import DETECTIONS_SCHEMA, IMG_NO_FACE, IMG_OK
from storage import layout
from storage.objectstore import ObjectStore, open_store

log = logging.getLogger(__name__)


@dataclass
class FaceStageResult:
    detections_rel: str
    images: int
    rows: int
    seconds: float
    # Images that reached the detector (decoded: status ok or no_face); the others were
    # quarantined before it (unreadable, not an image, too many pixels).
    sent_to_models: int = 0
    # Of ``seconds``' stage, how long starting (or joining) Ray took: 0 when discovery or an
    # earlier stage of this process had started it.
    ray_start_seconds: float = 0.0
    # The stage ran in this process, not on Ray (a small run: ray.face_min_images).
    in_driver: bool = False


# Ray's single-node switch (ray/_private/ray_constants.py ENABLE_RAY_CLUSTER): off, the node's IP
# stays the loopback address instead of being resolved to this machine's routable IP, and then
# the GCS, the raylet, the agents and the workers all bind their ports to 127.0.0.1.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK = "127.0.0.1"
# The face stage's work list is cut into one block per ``ray.batch_size`` images, at most this
# many (a run of 10^6 new images: blocks of ~1,000, each put in the object store by the driver).
MAX_WORK_BLOCKS = 1024

# The environment init_ray set for the private Ray it last started (None: a variable it removed)
# and what was there before, so a later call can put it back (e.g. before joining a cluster).
_private_env: dict[str, str | None] = {}
_saved_env: dict[str, str | None] = {}
# Seconds this process has spent in init_ray starting or joining Ray (ray_start_seconds).
_start_seconds = [0.0]


def init_ray(cfg: RaySettings) -> float:
    """Start (or join) Ray once per process. A private local Ray by default, a cluster when
    ``cfg.address`` is set ("auto", "host:port"). Returns the seconds this
    call spent doing so (0.0 when Ray was up already); :func:`ray_start_seconds` adds them up
    for the process, so a stage that may start Ray can report its start beside its work."""
    import ray

    if ray.is_initialized():
        joined = _joined.get("address", _NOT_BY_US)
        if joined is _NOT_BY_US or joined == cfg.address or _joined.get("job") != _job_id():
            return 0.0  # the Ray asked for, or one this process's own code started: used as is
        # The Ray faceloop started or joined for other settings (a notebook switching from a
        # local config to a cluster's): it went on running on the first one, whatever
        # ray.address said. That one is left for the one asked for.
        log.info(
            "Ray: leaving %s for %s (ray.address changed)",
            "the private local Ray" if joined is None else joined,
            "a private local Ray" if cfg.address is None else cfg.address,
        )
        ray.shutdown()
    _joined.pop("address", None)
    t0 = time.perf_counter()
    sigterm = _sigterm_handler()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _undo_private_env()
    kwargs: dict[str, Any] = {
        "include_dashboard": cfg.include_dashboard,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if not private_ray(cfg):
        kwargs["address"] = cfg.address
        # Cluster workers don't inherit this process's environment. Pass where the store is, never
        # the secrets: nodes get credentials from their own environment or instance roles.
        # The memory settings too (faceloop/memory.py: Arrow's allocator, numpy's huge pages).
        env = {
            k: os.environ[k]
            for k in ("FACELOOP_S3_ENDPOINT", "AWS_REGION", *SETTINGS_ENV)
            if os.environ.get(k)
        }
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        _reload_ray_auth()  # the auth environment as it is now, not as Ray first read it
        _check_reachable(cfg.address)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            # Reachable, then refused: most often the token (Ray's logs say "InvalidAuthToken").
            raise FaceloopError(
                f"could not join the Ray cluster at {cfg.address} (ray.address): {exc}. Most "
                "often the token: a cluster with token authentication (Ray's default) needs "
                "the same RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in this environment as on its "
                "nodes; else the port is another of the head's (a Ray Client's 10001, the "
                "dashboard's): give the GCS port, 6379 by default"
            ) from None
    else:
        _start_private_ray(kwargs)
    _keep_sigterm_handler(sigterm)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's own bars (rows done, rows/s, ETA per operator) on a terminal only: a
    # 9,525-image refresh printed nothing for minutes with them off.
    ctx.enable_progress_bars = progress_enabled()
    ctx.print_on_execution_start = False
    # Off the terminal (a scheduled flow's log) they are off on purpose: Ray Data's warning
    # that they are disabled, with how to enable them, is not for that log.
    _quiet_progress_notice()
    _joined.update(address=cfg.address, job=_job_id())
    took = time.perf_counter() - t0
    _start_seconds[0] += took
    return took


def _sigterm_handler() -> Any:
    """This process's SIGTERM handler when it is a Python function (faceloop's CLI's, Prefect's
    engine's); None otherwise, or off the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGTERM)
    return handler if callable(handler) else None


def _keep_sigterm_handler(handler: Any) -> None:
    """Put back the SIGTERM handler ``ray.init`` replaced with its own (``sys.exit(15)``): a
    Prefect cancel (SIGTERM) of a flow run that had started Ray ended as a crash (Prefect's
    handler, which turns it into a cancellation, was gone), and faceloop's own unwinding with
    its grace period was skipped. Where there was none of ours, Ray's stays."""
    import signal

    if handler is not None and signal.getsignal(signal.SIGTERM) is not handler:
        signal.signal(signal.SIGTERM, handler)


# The ray.address faceloop started or joined Ray for in this process (None: its private local
# Ray); absent while Ray is not faceloop's (not started, or started by the caller's own code).
_NOT_BY_US = object()
_joined: dict[str, Any] = {}  # address, and the job id of the driver's connection then


def _job_id() -> str | None:
    import ray

    try:
        return str(ray.get_runtime_context().get_job_id())
    except Exception:
        return None


# How long the cluster's address may take to accept a connection before the run fails.
CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str | None) -> None:
    """Fail at once, naming the setting, when the cluster at ``address`` does not accept a
    connection: ``ray.init`` would retry for minutes (a wrong port took 5.5 minutes of "Failed
    to connect to GCS" warnings before the run crashed). The address probed is the one Ray
    will use (``auto`` read from the environment, a loopback host turned into the node's IP)."""
    from ray._private import services

    if not address:
        return
    target = services.canonicalize_bootstrap_address(address)
    if not target:
        return  # "auto" with no cluster recorded: Ray says so itself, at once
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return  # not host:port: Ray's own error names it
    try:
        with socket.create_connection(
            (host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S
        ) as conn:
            grpc = _speaks_grpc(conn)
    except OSError as exc:
        given = address.rpartition(":")[0].strip("[]")
        swapped = (
            f" (Ray turned the loopback address {given} into this machine's {host}: for a "
            f"cluster started on {given}, set {_SINGLE_NODE_ENV}=0 in this environment)"
            if given in ("127.0.0.1", "localhost", "::1") and host.strip("[]") != given
            else ""
        )
        raise FaceloopError(
            f"cannot reach the Ray cluster at {target} (ray.address {address!r}): "
            f"{exc.strerror or exc}; start it or fix ray.address{swapped}"
        ) from None
    if grpc is False:
        # Ray would retry "Failed to connect to GCS" for as long as the run lives (a Prefect
        # server's port: killed after 240 s, and 15-25 s more to stop on SIGTERM).
        raise FaceloopError(
            f"{target} (ray.address {address!r}) accepts connections but is no Ray cluster "
            "(its head's GCS port, 6379 by default, speaks gRPC; this port does not): fix "
            "ray.address"
        )


# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (a Ray head's GCS, a
# Ray Client server) answers with a SETTINGS frame of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_grpc(conn: socket.socket) -> bool | None:
    """Whether the server behind ``conn`` answers an HTTP/2 preface as gRPC servers do (None:
    unknown: TLS is on (RAY_USE_TLS), or it said nothing within CONNECT_TIMEOUT_S)."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    try:
        conn.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            more = conn.recv(9 - len(head))
            if not more:
                break
            head += more
    except TimeoutError:
        return None
    except OSError:
        return False
    return len(head) == 9 and head[3] == 4  # a frame header of type SETTINGS


def ray_start_seconds() -> float:
    """The seconds :func:`init_ray` has spent starting or joining Ray in this process."""
    return _start_seconds[0]


class _DropProgressNotice(logging.Filter):
    """Drops Ray Data's "Progress bars disabled" warning (init_ray turns them off on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


_PROGRESS_LOGGER = "ray.data._internal.progress"


def _quiet_progress_notice() -> None:
    logger = logging.getLogger(_PROGRESS_LOGGER)
    if not any(isinstance(f, _DropProgressNotice) for f in logger.filters):
        logger.addFilter(_DropProgressNotice())


# Ray's unix sockets lie under <ray temp>/session_<date>_<time>_<usec>_<pid>/sockets/ (up to 64
# characters below its temp folder), and a socket's path may not pass 107 bytes.
_SOCKET_TAIL = len("/session_2026-12-07_16-05-27_726678_1234567/sockets/plasma_store")
_SOCKET_MAX = 107


def check_ray_temp() -> None:
    """FaceloopError naming RAY_TMPDIR / TMPDIR when Ray's temp folder (``$RAY_TMPDIR``, else
    ``$TMPDIR/ray``, else ``/tmp/ray``) cannot hold a private Ray: not writable (a read-only
    root filesystem) or too long a path for its sockets. Ray itself failed later, on a path a
    user could not tell from the store's, or with "validate_socket_filename failed"."""
    from ray._common.utils import get_default_ray_temp_dir

    from faceloop.localnet import make_writable_folder

    d = get_default_ray_temp_dir()
    fix = "set RAY_TMPDIR (or TMPDIR) to a writable folder with a short path, e.g. /tmp/ray-$USER"
    if len(os.fsencode(d)) + _SOCKET_TAIL > _SOCKET_MAX:
        raise FaceloopError(
            f"Ray's temporary folder {d} is too long a path for Ray's sockets (at most "
            f"{_SOCKET_MAX - _SOCKET_TAIL} bytes): {fix}"
        )
    try:
        make_writable_folder(d)
    except OSError as exc:
        raise FaceloopError(
            f"Ray's temporary folder {d} cannot be written ({exc.strerror or exc}): {fix}"
        ) from None


def _start_private_ray(kwargs: dict[str, Any]) -> None:
    """Start this process's own single-node Ray: never a cluster found on the machine, token
    authentication on with a fresh random token, every port on 127.0.0.1.

    ``address="local"`` makes ``ray.init`` start a new instance whatever ``RAY_ADDRESS`` or
    ``<ray temp dir>/ray_current_cluster`` (written by ``ray start``) say; with no address it
    would join the cluster they name. The token lives only in this process's environment, which
    the Ray processes it starts inherit; it is never logged nor written anywhere.
    """
    import ray
    from ray._private import ray_constants

    check_ray_temp()
    _set_private_env(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_AUTH_TOKEN_PATH": None,
        }
    )
    _reload_ray_auth()
    # Ray turns a 127.0.0.1 node IP into the machine's routable IP unless the single-node switch
    # is off. The constant is read when ray is imported, which may already have happened: set
    # both for the start, then put them back (the started processes keep the environment they
    # got, and this process's node IP is fixed once connected).
    was_cluster = ray_constants.ENABLE_RAY_CLUSTER
    was_env = os.environ.get(_SINGLE_NODE_ENV)
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address=_LOOPBACK, **kwargs)
    except BaseException:
        # Interrupted (Ctrl-C in a notebook) or failed half-way: the processes started so far
        # (GCS, raylet, agents) outlived it in the calling process, beside the next start's.
        _stop_half_started()
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was_cluster
        _put_env(_SINGLE_NODE_ENV, was_env)


def _stop_half_started() -> None:
    """Stop what an interrupted ``ray.init`` of a private Ray started: its node's processes
    when it got that far, else this process's Ray children (a private Ray's processes are
    this process's children; a cluster's are not)."""
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()
    with contextlib.suppress(Exception):
        import psutil

        names = ("gcs_server", "raylet", "ray/dashboard", "ray/_private", "ray/autoscaler")
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(n in " ".join(child.cmdline()) for n in names):
                    child.kill()


def _set_private_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        _saved_env[k] = os.environ.get(k)
        _private_env[k] = v
        _put_env(k, v)


def _undo_private_env() -> None:
    """Put back the auth environment a previous private Ray replaced, where it is still ours."""
    # All or nothing: if the token is no longer ours, someone has set the auth environment since.
    if _private_env and os.environ.get("RAY_AUTH_TOKEN") == _private_env.get("RAY_AUTH_TOKEN"):
        for k in _private_env:
            _put_env(k, _saved_env.get(k))
    _private_env.clear()
    _saved_env.clear()


def _put_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _reload_ray_auth() -> None:
    """Make this process's Ray read the auth environment again: it caches the mode and the
    token (Ray re-initialises its config the same way when it turns token auth on itself)."""
    from ray._raylet import (  # type: ignore[attr-defined]  # not in ray's _raylet.pyi
        AuthenticationTokenLoader,
        Config,
    )

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def run_face_stage(
    settings: Settings, store: ObjectStore, pending_rel: str, run_id: str, n_images: int
) -> FaceStageResult:
    """Process ``pending_rel`` (PENDING_SCHEMA) into ``staging/<run_id>/detections/``: on Ray
    Data, or in this process when the run is small (:func:`runs_inline`)."""
    from storage.objectstore import use_store_modes
    from storage.tables import check_run_id

    check_run_id(run_id)
    use_store_modes(settings)
    if runs_inline(settings.ray, n_images):
        return _face_stage_inline(settings, store, pending_rel, run_id, n_images)
    import ray
    from ray.data import ActorPoolStrategy

    from tasks.backends import drop_ahead
    from tasks.faces import FaceProcessor, read_work_list

    drop_ahead(run_id)  # the actors load their own: a backend loaded ahead is not needed

    ray_start = init_ray(settings.ray)
    out_rel = layout.staging_detections(run_id)
    cfg = settings.ray
    _check_room_for_actors(cfg)
    batch = max(1, cfg.batch_size)
    t0 = time.perf_counter()

    def pipeline() -> None:
        # The work list (URIs and hashes: small) is read here, under the same deadline as the
        # write, and cut into one block per batch, up to MAX_WORK_BLOCKS: the actors get work as
        # soon as they are up, and the last batches are short, so no actor sits idle at the
        # end while another finishes a long block. Reading it with Ray Data instead cost a list
        # task and a read task on workers that had to start first (their CPU held the reads
        # back while the actors started too): ~20 s of a 60 s face stage of 200 images on 2
        # cores, then a repartition (docs/SCALING.md, issue 16).
        work = read_work_list(store, pending_rel)
        n = work.num_rows
        nblocks = max(1, min(-(-n // batch), MAX_WORK_BLOCKS))
        bounds = [int(x) for x in np.linspace(0, n, nblocks + 1)]
        # from_blocks reads each block's row count and schema here; from_arrow sends a task
        # per block to do it, which started two task workers (each importing Ray Data) beside
        # the actors and held both CPUs at the pipeline's start: Ray Data then warned that "the
        # Ray cluster currently does not have any available CPUs" on every refresh.
        ds: Any = ray.data.from_blocks(
            [work.slice(lo, hi - lo) for lo, hi in itertools.pairwise(bounds)]
        )
        del work
        providers = face_providers(cfg)
        ds.context.raise_original_map_exception = True  # (FaceActor)
        ds = ds.map_batches(
            FaceActor,
            # Each actor writes its batches' detections to the store itself (DETECTIONS_SCHEMA's
            # exact types) and hands Ray only their row counts: Ray Data runs a Write after an
            # actor-pool map as separate tasks (it fuses tasks into actors, not the reverse),
            # which moved every batch's crops through the object store to another worker.
            fn_constructor_kwargs={
                "processor": FaceProcessor,
                **actor_kwargs(settings, providers, out_rel, pending_rel),
            },
            batch_size=batch,
            batch_format="numpy",
            # A fixed pool: every actor loads its models at the start instead of the pool growing
            # from one while the first batches queue behind it.
            compute=ActorPoolStrategy(size=max(1, cfg.actors)),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor or None,
        )
        with worker_errors():
            ds.materialize()  # runs the pipeline; what it holds is one row count per batch

    _bounded(pipeline, store, settings.storage.deadline_seconds)
    store.secure_tree(out_rel)  # owner-only like the rest, whichever process wrote a part
    crash_point("faces")  # tests only (faceloop/crashpoints.py)
    seconds = time.perf_counter() - t0
    rows, sent = written_detections(store, out_rel, pending_rel)
    log.info(
        "face stage: %d images (%d reached the detector) -> %d rows in %.1f s",
        n_images,
        sent,
        rows,
        seconds,
    )
    return FaceStageResult(
        detections_rel=out_rel,
        images=n_images,
        rows=rows,
        seconds=seconds,
        sent_to_models=sent,
        ray_start_seconds=round(ray_start, 3),
    )


class FaceActor:
    """The face stage's Ray Data map function: a ``processor`` (FaceProcessor) built from
    ``kwargs`` in each actor and called on its batches, an exception of which reaches the
    driver as itself (:func:`carried`)."""

    def __init__(self, processor: Callable[..., Any], **kwargs: Any) -> None:
        self._processor = processor(**kwargs)

    def __call__(self, batch: Any) -> Any:
        try:
            return self._processor(batch)
        except Exception as exc:
            raise carried(exc) from exc


def carried(exc: Exception) -> Exception:
    """For a Ray Data map function (run with ``raise_original_map_exception``) to raise in
    place of ``exc``: ``exc`` inside the ``UserCodeException`` Ray Data wraps it in anyway, as
    its argument, where it travels to the driver (Ray Data's own wrapper keeps only its
    traceback's text, and an exception of another kind is logged as Ray's internal error, with
    two tracebacks). :func:`worker_errors` takes it out again. An exception that cannot be
    pickled travels as its text, as Ray Data's own wrapper has it."""
    from ray import cloudpickle
    from ray.exceptions import UserCodeException

    try:
        cloudpickle.dumps(exc)
    except Exception:
        return UserCodeException("UDF failed to process a data block.")
    return UserCodeException(exc)


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Around a Ray Data pipeline's run in the driver: the ``RayTaskError`` a map function's
    exception ends it with (:func:`carried`) raised as that exception, so the run fails as when
    the same code runs in this process: a full disk while an actor writes its detections ends
    in faceloop's one-line error, not in Ray's traceback of the worker as the message. Raised
    ``from`` the ``RayTaskError``: with ``-v`` the worker's traceback is shown above it."""
    import ray

    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        carrier = exc.cause if isinstance(exc.cause, ray.exceptions.UserCodeException) else None
        inner = carrier.args[0] if carrier is not None and carrier.args else None
        if isinstance(inner, Exception):
            raise inner from exc
        raise


def _check_room_for_actors(cfg: RaySettings) -> None:
    """FaceloopError when a Ray without an autoscaler (no ``ray.address``: faceloop's private
    Ray, or one the caller's code started in this process) has fewer CPUs or GPUs in all than
    the face stage's actors ask for: the actor pool waited for them for ever, saying only
    Ray's "No available node types can fulfill resource request". A warning when they exist
    but other work holds them now. A cluster's nodes may come up on demand: when none of its
    nodes now could hold one actor, a warning says so at once (the run waits for a node that
    can; without an autoscaler that is for ever, and Ray said it only after a minute)."""
    import ray

    if cfg.address:
        per_actor = {"CPU": cfg.num_cpus_per_actor, "GPU": cfg.num_gpus_per_actor or 0}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for res, n in per_actor.items():
            most = max((r.get(res, 0.0) for r in nodes), default=0.0)
            if n and most < n:
                log.warning(
                    "face stage: no node of the Ray cluster at %s has the %g %ss one face actor "
                    "asks for (the most on a node: %g): the stage waits for a node that has "
                    "them, for ever without an autoscaler (lower ray.num_%ss_per_actor, or "
                    "stop the run with Ctrl-C)",
                    cfg.address,
                    n,
                    res,
                    most,
                    res.lower(),
                )
        return
    actors = max(1, cfg.actors)
    need = {"CPU": actors * cfg.num_cpus_per_actor, "GPU": actors * (cfg.num_gpus_per_actor or 0)}
    total, free = ray.cluster_resources(), ray.available_resources()
    for res, n in need.items():
        if n and total.get(res, 0.0) < n:
            raise FaceloopError(
                f"the Ray this process runs has {total.get(res, 0.0):g} {res}s in all; the face "
                f"stage's {actors} actors need {n:g} (ray.actors x ray.num_"
                f"{res.lower()}s_per_actor): give Ray more, or the actors less"
            )
        if n and free.get(res, 0.0) < n:
            log.warning(
                "face stage: %g of the %g %ss its actors need are free in this Ray (other work "
                "holds the rest): they start when it lets go",
                free.get(res, 0.0),
                n,
                res,
            )


def private_ray(cfg: RaySettings) -> bool:
    """Whether this process starts its own local Ray (``ray.address`` unset or "local")
    rather than joining a cluster."""
    return not cfg.address or cfg.address == "local"


def runs_inline(cfg: RaySettings, n_images: int) -> bool:
    """Whether a face stage of ``n_images`` runs in this process instead of on Ray: fewer
    than ``ray.face_min_images``, with a private local Ray (a cluster always gets the work)."""
    return private_ray(cfg) and n_images < cfg.face_min_images


def may_run_inline(cfg: RaySettings) -> bool:
    """Whether a run with these settings may have its face stage in this process on CPU
    (:func:`runs_inline` for some run size, models not on a GPU): the refresh then loads the
    models ahead, while discovery runs (:func:`tasks.backends.load_ahead`)."""
    return runs_inline(cfg, 0) and cfg.num_gpus_per_actor <= 0


def _face_stage_inline(
    settings: Settings, store: ObjectStore, pending_rel: str, run_id: str, n_images: int
) -> FaceStageResult:
    """The face stage of a small run in this process: the actors' code (``process_images``)
    on :func:`inline_threads` threads, one backend each, in batches of ``ray.batch_size``,
    each batch written as its own part, as the actors write theirs."""
    from tasks.faces import detect_pending

    t0 = time.perf_counter()
    cfg = settings.ray
    threads = inline_threads(cfg)
    done: dict[str, str] = {}

    stop = threading.Event()

    def work() -> None:
        done["rel"] = detect_pending(
            settings,
            store,
            pending_rel,
            run_id,
            threads=threads,
            providers=face_providers(cfg),
            stop=stop,
        )

    # Under the same deadline as the Ray pipeline: a store lost mid-stage fails the run in
    # storage.deadline_seconds instead of leaving it in the store client's retries.
    _bounded(work, store, settings.storage.deadline_seconds, stop)
    out_rel = done["rel"]
    crash_point("faces")  # tests only (faceloop/crashpoints.py)
    seconds = time.perf_counter() - t0
    rows, sent = written_detections(store, out_rel, pending_rel)
    log.info(
        "face stage (in this process on %d threads, below ray.face_min_images %d): %d images "
        "(%d reached the detector) -> %d rows in %.1f s",
        threads,
        settings.ray.face_min_images,
        n_images,
        sent,
        rows,
        seconds,
    )
    return FaceStageResult(
        detections_rel=out_rel,
        images=n_images,
        rows=rows,
        seconds=seconds,
        sent_to_models=sent,
        in_driver=True,
    )


def face_providers(cfg: RaySettings) -> list[str] | None:
    """onnxruntime providers of the face models: CUDA when ``ray.num_gpus_per_actor`` > 0 (in
    the actors and in the driver alike; the backend refuses a silent CPU fallback), else the
    default CPU."""
    if cfg.num_gpus_per_actor > 0:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None


def inline_threads(cfg: RaySettings) -> int:
    """Threads of an in-process face stage: as many as the Ray pool would have actors
    (``ray.actors``), at most the CPUs this process may run on (its affinity: a container's
    or a ``taskset``'s share, not the machine's count), 1 when a GPU runs the models."""
    if cfg.num_gpus_per_actor > 0:
        return 1
    return max(1, min(cfg.actors, usable_cpus()))


def usable_cpus() -> int:
    """CPUs this process may run on (``sched_getaffinity`` where the OS has it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def written_detections(store: ObjectStore, rel: str, pending_rel: str) -> tuple[int, int]:
    """(rows, images that reached the detector) of the detections written under ``rel``: small
    columns read back, whichever path wrote the parts. FaceloopError when an image of the work
    list ``pending_rel`` has no row there (every image it holds gets its face rows, a no_face
    row or a quarantined one): recorded as done, it would have been left out of the store
    without a word (a Ray node that could not see the store wrote nothing and said so only
    in its own log). The run fails before it records an image, so the next run takes them
    all again."""
    from tasks.faces import read_work_list

    columns = ["image_uri", "image_status", "face_index"]
    try:
        det = store.read_parquet(rel, columns=columns)
    except FileNotFoundError:  # no batch wrote a part: no image has its rows
        det = DETECTIONS_SCHEMA.empty_table().select(columns)
    sent = read_work_list(store, pending_rel).column("image_uri")
    done = pc.is_in(sent, value_set=pc.unique(det.column("image_uri")))
    missing = len(sent) - int(pc.sum(done.cast(pa.int64())).as_py() or 0)
    if missing:
        raise FaceloopError(
            f"{missing} of {len(sent)} images were not processed by the face stage: no "
            f"detections for them under {store.uri(rel)} (a Ray worker whose node cannot "
            f"see the store {store.uri('')} writes none; its node's worker logs say why). "
            "Nothing was recorded: the next run takes them again"
        )
    return det.num_rows, detected_images(det)


def detected_images(det: pa.Table) -> int:
    """How many images of a detections table reached the detector: one ``no_face`` row each,
    or face rows 0..n-1 (counted by their ``face_index`` 0)."""
    status = det.column("image_status")
    index = det.column("face_index")
    no_face = pc.equal(status, IMG_NO_FACE)
    first_face = pc.and_(pc.equal(status, IMG_OK), pc.equal(index, 0))
    return int(pc.sum(pc.or_(no_face, first_face).cast(pa.int64())).as_py() or 0)


def actor_kwargs(
    settings: Settings,
    providers: list[str] | None,
    output_rel: str | None = None,
    alive_rel: str | None = None,
) -> dict[str, Any]:
    """The FaceProcessor constructor arguments, which Ray pickles to every actor: the settings
    without secrets (``model_dump`` leaves ``review.token`` out; the actors need no review
    settings at all). S3 credentials are not in them either: workers read their own env.
    ``output_rel``: the store folder the actors write their detections to; ``alive_rel``: the
    run's work list, without which they write nothing (FaceProcessor)."""
    return {
        "settings": settings.model_dump(mode="json", exclude={"review", "yaml_file"}),
        "output": "arrow",
        "providers": providers,
        "output_rel": output_rel,
        "alive_rel": alive_rel,
    }


_PROBE_S = 5.0


def _bounded(
    run: Callable[[], None], store: ObjectStore, deadline_s: float, stop: Any = None
) -> None:
    """Run the Ray Data pipeline, failing within ``deadline_s`` of losing the store.

    Ray Data retries I/O errors it deems transient inside its tasks (and pyarrow's S3 client
    retries under it), so an S3 outage would otherwise look like a hang. The pipeline runs in a
    daemon thread; this thread probes the store every few seconds (a cheap HEAD through the
    boto3 client, itself bounded) and raises :class:`TransientStorageError` once the store has
    been unreachable for ``deadline_s``. Nothing is lost: the images were not recorded, so the
    next run after the outage processes them again.

    ``stop`` (a ``threading.Event`` the pipeline heeds): set when this thread is interrupted
    (Ctrl-C, SIGTERM) or gives up, and the pipeline waited for (up to :data:`STOP_WAIT_S`), so
    that nothing is written into the run's staging once its cleanup has started (a part
    written after it was left behind: `doctor` reported an orphan staging).
    """
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            run()
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=target, name="face-stage", daemon=True)
    t.start()
    try:
        down_since, last_error = _watch(t, store, deadline_s)
    except BaseException:
        if stop is not None:
            stop.set()
            t.join(STOP_WAIT_S)
        raise
    if "exc" in box:
        failed = box["exc"]
        if down_since is None:
            # The pipeline may fail before the next probe (a read of the work list, say): ask
            # the store now, so an outage is reported as one, not as Ray's I/O error.
            try:
                store.exists(layout.STORE_LOCK)
            except Exception as exc:
                down_since = time.monotonic()
                last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if down_since is not None:
            raise TransientStorageError(
                f"store {store.uri('')} unreachable during the face stage ({last_error}); the "
                "run stopped, nothing recorded: rerun after the outage"
            ) from failed
        raise failed


# How long an interrupted face stage in this process is given to finish the batch in hand.
STOP_WAIT_S = 30.0


def _watch(t: threading.Thread, store: ObjectStore, deadline_s: float) -> tuple[float | None, str]:
    """Wait for the pipeline thread ``t``, probing the store (:func:`_bounded`): when the last
    probe found the store down (None: up), and its error."""
    down_since: float | None = None
    last_error = ""
    while True:
        t.join(_PROBE_S)
        if not t.is_alive():
            return down_since, last_error
        try:
            store.exists(layout.STORE_LOCK)
            down_since = None
        except Exception as exc:  # the probe failing is the signal, whatever its type
            last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= deadline_s:
                _stop_ray()
                raise TransientStorageError(
                    f"store {store.uri('')} unreachable for {deadline_s:g} s during the face "
                    f"stage ({last_error}); the run stopped, nothing recorded: rerun after "
                    "the outage"
                ) from exc


def _stop_ray() -> None:
    """Stop the local Ray so its tasks stop retrying against the dead store."""
    import ray

    try:
        ray.shutdown()
    except Exception as exc:
        log.warning("ray shutdown after storage deadline failed: %s", exc)


# --------------------------------------------------------------------------------------------
# The label passes and the publish's write pass hand Ray Data a list of small JSON-able work
# items; each worker opens the store itself, reads and writes its part there, and returns a
# small JSON-able summary. Without Ray the same function runs over the same items in this
# process, so both ways produce the same store (the multi-node test compares them).


def ray_map(
    settings: Settings,
    ray_on: bool,
    desc: str,
    items: list[dict],
    fn: Callable[[ObjectStore, dict], dict],
    nodes: set[str] | None = None,
    unit: str = "album",
) -> list[dict]:
    """``fn(store, item)`` for every item, in item order: a Ray Data map (results travel as
    JSON: they are small; the data goes through the store) or, without Ray, a loop in this
    process. The Ray node ids the map ran on are added to ``nodes``."""
    return [
        out
        for _, out in sorted(
            ray_map_iter(settings, ray_on, desc, items, fn, nodes, unit), key=lambda r: r[0]
        )
    ]


def ray_map_iter(
    settings: Settings,
    ray_on: bool,
    desc: str,
    items: list[dict],
    fn: Callable[[ObjectStore, dict], dict],
    nodes: set[str] | None = None,
    unit: str = "album",
    store: ObjectStore | None = None,
) -> Iterator[tuple[int, dict]]:
    """:func:`ray_map` as ``(item index, result)`` pairs, yielded as the results arrive (on
    Ray in any order), so the caller can act on each one (a heartbeat, a manifest entry)
    while the others are still being worked on. ``store``: the store the loop in this
    process uses (default: ``settings.store`` opened; Ray's workers always open that)."""
    if not items:
        return
    if not ray_on:
        st = store if store is not None else open_store(settings.store)
        yield from enumerate(fn(st, it) for it in iterate(items, desc, len(items), unit))
        return
    import ray

    init_ray(settings.ray)
    store_uri = settings.store

    def one(row: dict) -> dict:
        import ray as _ray

        from storage.objectstore import open_store as _open
        from storage.objectstore import use_store_modes

        use_store_modes(settings)
        try:
            out = fn(_open(store_uri), json.loads(row["item"]))
        except Exception as exc:
            raise carried(exc) from exc
        return {
            "i": row["i"],
            "out": json.dumps(out),
            "node": _ray.get_runtime_context().get_node_id(),
        }

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Ray Data's default task strategy spreads the blocks over the cluster's nodes.
    ds: Any = ray.data.from_items(
        [{"i": i, "item": json.dumps(it)} for i, it in enumerate(items)],
        override_num_blocks=min(len(items), 4 * cpus),
    )
    # A single map after the input: there is no downstream operator to hold CPUs back for.
    # Ray Data's per-operator reservation kept the map at one task for its first ~1 s on a
    # 2-CPU node, in every pass (docs/SCALING.md, twenty-fifth session).
    ds.context.op_resource_reservation_enabled = False
    ds.context.raise_original_map_exception = True  # (carried)
    ds = ds.map(one, num_cpus=1)
    with worker_errors():
        for r in ds.iter_rows():
            if nodes is not None:
                nodes.add(r["node"])
            yield int(r["i"]), json.loads(r["out"])
