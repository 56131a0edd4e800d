"""``faceloop train`` and ``faceloop models register``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from faceloop.commands import dataset_version
from faceloop.commands.datasets import dataset_name_arg


def _subparsers_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train an ArcFace recognizer on a dataset version, export ONNX"
    )
    t.add_argument("--store", required=True, help="store root: a directory or s3://bucket/prefix")
    t.add_argument(
        "--dataset",
        "--name",  # as `faceloop datasets` names it
        dest="dataset",
        required=True,
        type=dataset_name_arg,
        help="dataset name",
    )
    t.add_argument(
        "--version",
        type=dataset_version,
        default="latest",
        help="dataset version: N, vN or latest (default)",
    )
    t.add_argument("--epochs", type=int, default=10, help="passes over the dataset")
    t.add_argument("--batch-size", type=int, default=128, help="faces per training step")
    t.add_argument(
        "--dim",
        type=int,
        default=128,
        choices=(128, 512),
        help="embedding size (a backbone from scratch; --on-top keeps the base model's)",
    )
    t.add_argument(
        "--sample-rate",
        type=float,
        default=0.1,
        help="share of classes in each step's softmax (Partial FC); 1 = full softmax",
    )
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--seed", type=int, default=0, help="seed of weights and batch order")
    t.add_argument("--out", required=True, help="folder for recognizer.onnx and recognizer.json")
    t.add_argument(
        "--register", action="store_true", help="register the model in the store afterwards"
    )
    t.add_argument(
        "--on-top",
        action="store_true",
        help="fine-tune the current embedder (frozen) with a residual adapter instead of "
        "training a backbone: the store's registered recognizer, else the shipped one",
    )
    t.add_argument("--base", default=None, help="with --on-top: this ArcFace ONNX as the embedder")
    t.add_argument(
        "--config",
        default=None,
        help="YAML config (where the shipped models are: models.root; the thresholds --register "
        "checks the model against)",
    )
    t.add_argument(
        "--force",
        action="store_true",
        help="with --register: register it even when it fails the check (see models register)",
    )
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_train)

    # `models` belongs to faceloop.commands.core (fetch, list); add `register` to it, or create
    # the group when core is not installed.
    models = sub.choices.get("models")
    msub = _subparsers_of(models) if models is not None else None
    if msub is None:
        models = sub.add_parser("models", help="fetch, list and register the face models")
        msub = models.add_subparsers(dest="models_cmd", required=True, metavar="COMMAND")
    r = msub.add_parser("register", help="make a trained recognizer the store's current model")
    r.add_argument("file", help="recognizer .onnx (its recognizer.json sidecar is read if present)")
    r.add_argument("--store", required=True, help="store root: a directory or s3://bucket/prefix")
    r.add_argument(
        "--name",
        default=None,
        help="model name (default: from recognizer.json, else the file name)",
    )
    r.add_argument(
        "--expected-sha256",
        default=None,
        metavar="HEX",
        help="sha256 the file must have, known from outside the store (refused on mismatch)",
    )
    r.add_argument(
        "--config",
        default=None,
        help="YAML config whose thresholds (policy) the next refreshes will judge the model by",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="register it even when too many pairs of different people of the dataset it was "
        "trained on reach the merge threshold (a refresh would merge them)",
    )
    r.set_defaults(func=cmd_models_register)
    u = msub.add_parser(
        "unregister",
        help="take a registered recognizer out of use: the one before it (or the built-in) is "
        "current again, and the next refresh re-embeds the faces with it",
    )
    u.add_argument("name", nargs="?", help="the registered name (see the registry's entries)")
    u.add_argument("--all", action="store_true", help="every registered one: back to the built-in")
    u.add_argument("--store", required=True, help="store root: a directory or s3://bucket/prefix")
    u.add_argument(
        "--config",
        default=None,
        help="YAML config whose lock settings (lock.wait_seconds) the command holds the store by",
    )
    u.set_defaults(func=cmd_models_unregister)


def cmd_train(args: argparse.Namespace) -> int:
    from faceloop.config import load_settings
    from faceloop.errors import ConfigError
    from training.loop import TrainConfig, pick_device, train
    from training.registry import register_model

    if args.base and not args.on_top:
        raise ConfigError("--base needs --on-top")
    # Every setting is checked before the first epoch: a typo in --config or --device would
    # otherwise surface only after training (at --register) or never.
    load_settings(args.config, store=args.store)
    pick_device(args.device)

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        embedding_dim=args.dim,
        sample_rate=args.sample_rate,
        lr=args.lr,
        num_workers=args.workers,
        device=args.device,
        seed=args.seed,
    )
    version = None if args.version == "latest" else int(args.version)
    if args.on_top:
        from training.loop import train_on_top

        base, base_info = current_embedder(args.base, args.config, args.store)
        res = train_on_top(
            args.store,
            args.dataset,
            args.out,
            base,
            version=version,
            config=cfg,
            base_info=base_info,
        )
    else:
        res = train(args.store, args.dataset, args.out, version=version, config=cfg)
    out = {f.name: getattr(res, f.name) for f in fields(res)} | {"images_per_s": res.images_per_s}
    if args.register:
        from faceloop.errors import FaceloopError

        try:
            with _registry_lock(args.store, args.config):
                out["registered"] = register_model(
                    args.store,
                    res.onnx_path,
                    check=lambda: checked(args.config, args.store, res.onnx_path, None, args.force),
                )
        except FaceloopError as exc:
            # The model is trained and written: say where, and how to register it as it is
            # (a probe read "register it anyway with --force" as "train again with --force").
            raise type(exc)(
                f"{exc}. The model is written ({res.onnx_path}, sha256:{res.sha256}; loss "
                f"{res.loss_before:.4f} -> {res.loss_after:.4f}): `faceloop models register "
                f"{res.onnx_path} --store {args.store} --force` registers it without training "
                "again"
            ) from None
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"trained on {res.dataset['name']} v{res.dataset['version']} "
            f"({res.dataset['num_rows']} faces, {res.dataset['num_classes']} identities) on "
            f"{res.device}"
        )
        print(
            f"loss {res.loss_before:.4f} -> {res.loss_after:.4f}, {res.images_per_s:.1f} images/s"
        )
        if res.separation_before is not None:
            print(
                f"same - different identity cosine: {res.separation_before:.3f} (base) -> "
                f"{res.separation_after:.3f}"
            )
        print(f"{res.onnx_path}  sha256:{res.sha256}")
        if args.register:
            print(_check_line(out["registered"]["check"]))
            print(f"registered as {out['registered']['name']}")
    return 0


def checked(
    config: str | None, store: str, onnx_path: str | Path, name: str | None, force: bool
) -> dict:
    """:func:`training.registry.check_recognizer` under the thresholds the store's refreshes
    will use for the model (``config``'s policy); ConfigError when it fails, unless ``force``."""
    from faceloop.config import load_settings
    from training.registry import (
        base_name,
        check_recognizer,
        model_name,
        refuse_unless_checked,
        thresholds_for,
    )

    merge, key = thresholds_for(
        load_settings(config, store=store), model_name(onnx_path, name), base_name(store, onnx_path)
    )
    check = check_recognizer(store, onnx_path, merge, key)
    refuse_unless_checked(check, force)
    if check.get("ok") is False:
        check["forced"] = True
    return check


def _check_line(check: dict) -> str:
    if check.get("ok") is None:
        return f"check: skipped ({check.get('why')})"
    tar = f", one identity {check['tar']:.1%}" if check.get("tar") is not None else ""
    verdict = "ok" if check["ok"] else "FAILED, registered with --force"
    return (
        f"check: {verdict}: at the merge threshold {check['merge']:.2f} "
        f"(policy.{check['policy']}), {check['identity_pairs_merged']} of "
        f"{check['identity_pairs']} pairs of identities would merge; pairs of faces: different "
        f"identities {check['far']:.2%}{tar} ({check['faces']} faces of "
        f"{check['dataset']['name']} v{check['dataset'].get('version')})"
    )


def current_embedder(base: str | None, config: str | None, store: str) -> tuple[Path, dict]:
    """The recognizer --on-top builds on: ``base`` (--base), else the store's current
    registered model (fetched as the refresh fetches it), else the configured built-in one
    (EdgeFace-S by default), else the insightface backend's shipped recognizer. Returns its
    path and what to record of it."""
    from faceloop.config import load_settings
    from faceloop.modelstore import (
        BUILTIN_RECOGNIZERS,
        builtin_recognizer_path,
        ensure_model_infos,
        fetch_recognizer,
        model_path,
    )
    from tasks.reembed import with_registered_model

    if base:
        return Path(base), {"name": Path(base).stem, "source": "file"}
    models = with_registered_model(load_settings(config, store=store)).models
    builtin = BUILTIN_RECOGNIZERS.get(models.recognizer_name or "")
    if (
        models.recognizer
        and builtin is not None
        and Path(models.recognizer) == builtin_recognizer_path(Path(models.root), builtin.name)
    ):
        path = fetch_recognizer(Path(models.root), builtin.name)
        return path, {"name": builtin.name, "source": "built-in", "package": builtin.dist}
    if models.recognizer:
        return Path(models.recognizer), {"name": models.recognizer_name, "source": "registered"}
    root = Path(models.root)
    info = next(i for i in ensure_model_infos(root, "insightface") if i.role == "recognizer")
    return model_path(root, "insightface", info), {
        "name": info.name,
        "source": "shipped",
        "package": info.package,
    }


@contextlib.contextmanager
def _registry_lock(store_root: str, config: str | None) -> Iterator[None]:
    """The store lock around a change of the model registry (read, changed, written whole): two
    registrations at once both exited 0 and one was lost; a dead writer's leftovers (a
    registry temp file) are recovered first, as every writer does."""
    from faceloop.config import load_settings
    from faceloop.runids import new_run_id
    from storage.lock import store_lock
    from storage.objectstore import open_store

    cfg = load_settings(config).lock
    with store_lock(
        open_store(store_root),
        new_run_id(),
        "models",
        wait_seconds=cfg.wait_seconds,
        lease_seconds=cfg.lease_seconds,
    ):
        yield


def cmd_models_unregister(args: argparse.Namespace) -> int:
    from faceloop.commands import open_existing_store
    from faceloop.errors import ConfigError
    from training.registry import current_model, unregister_models

    if bool(args.name) == bool(args.all):
        raise ConfigError("give the registered name of a recognizer, or --all")
    open_existing_store(args.store)
    with _registry_lock(args.store, args.config):
        gone = unregister_models(args.store, None if args.all else args.name)
    now = current_model(args.store)
    print(
        f"unregistered {', '.join(str(e.get('name')) for e in gone)}; current recognizer: "
        + (f"{now.get('name')} (sha256 {now['sha256'][:12]}...)" if now else "the configured one")
        + " (the next refresh re-embeds the stored faces with it)"
    )
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    from faceloop.commands import open_existing_store
    from training.registry import register_model

    open_existing_store(args.store)  # a mistyped --store is not a new store
    with _registry_lock(args.store, args.config):
        entry = register_model(
            args.store,
            args.file,
            name=args.name,
            expected_sha256=args.expected_sha256,
            check=lambda: checked(args.config, args.store, args.file, args.name, args.force),
        )
    print(json.dumps(entry, indent=2))
    print(_check_line(entry["check"]), file=sys.stderr)
    return 0
