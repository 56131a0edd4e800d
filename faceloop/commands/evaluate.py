"""``faceloop eval`` (measured label quality) and ``faceloop calibrate`` (thresholds).

eval: labelled folder -> seeded benchmark (evaluation/benchmark.py) -> refresh -> score the faces
table against the truth, next to the Immich-style anchor on the same detections -> table on
stdout, ``<out>/eval.json`` and ``<out>/report.html``.

calibrate: labelled folder -> central-face embeddings (the pipeline's own per-image code) ->
genuine / impostor scores -> thresholds at target false-accept rates -> YAML config.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from faceloop.commands import positive_int, share
from faceloop.errors import ConfigError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="score labels on a seeded benchmark built from a labelled folder"
    )
    p.add_argument(
        "--labelled", required=True, help="folder with one sub-folder of images per person"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the benchmark's draws")
    p.add_argument(
        "--benchmark",
        choices=("plain", "hard"),
        default="plain",
        help="plain: album images are the labelled photos as they are; hard: each is remade "
        "in-the-wild-like (group scenes, small faces, occlusion, pose skew, blur, strong JPEG; "
        "evaluation/hard.py), same people and albums",
    )
    p.add_argument(
        "--large-share",
        type=float,
        default=None,
        help="with --benchmark hard: share of album images placed in large photos (1600-4000 px "
        "wide, face 60-160 px: phone shots; default 0)",
    )
    p.add_argument("--out", default="./var/eval", help="work folder (benchmark, store, results)")
    p.add_argument("--config", default=None, help="settings YAML (models, policy thresholds)")
    p.add_argument("--albums", type=int, default=None, help="number of albums (default 40)")
    p.add_argument(
        "--people-per-album",
        type=int,
        default=None,
        help="recurring people drawn into each album on average (default 8)",
    )
    p.add_argument("--id-subjects", type=int, default=None, help="ID-card subjects (default 400)")
    p.add_argument(
        "--id-crop",
        type=float,
        default=None,
        help="share of a photo's width its simulated ID-chip photo keeps (default 0.5, for "
        "photos framed like LFW's; about 1.0 for sets of tight face crops)",
    )
    p.add_argument(
        "--engine",
        choices=("ray", "inline"),
        default="ray",
        help="ray: the real refresh flow; inline: the same stages in this process "
        "(no Ray, no Prefect, no publish) for small machines",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the Immich-style anchor")
    p.add_argument(
        "--part",
        choices=("all", "idcards"),
        default="all",
        help="idcards: refresh and score only the ID-card subjects of the same benchmark "
        "(same draws as 'all'; a few times faster)",
    )
    p.add_argument(
        "--privacy",
        choices=("none", "blur", "omit"),
        default=None,
        help="contact sheets in the report (default: report.privacy of the config)",
    )
    p.set_defaults(func=cmd_eval)

    c = subparsers.add_parser(
        "calibrate", help="estimate cosine thresholds for target false-accept rates"
    )
    c.add_argument(
        "--labelled", required=True, help="folder with one sub-folder of images per person"
    )
    c.add_argument(
        "--out", required=True, help="YAML config to write, e.g. configs/calibrated.yaml"
    )
    c.add_argument("--config", default=None, help="settings YAML whose models are measured")
    c.add_argument(
        "--backend",
        choices=("insightface", "opencv"),
        default=None,
        help="model backend to calibrate (default: models.backend of the config)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the simulated ID photos")
    c.add_argument(
        "--id-far", type=share(0.0, 1.0), default=1e-4, help="FAR target of idcard_accept"
    )
    c.add_argument(
        "--max-people", type=positive_int, default=None, help="use at most this many people (>= 1)"
    )
    c.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    c.add_argument(
        "--exclude-bench",
        action="append",
        default=[],
        metavar="DIR",
        help="a benchmark folder of `faceloop eval` (<out>/bench): its ID-card people (subjects, "
        "impostors, background faces) are left out, so the thresholds are not fitted on the "
        "people the eval scores; repeatable",
    )
    c.add_argument(
        "--embeddings",
        default=None,
        metavar="DIR",
        help="cache of the embedded faces: written on the first run, reused by later runs with "
        "the same people, seed and backend (threshold analyses without the models)",
    )
    c.set_defaults(func=cmd_calibrate)


# --- eval ------------------------------------------------------------------------------------


def _refresh_inline(settings: Any, publish: bool = False) -> str:
    """The refresh flow's stages run in this process without Ray or Prefect: re-embed with a
    registered recognizer (if one is), discover -> faces -> label, and with ``publish`` the
    dataset version (eval scores the faces table and skips it). Returns the run id."""
    from faceloop.runids import new_run_id
    from storage.objectstore import open_store
    from storage.recovery import finish_run
    from tasks.backends import model_infos
    from tasks.discover import discover
    from tasks.faces import detect_pending
    from tasks.label import label_run
    from tasks.publish import publish_dataset
    from tasks.ray_faces import inline_threads
    from tasks.reembed import reembed_store, relabel_pending, relabelled, with_registered_model

    settings = with_registered_model(settings)
    store = open_store(settings.store)
    run_id = new_run_id()
    reembedded = reembed_store(settings, store)
    disc = discover(settings, store, run_id)
    det_rel = None
    if disc.pending_rel:
        det_rel = detect_pending(
            settings, store, disc.pending_rel, run_id, threads=inline_threads(settings.ray)
        )
    relabel = bool(reembedded) or relabel_pending(store)
    res = label_run(settings, store, run_id, det_rel, disc.quarantined_rows, relabel_all=relabel)
    if relabel:
        relabelled(store)
    log.info("eval refresh %s: %d new images, %d new faces", run_id, disc.new, res.new_faces)
    if publish:
        models = [i.to_dict() for i in model_infos(settings.models)]
        publish_dataset(settings, store, run_id, models)
    # As the flow does after a successful run: the kept store passed `faceloop doctor` only
    # from the Ray engine's runs (the inline one left its staging, an "orphan").
    finish_run(store, run_id)
    return run_id


def _read_faces(store_root: str, extra: tuple[str, ...] = ()) -> list[dict]:
    from storage.objectstore import open_store
    from storage.tables import read_faces

    base = ["face_id", "image_uri", "source_kind", "bbox", "det_score", "embedding"]
    cols = list(dict.fromkeys([*base, "status", "identity_id", *extra]))  # each column once
    return read_faces(open_store(store_root), columns=cols).to_pylist()


def _text_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    from evaluation.report import fmt_float

    width = max([len(header[0])] + [len(r[0]) for r in rows])
    cols = [max(10, len(h)) for h in header[1:]]
    lines = [
        f"{header[0]:<{width}}  "
        + "  ".join(f"{h:>{c}}" for h, c in zip(header[1:], cols, strict=True))
    ]
    for r in rows:
        vals = "  ".join(
            f"{fmt_float(v):>{c}}" if isinstance(v, float) else f"{v!s:>{c}}"
            for v, c in zip(r[1:], cols, strict=False)
        )
        lines.append(f"{r[0]:<{width}}  {vals}")
    return lines


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """The headline figures (faceloop beside the anchor, and which is better), then every
    figure of every labeller side by side, one per line."""
    from evaluation.report import eval_table_rows, headline_rows

    lines = _text_table(*headline_rows(results))
    lines += ["", *_text_table(*eval_table_rows(results))]
    return "\n".join(lines)


# What an eval's benchmark was built from and where (``<out>/bench/source.json``): a rerun into
# the same --out must be one of the same labelled folder at the same place.
SOURCE_FILE = "source.json"


def _other_source(bench: Path, source: dict[str, str]) -> str | None:
    """Why the benchmark in ``bench`` cannot serve this run (None: it can): built from another
    labelled folder (its scores would be that folder's), or moved since it was built (its
    store names the photos where they were, so every face would go unscored)."""
    try:
        built = json.loads((bench / SOURCE_FILE).read_text())
    except FileNotFoundError:
        return None  # built before faceloop recorded it: nothing to compare
    if built.get("bench") != source["bench"]:
        return (
            f"{bench} was built at {built.get('bench')} and moved since: its store names the "
            "photos where they were built; move it back or use a fresh --out"
        )
    if built.get("labelled") != source["labelled"]:
        return (
            f"{bench} holds a benchmark of another labelled folder ({built.get('labelled')}); "
            "use a fresh --out"
        )
    if not Path(source["labelled"]).exists():
        return f"labelled folder not found: {source['labelled']}"
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.benchmark import TRUTH_FILE, BenchmarkParams, Truth, build_benchmark
    from evaluation.metrics import score_benchmark
    from evaluation.report import report_for_store, review_rows
    from evaluation.review_round import COLUMNS as ROUND_COLUMNS
    from evaluation.review_round import face_persons, review_round
    from faceloop.config import SourceSpec, load_settings

    out = Path(args.out).absolute()
    bench = out / "bench"
    overrides = {
        k: v
        for k, v in (
            ("n_albums", args.albums),
            ("people_per_album", args.people_per_album),
            ("n_id_subjects", args.id_subjects),
            ("id_crop", args.id_crop),
            ("benchmark", args.benchmark if args.benchmark != "plain" else None),
            ("large_share", args.large_share),
        )
        if v is not None
    }
    if args.id_crop is not None and not 0.1 <= args.id_crop <= 1.5:
        raise ConfigError(f"--id-crop {args.id_crop}: give a share of the width in [0.1, 1.5]")
    if args.large_share is not None and (
        args.benchmark != "hard" or not 0.0 <= args.large_share <= 1.0
    ):
        raise ConfigError("--large-share takes a share in [0, 1], with --benchmark hard")
    params = BenchmarkParams(seed=args.seed, **overrides)
    id_only = args.part == "idcards"
    sources = [SourceSpec(kind="idcard", uri=str(bench / "idcards"))]
    if not id_only:
        sources.insert(0, SourceSpec(kind="album", uri=str(bench / "albums")))
    # Before any image is made: a typo in the config is said at once.
    settings = load_settings(args.config, store=str(out / "store"), sources=sources)
    source = {"labelled": str(Path(args.labelled).absolute()), "bench": str(bench)}
    if (bench / TRUTH_FILE).exists():
        truth = Truth.load(bench)
        if truth.params != json.loads(json.dumps(params.to_dict())):
            raise ConfigError(f"{bench} holds a benchmark with other parameters; use a fresh --out")
        if (why := _other_source(bench, source)) is not None:
            raise ConfigError(why)
    else:
        truth = build_benchmark(args.labelled, bench, params)
        (bench / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    # The baseline clusters faceloop's own detections: give it an embedding for every one, not
    # only for the faces faceloop's gates let through (faceloop's own labels do not change).
    settings.models.embed_gated = not args.no_baseline
    # The benchmark's faces are not the user's review work: a config whose Label Studio is up
    # had a project of LFW crops pushed into it by every eval.
    settings.review.enabled = False
    t0 = time.perf_counter()
    if args.engine == "ray":
        from faceloop.logs import quiet_prefect_logs
        from flows.refresh import run_refresh

        quiet_prefect_logs()

        run_id = run_refresh(settings).run_id
    else:
        run_id = _refresh_inline(settings)
    seconds = time.perf_counter() - t0
    truth_images = (
        {r: rec for r, rec in truth.images.items() if rec["kind"] != "album"}
        if id_only
        else truth.images
    )
    faces = _read_faces(settings.store, extra=(*ROUND_COLUMNS, "quality"))
    from tasks.idcard import accept_threshold

    th = settings.thresholds
    results = score_benchmark(
        faces,
        truth_images,
        truth.pairs,
        str(bench),
        baseline=not args.no_baseline,
        accept_rule=lambda q_id, q_live: accept_threshold(th, settings.quality, q_id, q_live),
    )
    # The same faces after one review round answered from the truth (evaluation/review_round.py):
    # what annotators add, beside what it asks of them. Not a labeller of its own: the headline
    # figures stay the automatic ones.
    after = review_round(faces, face_persons(faces, truth_images, str(bench)), settings)
    reviewed = score_benchmark(after.faces, truth_images, truth.pairs, str(bench), baseline=False)
    # A duplicate claim is caught by the automatic labeller, which sends it to review; the
    # round then settles those faces (their reasons become the answers'), which the claims
    # figure would read as "missed". What was caught is the automatic run's.
    if "claims" in results["faceloop"]:
        reviewed["faceloop"]["claims"] = results["faceloop"]["claims"]
    review = after.summary() | {"figures": reviewed["faceloop"]}
    if id_only:  # no album was refreshed: its figures would be empty, not measured
        for figures in (*results.values(), review["figures"]):
            figures.pop("albums", None)
    meta = {
        "seed": args.seed,
        "params": params.to_dict(),
        "backend": settings.models.backend,
        "recognizer": settings.models.recognizer_name or "the backend's own",
        "thresholds": settings.thresholds.model_dump(),
        "engine": args.engine,
        "refresh_seconds": round(seconds, 1),
        "config": args.config,
        "part": args.part,
    }
    (out / "eval.json").write_text(
        json.dumps({"meta": meta, "results": results, "review_round": review}, indent=1)
    )
    privacy = args.privacy or settings.report.privacy
    report = report_for_store(
        settings.store,
        settings.thresholds,
        out / "report.html",
        privacy=privacy,
        sample_per_status=settings.report.sample_per_status,
        # The report's "all figures" table gets the reviewed faces as a third column.
        evaluation=results | {"faceloop after one review round": review["figures"]},
        title=f"faceloop eval ({params.benchmark}, seed {args.seed})",
        summary={
            "run_id": run_id,
            "backend": settings.models.backend,
            "refresh seconds": round(seconds, 1),
        },
    )
    print(
        f"benchmark {bench} ({params.benchmark}, seed {args.seed}, {params.n_albums} albums, "
        f"{params.n_id_subjects} ID subjects), backend {settings.models.backend} "
        f"(recognizer {settings.models.recognizer_name or 'of the backend'}), engine {args.engine}"
    )
    print(format_table(results))
    print(
        f"\nafter one review round answered from the truth ({review['tasks']} tasks, "
        f"{review['unanswerable']} unanswerable; {review['faces_settled']} faces settled, "
        f"{review['propagated']} propagated):"
    )
    print("\n".join(_text_table(*review_rows(results, review["figures"]))))
    print(f"\nJSON: {out / 'eval.json'}\nreport: {report}")
    return 0


# --- calibrate -------------------------------------------------------------------------------


def _embed_for_calibration(
    args: argparse.Namespace, settings: Any, people: dict[str, list[Path]], names: list[str]
) -> tuple[Any, Any, dict[str, str]]:
    """(live faces, simulated chip faces, person -> the image its chip was made from), from
    the cache in ``--embeddings`` when it holds the same inputs, else embedded now (and cached).
    Every image is embedded as an ID-card live photo (ungated; the album gate is applied to
    the album pairs afterwards), so one pass serves the album and the ID figures."""
    import hashlib
    import tempfile

    from evaluation.benchmark import BenchmarkParams, simulate_id_photo
    from evaluation.calibrate import Embedded, chip_draws, embed_labelled
    from faceloop.vocab import Role
    from tasks.backends import load_backend

    bp = BenchmarkParams(seed=args.seed)
    chips = chip_draws(people, names, bp)
    id_src = {p: str(src) for p, src, _ in chips}
    key = {
        "backend": settings.models.backend,
        # The recognizer (and detector) that made the embeddings: another one's were taken, and
        # their thresholds written under this one's name.
        "recognizer": settings.thresholds_key,
        "recognizer_sha256": settings.models.recognizer_sha256,
        "detector": [settings.models.det_size, settings.models.det_input],
        "idcard_flip": settings.models.idcard_flip_on(),
        "seed": args.seed,
        "people": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "chips": [bp.id_size, bp.id_quality, bp.id_crop],
    }
    cache = Path(args.embeddings) if args.embeddings else None
    if cache and (cache / "key.json").exists():
        if json.loads((cache / "key.json").read_text()) != json.loads(json.dumps(key)):
            raise SystemExit(f"{cache} caches other inputs; use a fresh --embeddings folder")
        return Embedded.load(cache / "live.npz"), Embedded.load(cache / "id.npz"), id_src
    backend = load_backend(settings.models)
    live = embed_labelled([(p, f, Role.LIVE) for p in names for f in people[p]], settings, backend)
    with tempfile.TemporaryDirectory(prefix="faceloop-cal-") as tmp:
        items = []
        for p, src, quality in chips:
            dst = Path(tmp) / f"{p}.jpg"
            dst.write_bytes(simulate_id_photo(src, bp, quality))
            items.append((p, dst, Role.ID))
        ids = embed_labelled(items, settings, backend)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        live.save(cache / "live.npz")
        ids.save(cache / "id.npz")
        (cache / "key.json").write_text(json.dumps(key))
    return live, ids, id_src


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from evaluation.benchmark import BenchmarkParams, Truth, scan_labelled
    from evaluation.calibrate import (
        centroid_scores,
        gate_mask,
        id_pair_scores,
        live_match_scores,
        live_match_threshold,
        pair_scores,
        recommend,
        write_calibrated_config,
    )
    from faceloop.config import load_settings

    overrides: dict[str, Any] = {}
    if args.backend:
        overrides["models"] = {"backend": args.backend}
    settings = load_settings(args.config, **overrides)
    if args.backend and args.config:
        settings.models.use_backend(args.backend)
    out = Path(args.out)
    if args.config and out.resolve() == Path(args.config).resolve():
        raise ConfigError(
            f"--out {args.out} is the --config file: calibrate writes only models and policy, "
            "and would replace the config's store, sources and review settings; write another "
            "file and merge its policy block in"
        )
    if out.exists() and not args.force:
        raise ConfigError(f"--out {args.out} exists: give another file, or --force to replace it")
    people = scan_labelled(args.labelled)
    excluded: set[str] = set()
    for bench in args.exclude_bench:
        excluded |= Truth.load(bench).idcard_people()
    names = sorted(p for p in people if p not in excluded)
    if args.max_people:
        random.Random(args.seed).shuffle(names)
        names = sorted(names[: args.max_people])
    recurring = sum(len(people[p]) >= 2 for p in names)
    if recurring < 2:  # no genuine pair, or no impostor pair, to set a threshold from
        raise ConfigError(
            f"calibrate needs people with >= 2 images each, found {recurring} in "
            f"{args.labelled} (layout <person>/<image>; other people are --exclude-bench'ed)"
        )
    live, ids, id_src = _embed_for_calibration(args, settings, people, names)
    qs = settings.quality
    album = live.subset(gate_mask(live, "album", qs))
    face_gen, face_imp = pair_scores(album.emb, album.persons)
    cents = centroid_scores(album.emb, album.persons, seed=args.seed)
    # ID pairs: each simulated chip vs the person's other images (genuine) and everyone else's
    # images (impostor), both as the ID-card rules see them (size gate only).
    lives = live.subset(
        gate_mask(live, "idcard", qs)
        & np.array(
            [id_src.get(p) != path for p, path in zip(live.persons, live.paths, strict=True)]
        )
    )
    chips = ids.subset(gate_mask(ids, "idcard", qs))
    idp = id_pair_scores(chips, lives)
    id_args: dict[str, Any] = {
        "id_far": args.id_far,
        "id_quality": (idp["genuine_quality"], idp["impostor_quality"], qs.idcard_low_quality),
    }
    cal = recommend(face_gen, face_imp, idp["genuine"], idp["impostor"], cents, **id_args)
    # The several-live-photos rule may add only what the pair thresholds left of the target:
    # ``direct`` = share of all impostor pairs passing their own pair's threshold.
    th = cal.thresholds
    good = idp["impostor_quality"] >= qs.idcard_low_quality
    low_t = th.idcard_accept_low_quality
    passed = np.sum(idp["impostor"][good] >= th.idcard_accept) + (
        np.sum(idp["impostor"][~good] >= low_t) if low_t is not None else 0
    )
    direct = float(passed) / max(idp["impostor"].size, 1)
    lm = live_match_scores(chips, lives, th.idcard_accept, th.idcard_review, qs.idcard_low_quality)
    live_match = live_match_threshold(lm, args.id_far - direct)
    live_match[1]["direct_far_at_idcard_accept"] = direct
    cal = recommend(
        face_gen, face_imp, idp["genuine"], idp["impostor"], cents, **id_args, live_match=live_match
    )
    bp = BenchmarkParams(seed=args.seed)
    header = (
        f"Calibrated by `faceloop calibrate` on {args.labelled} ({len(names)} people"
        + (f", {len(excluded)} eval ID-card people left out" if excluded else "")
        + f", {len(live.emb)} images with a central face, seed {args.seed}), backend "
        f"{settings.models.backend} (ID-card flip TTA {settings.models.idcard_flip_on()}), "
        f"{time.strftime('%Y-%m-%d')}.\nFace pairs: {face_gen.size} genuine / {face_imp.size} "
        "impostor; ID pairs (simulated "
        f"{bp.id_size[0]}x{bp.id_size[1]} JPEG q{bp.id_quality[0]}-{bp.id_quality[1]} chip photos "
        f"vs live images): {idp['genuine'].size} / {idp['impostor'].size}.\n"
        f"idcard_accept at ID-pair FAR {args.id_far:g} (pairs whose faces both reach "
        f"quality.idcard_low_quality {qs.idcard_low_quality:g}); idcard_accept_low_quality at the "
        f"same FAR on the other pairs;\nidcard_review at FAR 1e-2; merge at centroid FAR 1e-5; "
        "duplicate at centroid FAR 1e-4;\nattach at face-to-centroid FAR 1e-4; outlier at "
        "face-to-centroid FAR 1e-2; cohesion_min halfway from outlier to the genuine median.\n"
        "See evaluation/calibrate.py."
    )
    key = settings.thresholds_key
    write_calibrated_config(
        args.out,
        settings.models.backend,
        cal,
        header,
        recognizer=key if key != settings.models.backend else None,
        # A recognizer file of one's own (not built in): named, not "the backend's own".
        recognizer_file=(
            str(Path(settings.models.recognizer).absolute()),
            settings.models.recognizer_sha256,
        )
        if settings.models.recognizer and key == settings.models.backend
        else None,
    )
    print(
        f"backend {settings.models.backend}: {len(album.emb)} album faces, {face_gen.size} "
        f"genuine / {face_imp.size} impostor pairs"
    )
    print(f"{'FAR':>8}  {'threshold':>9}  {'TAR':>6}  method")
    for row in cal.far_table:
        print(
            f"{row['far_target']:>8.0e}  {row['threshold']:>9.3f}  {row['tar']:>6.3f}  "
            f"{row['method']}"
        )
    # What was written (write_calibrated_config leaves out what calibrate does not estimate).
    print(
        "recommended:",
        json.dumps(
            cal.thresholds.model_dump(
                exclude_unset=True, exclude={"repair", "repair_floor", "pair_floor"}
            )
        ),
    )
    for name in ("idcard_accept", "idcard_accept_low_quality", "idcard_review"):
        ev = cal.evidence[name]
        print(
            f"{name}: {ev['threshold']:.4f} ({ev['method']}, {ev['n_impostor']} impostor / "
            f"{ev['n_genuine']} genuine pairs, measured FAR {ev['far_measured']:.3g}, "
            f"TAR {ev['tar']:.4f})"
        )
    ev = cal.evidence["idcard_live_match"]
    if "threshold" in ev:
        print(
            f"idcard_live_match: {ev['threshold']:.4f} ({ev['method']}, FAR budget "
            f"{ev['far_budget']:.3g} = {args.id_far:g} - {ev['direct_far_at_idcard_accept']:.3g}; "
            f"{ev['n_impostor_in_band']} of {ev['n_impostor']} impostor triplets in "
            f"the band; wins back {ev['genuine_won_back']:.3f} of {ev['n_genuine_in_band']} "
            "genuine band triplets)"
        )
    else:
        print(f"idcard_live_match: off ({ev})")
    print(f"written: {args.out}")
    return 0
