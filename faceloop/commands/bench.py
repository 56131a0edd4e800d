"""``faceloop bench``: throughput, fixed overhead, memory and merge-at-scale figures (issue 6).

Every figure comes with its baseline, run in the same process tree on the same machine:
the refresh against a naive ``FaceAnalysis.get`` loop over the same images and model files,
a refresh's peak memory against one over 10x fewer images. See benchmarks/bench.py for exactly what
each number measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faceloop.commands import positive_int
from faceloop.config import load_settings

if TYPE_CHECKING:
    from benchmarks.bench import BenchPlan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the refresh against a naive loop, memory, no-op cost, merge at scale",
    )
    p.add_argument(
        "--quick", action="store_true", help="smaller version of each measurement (a few minutes)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--labelled",
        metavar="DIR",
        help="build the albums from a labelled folder (<dir>/<person>/<img>) "
        "instead of the sample photos installed packages ship",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="keep inputs, stores and logs here (default: a temp dir, deleted)",
    )
    p.add_argument(
        "--config",
        help="YAML config whose models/ray settings the refresh uses (store/sources ignored)",
    )
    p.add_argument(
        "--images",
        type=positive_int,
        help="images for the refresh / naive comparison (default 1000, quick 200)",
    )
    p.add_argument(
        "--memory-small",
        type=positive_int,
        help="images of the small memory run (default images/10)",
    )
    p.add_argument(
        "--merge-sizes", help="comma-separated face counts for the merge (default 1e4,1e5,1e6)"
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        help="naive / refresh pairs run interleaved; the ratio is that of the medians (default 3)",
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--no-loader", action="store_true", help="skip the dataset loader figures")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="instead of the CPU bench: detect+embed faces/s on onnxruntime's CUDA (and "
        "TensorRT) provider per recognizer batch size and worker layout, with a CPU figure on "
        "the same images (benchmarks/gpu.py; fails when a session falls back to CPU)",
    )
    g = p.add_argument_group("--gpu options (python -m benchmarks.gpu takes the same)")
    g.add_argument(
        "--gpu-images",
        metavar="DIR",
        help="photos to run on (default: the --labelled folder, else augmented sample photos)",
    )
    g.add_argument("--provider", default="cuda,tensorrt,cpu", help="cuda, tensorrt, cpu")
    g.add_argument("--batch-sizes", help="recognizer batch sizes (default 256)")
    g.add_argument(
        "--workers",
        help="concurrent worker counts, or auto: half the CPUs and all but two, at most one per "
        "7 GiB of GPU memory (default auto)",
    )
    g.add_argument(
        "--mode",
        choices=("threads", "processes"),
        help="GPU workers as threads or processes (default processes)",
    )
    g.add_argument("--gpu-limit", type=positive_int, default=2000, help="at most this many images")
    g.add_argument("--det-batch", type=positive_int, help="images per detector call (default 32)")
    g.add_argument(
        "--fixed-shapes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pad detector calls to --det-batch images and recognizer calls to the batch size "
        "(one input shape per model: on CUDA each new shape costs set-up inside the timing; "
        "default on)",
    )
    g.add_argument(
        "--repeat", type=positive_int, default=1, help="go over the photos this many times"
    )
    g.add_argument(
        "--det-uint8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="uint8 pixels into the detector, normalised in its graph (default: the config's "
        "models.det_uint8: with CUDA only)",
    )
    p.add_argument(
        "--prefect-api-url",
        help="use this running Prefect server for the with-server figures instead of starting one",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.add_argument(
        "--scale",
        action="store_true",
        help="only the label + publish stages on synthetic stores (no models): full build and "
        "1%% incremental refreshes per size (see docs/SCALING.md)",
    )
    p.add_argument(
        "--sizes", help="with --scale: comma-separated face counts (default 1e4,1e5,1e6)"
    )
    p.add_argument(
        "--increments",
        type=positive_int,
        default=3,
        help="with --scale: incremental refreshes timed per size; the median one's figures "
        "are reported (default 3)",
    )
    p.set_defaults(func=cmd_bench)


def _plan(args: argparse.Namespace) -> BenchPlan:
    from benchmarks.bench import BenchPlan

    plan = BenchPlan.quick() if args.quick else BenchPlan()
    if args.images:
        plan.refresh_images = args.images
        plan.memory_small = max(1, args.images // 10)
    if args.memory_small:
        plan.memory_small = args.memory_small
    if args.merge_sizes:
        plan.merge_sizes = tuple(_face_counts("--merge-sizes", args.merge_sizes, least=1))
    if args.rounds:
        plan.rounds = args.rounds
    plan.naive = not args.no_naive
    plan.loader = not args.no_loader
    plan.seed = args.seed
    return plan


def cmd_gpu(args: argparse.Namespace) -> int:
    """``faceloop bench --gpu``: benchmarks/gpu.py on a folder of photos."""
    from benchmarks.bench import build_sample_inputs, default_workdir
    from benchmarks.gpu import (
        DEFAULT_BATCH_SIZES,
        DEFAULT_DET_BATCH,
        DEFAULT_MODE,
        DEFAULT_WORKERS,
        check_providers_available,
        run_from_args,
    )
    from faceloop.errors import ConfigError

    why = check_providers_available(args.provider)
    if why:  # before building any input
        raise ConfigError(why)
    settings = load_settings(args.config)
    images = args.gpu_images or args.labelled
    work, temporary = default_workdir(args.out)
    try:
        if images is None:
            print(
                "bench: --gpu on augmented sample photos (--gpu-images DIR for yours)",
                file=sys.stderr,
            )
            images = str(build_sample_inputs(work / "inputs", args.images or 1000, seed=args.seed))
        elif not Path(images).is_dir():
            raise ConfigError(f"--gpu-images: not a folder: {images}")
        gpu_args = argparse.Namespace(
            images=images,
            provider=args.provider,
            batch_sizes=args.batch_sizes or DEFAULT_BATCH_SIZES,
            workers=args.workers or DEFAULT_WORKERS,
            mode=args.mode or DEFAULT_MODE,
            limit=args.gpu_limit,
            det_batch=args.det_batch or DEFAULT_DET_BATCH,
            fixed_shapes=args.fixed_shapes,
            repeat=args.repeat,
            det_uint8=settings.models.det_uint8 if args.det_uint8 is None else args.det_uint8,
            det_size=settings.models.det_size,
            det_input=settings.models.det_input,
            models=str(Path(settings.models.root) / "insightface"),
            cpu_workers=None,
            json=args.json,
        )
        return run_from_args(gpu_args)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _run_in_workdir(out: str | None, run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``run(work)`` in ``--out``, or in a temporary folder removed afterwards; the result's
    ``workdir`` names the folder kept (None when it was temporary)."""
    from benchmarks.bench import default_workdir

    work, temporary = default_workdir(out)
    try:
        res = run(work)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    res["workdir"] = None if temporary else str(work)
    return res


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.bench import run_bench
    from faceloop.errors import ConfigError

    if args.scale:
        return _cmd_scale(args)
    if args.gpu:
        return cmd_gpu(args)
    settings = load_settings(args.config)
    labelled = Path(args.labelled).absolute() if args.labelled else None
    if labelled and not labelled.is_dir():
        raise ConfigError(f"--labelled: not a folder: {labelled}")
    ray = settings.ray.model_dump(mode="json") if args.config else {}
    res = _run_in_workdir(
        args.out,
        lambda work: run_bench(
            _plan(args),
            work,
            model_root=Path(settings.models.root),
            labelled=labelled,
            config=str(Path(args.config).absolute()) if args.config else None,
            ray=ray or None,
            prefect_api_url=args.prefect_api_url,
            progress=_progress,
        ),
    )
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(format_report(res))
    return 0


def _face_counts(flag: str, text: str, least: int) -> list[int]:
    """A comma-separated list of face counts (``1e4,1e5``), each at least ``least``; a
    ConfigError (a usage error, exit 2) otherwise."""
    from faceloop.errors import ConfigError

    try:
        counts = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"{flag}: not a list of numbers: {text!r}") from exc
    if not counts or min(counts) < least:
        raise ConfigError(f"{flag}: give face counts of at least {least}")
    return counts


def _cmd_scale(args: argparse.Namespace) -> int:
    from benchmarks.scale import bench_scale

    sizes = _face_counts("--sizes", args.sizes or "1e4,1e5,1e6", least=100)
    res = _run_in_workdir(
        args.out,
        lambda work: bench_scale(
            sorted(sizes),
            work,
            seed=args.seed,
            # The label stage on Ray at every size (as in a refresh, whose face stage starts
            # Ray): the sizes compare like with like and the driver only orchestrates.
            use_ray=True,
            increments=args.increments,
            progress=_progress,
        ),
    )
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        for n, r in res["sizes"].items():
            print(
                f"{int(n):>9,} faces: full {r['full_seconds']:8.1f} s, incremental "
                f"{r['incremental_seconds']:7.1f} s, driver peak RSS "
                f"{r['driver_peak_rss_bytes'] / 2**20:7.0f} MiB, precision {r['precision']:.5f}, "
                f"recall {r['recall']:.5f}"
            )
        for k in (
            "full_build_seconds_at_max",
            "incremental_vs_full_ratio",
            "incremental_growth_ratio",
            "driver_rss_growth_ratio",
        ):
            print(f"{k}: {res[k]}")
    return 0


def _row(name: str, value: object, note: str = "") -> str:
    return f"| {name} | {value} | {note} |"


def format_report(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"faceloop bench on {m['cpus']} CPUs ({m['cpu']} {m.get('cpu_family_model', '')}; "
        f"{' '.join(m.get('cpu_isa', [])) or 'ISA unknown'}), {m['memory_gb']} GiB, load at "
        f"start {m['loadavg_at_start']}",
        f"inputs: {res['images']} images from {res['plan']['inputs']}",
        "",
        "| figure | value | baseline / note |",
        "|---|---|---|",
    ]
    if "naive_images_per_s" in res:
        n = res["naive"]
        lines.append(
            _row(
                "naive loop images/s",
                res["naive_images_per_s"],
                f"median of the rounds; FaceAnalysis.get per image, round {res.get('median_round')}"
                f": {n['faces']} faces, {n['seconds']} s incl. {n['load_seconds']} s imports + "
                "load",
            )
        )
    r = res["refresh"]
    lines.append(
        _row(
            "refresh images/s",
            res["refresh_images_per_s"],
            f"median of the rounds; round {res.get('median_round')}: {r['new_images']} images, "
            f"{r['new_faces']} faces, {r['seconds']} s flow wall time",
        )
    )
    if "refresh_vs_naive_ratio" in res:
        lines.append(
            _row(
                "refresh / naive",
                f"{res['refresh_vs_naive_ratio']}x",
                "ratio of the medians; rounds "
                + ", ".join(f"{x}x" for x in res.get("refresh_vs_naive_round_ratios", []))
                + "; target >= 2.0x"
                + ("" if res["refresh_vs_naive_ratio"] >= 2.0 else ": **not met**"),
            )
        )
        if "refresh_vs_naive_cpu_ratio" in res:
            lines.append(
                _row(
                    "refresh / naive, CPU seconds",
                    f"{res['refresh_vs_naive_cpu_ratio']}x",
                    f"medians of the rounds: naive "
                    f"{res.get('naive_tree_cpu_seconds_median', res['naive']['tree_cpu_seconds'])}"
                    " s, refresh "
                    f"{res.get('refresh_tree_cpu_seconds_median', r['tree_cpu_seconds'])} s "
                    "(process trees)",
                )
            )
    if "face_stage_cpu_busy_share" in res:
        fs = r.get("face_stage", {})
        lines.append(
            _row(
                "face stage CPU busy share",
                res["face_stage_cpu_busy_share"],
                f"worker CPU s / (wall s x {fs.get('cores_given')} cores), median of rounds; "
                "target >= 0.9"
                + ("" if (res["face_stage_cpu_busy_share"] or 0) >= 0.9 else ": **not met**"),
            )
        )
        lines.append(
            _row(
                "  the same after Ray's start",
                res.get("face_stage_cpu_busy_share_after_ray_start"),
                f"wall less Ray's start inside the stage ({fs.get('ray_start_s')} s)",
            )
        )
    for x in res.get("rounds", []):
        for side in ("naive", "refresh"):
            if side in x:
                ph = x[side]
                lines.append(
                    _row(
                        f"round {x['round']} {side}",
                        f"{ph['images_per_s']} images/s",
                        f"load {ph.get('loadavg_before')} -> {ph.get('loadavg_after')}, machine "
                        f"CPU busy {ph.get('machine_cpu_busy_share')}",
                    )
                )
    lines.append(
        _row(
            "no-op refresh, Prefect server",
            f"{res['noop_refresh_seconds']} s",
            f"process; flow {res['noop_refresh_flow_seconds']} s; target <= 10 s",
        )
    )
    lines.append(
        _row(
            "no-op refresh, no server",
            f"{res['noop_refresh_seconds_no_server']} s",
            f"process; flow {res['noop_refresh_flow_seconds_no_server']} s (ephemeral Prefect)",
        )
    )
    mi = res["memory_images"]
    lines.append(
        _row(
            "peak RSS, process tree",
            f"{res['peak_rss_small_mb']} MB / {res['peak_rss_large_mb']} MB",
            f"{mi['small']} / {mi['large']} images",
        )
    )
    lines.append(
        _row(
            "memory growth",
            f"{res['memory_growth_ratio']}x",
            "target <= 1.2x" + ("" if res["memory_growth_ratio"] <= 1.2 else ": **not met**"),
        )
    )
    if "few_new_photos_seconds" in res:
        lines.append(
            _row(
                "8 new photos into the store: driver / Ray",
                f"{res['few_new_photos_seconds']} s / {res['few_new_photos_seconds_ray']} s",
                "process seconds, medians (few_new_photos_*)",
            )
        )
    for n, s in res["merge_seconds"].items():
        mr = res["merge"][n]
        lines.append(
            _row(
                f"merge {int(n):,} faces",
                f"{s} s",
                f"{mr['n_centroids']:,} centroids, {mr['index']}, cpu {mr['cpu_seconds']} s, "
                f"peak RSS {mr['peak_rss_mb']} MB, precision {mr['pair_precision']}, recall "
                f"{mr['pair_recall']}",
            )
        )
    lines.append(_row("merge growth exponent", res["merge_growth_exponent"], "1.0 = linear"))
    lines.append(_row("merge pairwise precision (min)", res["merge_precision"], "synthetic truth"))
    ld = res.get("loader")
    if ld and "error" not in ld:
        lines.append(
            _row(
                "loader samples/s",
                ld["loader_samples_per_s"],
                f"pyarrow read {ld['pyarrow_read_samples_per_s']}, +decode "
                f"{ld['pyarrow_decode_samples_per_s']}",
            )
        )
        lines.append(
            _row(
                "loader_vs_plain_ratio",
                ld["loader_vs_plain_ratio"],
                "loader ÷ plain pyarrow read + decode, same shards, interleaved rounds",
            )
        )
    lines += [
        "",
        "stage breakdown of the refresh (actor busy seconds; cluster/write are flow wall seconds):",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in res["stages"].items()]
    return "\n".join(lines)
