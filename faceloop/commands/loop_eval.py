"""``faceloop loop-eval``: does training on faceloop's labels help on people never seen?

labelled folder -> split by person (evaluation/loop_eval.py) -> train albums labelled by the
refresh -> published dataset version -> ``train --on-top`` of the current embedder -> test
albums labelled by the refresh once, then re-embedded and relabelled with each model (the base
embedder and the trained one, both registered in their own copy of the test store, so both
embed the same stored crops) -> verification TAR at FAR 1e-3 / 1e-4 and clustering figures on
the test people, side by side (table, ``<out>/loop_eval.json``; ``--json`` prints it).

Work folder ``<out>``: ``split.json``, ``train/bench``, ``train/store``, ``test/bench``,
``test/store`` (labelled with the base models), ``test/store-base``, ``test/store-trained``,
``model/recognizer.onnx``. A rerun with the same split reuses the split and both labelled
stores (their refresh is a no-op), so trying other training options costs only the training
and the two re-embeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from faceloop.commands import share


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "loop-eval",
        help="split a labelled folder by person, label and train on the train people, "
        "compare base and trained recognizer on the test people",
    )
    p.add_argument(
        "--labelled", required=True, help="folder with one sub-folder of images per person"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split, albums and training")
    p.add_argument(
        "--out", default="./var/loop-eval", help="work folder (benchmarks, stores, model)"
    )
    p.add_argument("--config", default=None, help="settings YAML (models, policy thresholds)")
    p.add_argument(
        "--test-share", type=share(0.0, 1.0), default=0.3, help="share of people kept for testing"
    )
    p.add_argument("--train-albums", type=int, default=40, help="albums built from train people")
    p.add_argument("--test-albums", type=int, default=20, help="albums built from test people")
    p.add_argument(
        "--people-per-album", type=int, default=8, help="recurring people per album on average"
    )
    p.add_argument("--epochs", type=int, default=10, help="training passes over the version")
    p.add_argument("--batch-size", type=int, default=128, help="faces per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapter")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="adapter weight decay")
    p.add_argument("--margin", type=float, default=0.5, help="ArcFace additive angular margin")
    p.add_argument("--scale", type=float, default=64.0, help="ArcFace logit scale")
    p.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="share of classes in each step's softmax (Partial FC); 1 = full softmax",
    )
    p.add_argument("--device", default="auto", help="training device: auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--engine",
        choices=("ray", "inline"),
        default="ray",
        help="ray: the real refresh flow; inline: the same stages in this process (no Ray, "
        "no Prefect) for small machines and tests",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_loop_eval)


def _refresh(settings: Any, engine: str) -> str:
    """One refresh of ``settings.store`` (publishing a version when labels changed)."""
    if engine == "ray":
        # Prefect's temporary server gets 20 s to start by default; a busy machine needs more.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        from faceloop.logs import quiet_prefect_logs
        from flows.refresh import run_refresh

        quiet_prefect_logs()
        return run_refresh(settings).run_id
    from faceloop.commands.evaluate import _refresh_inline

    return _refresh_inline(settings, publish=True)


def _settings(args: argparse.Namespace, store: Path, bench: str) -> Any:
    from faceloop.config import SourceSpec, load_settings

    settings = load_settings(
        args.config,
        store=str(store),
        sources=[SourceSpec(kind="album", uri=str(Path(bench) / "albums"))],
    )
    settings.review.enabled = False  # nobody answers review tasks here
    return settings


def _read_faces(store: str) -> list[dict]:
    from faceloop.commands.evaluate import _read_faces as read

    return read(store, extra=("model",))


def cmd_loop_eval(args: argparse.Namespace) -> int:
    from evaluation.loop_eval import SplitParams, build_split, disjoint, format_table, score_side
    from faceloop.commands.train import current_embedder
    from faceloop.hashing import sha256_file
    from storage.manifest import newest_version
    from storage.objectstore import open_store
    from training.loop import TrainConfig, train_on_top
    from training.registry import register_model

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name: str, since: float) -> float:
        phases[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    params = SplitParams(
        seed=args.seed,
        test_share=args.test_share,
        train_albums=args.train_albums,
        test_albums=args.test_albums,
        people_per_album=args.people_per_album,
    )
    try:
        split = build_split(args.labelled, out, params)
    except FileExistsError as exc:
        print(f"faceloop: {exc}")
        return 2
    if not disjoint(split):  # cannot happen by construction; never report a leaky split
        raise RuntimeError("a person is on both sides of the split")
    t = phase("split_and_benchmarks", t0)

    # 1. Label the train people's albums with the refresh; it publishes a dataset version.
    train_settings = _settings(args, out / "train" / "store", split.roots["train"])
    _refresh(train_settings, args.engine)
    dataset = train_settings.dataset.name
    version = newest_version(open_store(train_settings.store), dataset)
    if version is None:
        print("faceloop: the train albums produced no accepted faces: nothing to train on")
        return 1
    t = phase("label_train_albums", t)

    # 2. Train on top of the current embedder on that version.
    base_path, base_info = current_embedder(None, args.config, train_settings.store)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        margin=args.margin,
        scale=args.scale,
        sample_rate=args.sample_rate,
        device=args.device,
        seed=args.seed,
    )
    res = train_on_top(
        train_settings.store,
        dataset,
        out / "model",
        base_path,
        version=version,
        config=cfg,
        base_info=base_info,
    )
    t = phase("train_on_top", t)

    # 3. Label the test people's albums once (base models), then re-embed and relabel a copy
    # of that store with each model, both registered the same way.
    test_store = out / "test" / "store"
    _refresh(_settings(args, test_store, split.roots["test"]), args.engine)
    t = phase("label_test_albums", t)
    models = {
        "base": {
            "path": str(base_path),
            "name": str(base_info.get("name") or base_path.stem),
            "sha256": sha256_file(base_path),
            "source": base_info.get("source"),
        },
        "trained": {
            "path": res.onnx_path,
            "name": json.loads(Path(res.info_path).read_text())["name"],
            "sha256": res.sha256,
            "base_sha256": sha256_file(base_path),
            "dataset": res.dataset,
        },
    }
    results: dict[str, dict[str, Any]] = {}
    for side, model in models.items():
        store = out / "test" / f"store-{side}"
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(test_store, store)
        register_model(str(store), model["path"], name=model["name"])
        settings = _settings(args, store, split.roots["test"])
        _refresh(settings, args.engine)  # re-embeds every stored face, relabels everything
        faces = _read_faces(settings.store)
        tags = {f"@sha256:{model['sha256']}" in (r.get("model") or "") for r in faces}
        results[side] = score_side(faces, split.test_truth, split.roots["test"])
        results[side]["faces_embedded_by_model"] = tags == {True}
        t = phase(f"reembed_and_score_{side}", t)
    phases["total"] = round(time.perf_counter() - t0, 1)

    report = {
        "params": params.to_dict(),
        "engine": args.engine,
        "split": {
            "train_people": split.train_people,
            "test_people": split.test_people,
            "train_album_people": split.album_people("train"),
            "train_album_images": split.album_images("train"),
            "test_album_people": split.album_people("test"),
            "test_album_images": split.album_images("test"),
            "people_on_both_sides": 0,
        },
        "train": {
            "dataset": res.dataset,
            "config": {
                k: getattr(cfg, k)
                for k in ("epochs", "batch_size", "lr", "weight_decay", "margin", "scale")
            }
            | {"sample_rate": cfg.sample_rate, "device": res.device},
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "separation_before": res.separation_before,
            "separation_after": res.separation_after,
        },
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in models.items()},
        "results": results,
        "seconds": phases,
    }
    (out / "loop_eval.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    s = report["split"]
    print(
        f"split by person (seed {args.seed}): {s['train_people']} train / {s['test_people']} test "
        f"people; train albums {s['train_album_images']} images of {s['train_album_people']} "
        f"people, test albums {s['test_album_images']} images of {s['test_album_people']} people"
    )
    print(
        f"trained on {res.dataset['name']} v{res.dataset['version']} "
        f"({res.dataset['num_rows']} faces, {res.dataset['num_classes']} identities), "
        f"{cfg.epochs} epochs, lr {cfg.lr:g}, margin {cfg.margin:g}: loss {res.loss_before:.3f} "
        f"-> {res.loss_after:.3f}"
    )
    for side, m in report["models"].items():
        print(f"{side:>8}: {m['name']}  sha256:{m['sha256']}")
    print()
    print(format_table(results))
    print()
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"JSON: {out / 'loop_eval.json'}")
    return 0
