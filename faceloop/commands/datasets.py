"""``faceloop datasets list|show|verify|gc``: inspect and maintain published dataset versions.

Every sub-command takes ``--store`` (a directory or ``s3://bucket/prefix``; default: the
``store`` of ``--config``, or of the environment / defaults) and ``--name`` (default:
``dataset.name`` of the same settings). S3 credentials come from the environment, as for every
store (see storage/objectstore.py); they are never printed.

Exit codes: 0 ok; 1 the command ran and found a problem (verify failed, version not found,
no such store); 2 a configuration or storage error (printed by faceloop/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from faceloop.commands import dataset_version, open_existing_store
from faceloop.config import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("datasets", help="list, show, verify and clean up dataset versions")
    dsub = d.add_subparsers(dest="datasets_cmd", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store", help="store root: a directory or s3://bucket/prefix (default: from --config)"
        )
        p.add_argument(
            "--name",
            "--dataset",  # as `faceloop train` names it
            dest="name",
            type=dataset_name_arg,
            help="dataset name (default: dataset.name from --config, else 'faces')",
        )
        p.add_argument("--config", help="YAML config supplying the defaults of --store and --name")

    ls = dsub.add_parser("list", help="committed versions: created, rows, classes, parent, latest")
    common(ls)
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    ls.set_defaults(func=cmd_list)

    sh = dsub.add_parser("show", help="a version's manifest plus its class and change counts")
    common(sh)
    sh.add_argument(
        "version",
        nargs="?",
        default="latest",
        type=dataset_version,
        help="N, vN or latest (default)",
    )
    sh.add_argument(
        "--json", action="store_true", help="print one JSON object {manifest, classes, changes}"
    )
    sh.set_defaults(func=cmd_show)

    ve = dsub.add_parser("verify", help="re-hash shards, classes and changes against the manifest")
    common(ve)
    ve.add_argument(
        "version",
        nargs="?",
        default="latest",
        type=dataset_version,
        help="N, vN or latest (default)",
    )
    ve.add_argument("--all", action="store_true", help="verify every committed version")
    ve.set_defaults(func=cmd_verify)

    gc = dsub.add_parser(
        "gc",
        help="remove half-written version directories; apply retention: and tombstones",
    )
    common(gc)
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.set_defaults(func=cmd_gc)


# --------------------------------------------------------------------------------------------
# helpers


def _open(args: argparse.Namespace) -> tuple[Any, str]:
    """``(store, dataset name)``; FaceloopError when the path holds no store."""
    if args.store and args.name and not args.config:
        store_root, name = args.store, args.name
    else:
        settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
        store_root, name = settings.store, args.name or settings.dataset.name
    return open_existing_store(store_root), name


def dataset_name_arg(text: str) -> str:
    """argparse type of a dataset name: one path segment (a bad one is a usage error, exit 2)."""
    from storage.manifest import check_name

    try:
        return check_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad dataset name {text!r}: up to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        ) from None


def _manifest_or_none(store: Any, name: str, version: int | str) -> dict[str, Any] | None:
    from storage.versions import read_manifest

    try:
        return read_manifest(store, name, version)
    except FileNotFoundError:
        which = "no version yet" if version == "latest" else f"no committed version {version}"
        print(f"faceloop: error: dataset {name!r} in {store.root}: {which}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------
# list


def _number(store: Any, name: str, version: int | str) -> int:
    """The number of ``version`` (``latest`` resolved)."""
    from storage.versions import latest_version

    v = latest_version(store, name) if version == "latest" else version
    assert v is not None
    return int(v)


def list_rows(store: Any, name: str) -> list[dict[str, Any]]:
    """One dict per committed version (ascending): version, created, rows, classes, parent,
    shards, changes counts, latest (bool)."""
    from storage.versions import ManifestUnreadable, latest_version, list_versions, read_manifest

    latest = latest_version(store, name)
    rows: list[dict[str, Any]] = []
    for v in list_versions(store, name):
        try:
            m = read_manifest(store, name, v)
        except ManifestUnreadable as exc:
            rows.append({"version": v, "error": str(exc), "latest": v == latest})
            continue
        except FileNotFoundError:
            continue  # removed while listed
        ch = m.get("changes", {})
        rows.append(
            {
                "version": v,
                "created": m.get("created"),
                "rows": m.get("num_rows"),
                "classes": m.get("num_classes"),
                "parent": m.get("parent"),
                "shards": len(m.get("shards", [])),
                "run_id": m.get("run_id"),
                "added": ch.get("added", 0),
                "removed": ch.get("removed", 0),
                "relabelled": ch.get("relabelled", 0),
                "latest": v == latest,
            }
        )
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    from storage.recovery import dataset_names
    from storage.versions import gc

    store, name = _open(args)
    rows = list_rows(store, name)
    if not rows and name not in (names := dataset_names(store)):
        # As show and verify do: a mistyped name is not an empty dataset.
        others = ", ".join(repr(n) for n in names) if names else "none published yet"
        print(
            f"faceloop: error: no dataset {name!r} in {store.root} (its datasets: {others})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"dataset {name!r} in {store.root}: no versions")
    else:
        print(f"dataset {name!r} in {store.root}")
        header = (
            f"{'':2}{'version':<7}  {'created':<27} {'rows':>9} {'classes':>8} "
            f"{'parent':>6} {'shards':>6}  changes"
        )
        print(header)
        for r in rows:
            mark = "* " if r["latest"] else "  "
            if "error" in r:
                print(f"{mark}{'v' + str(r['version']):<7}  manifest.json unreadable")
                continue
            parent = f"v{r['parent']}" if r["parent"] is not None else "-"
            print(
                f"{mark}{'v' + str(r['version']):<7}  {r['created']!s:<27} {r['rows']:>9} "
                f"{r['classes']:>8} {parent:>6} {r['shards']:>6}  "
                f"+{r['added']} -{r['removed']} ~{r['relabelled']}"
            )
        print("(* = latest)")
        for r in rows:
            if "error" in r:
                print(f"v{r['version']}: {r['error']}", file=sys.stderr)
    half = gc(store, name, dry_run=True)
    if half:
        print(
            f"{len(half)} half-written version director{'y' if len(half) == 1 else 'ies'}: "
            "`faceloop datasets gc` removes them"
        )
    return 0


# --------------------------------------------------------------------------------------------
# show


def _counts(store: Any, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Summaries of classes.parquet and changes.parquet (read from the store, not the manifest)."""
    import numpy as np

    from storage.versions import read_table

    v = manifest["version"]
    out: dict[str, Any] = {}
    classes = read_table(store, name, v, "classes")
    counts = classes.column("count").to_numpy() if classes.num_rows else np.zeros(0, np.int64)
    out["classes"] = {
        "classes": classes.num_rows,
        "faces": int(counts.sum()),
        "faces_per_class": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "max": int(counts.max()),
        }
        if len(counts)
        else None,
    }
    changes = read_table(store, name, v, "changes")
    by = {k: 0 for k in ("added", "removed", "relabelled")}
    if changes.num_rows:
        for row in changes.group_by("change").aggregate([("face_id", "count")]).to_pylist():
            by[row["change"]] = row["face_id_count"]
    out["changes"] = {"parent": manifest.get("parent"), **by, "total": changes.num_rows}
    return out


def cmd_show(args: argparse.Namespace) -> int:
    store, name = _open(args)
    manifest = _manifest_or_none(store, name, args.version)
    if manifest is None:
        return 1
    counts = _counts(store, name, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, **counts}, indent=2))
        return 0
    print(f"dataset {name!r} v{manifest['version']} in {store.root}")
    print(json.dumps(manifest, indent=2))
    c = counts["classes"]
    fpc = c["faces_per_class"]
    per = (
        f"; faces per class min {fpc['min']}, median {fpc['median']:g}, max {fpc['max']}"
        if fpc
        else ""
    )
    print(f"classes: {c['classes']} ({c['faces']} faces{per})")
    ch = counts["changes"]
    parent = f"v{ch['parent']}" if ch["parent"] is not None else "nothing (first version)"
    print(
        f"changes vs {parent}: {ch['added']} added, {ch['removed']} removed, {ch['relabelled']} "
        "relabelled"
    )
    return 0


# --------------------------------------------------------------------------------------------
# verify


def cmd_verify(args: argparse.Namespace) -> int:
    from storage.versions import ManifestUnreadable, list_versions, read_manifest, verify_version

    store, name = _open(args)
    if args.all:
        versions: list[int] = list_versions(store, name)
        if not versions:
            print(
                f"faceloop: error: dataset {name!r} in {store.root}: no version yet",
                file=sys.stderr,
            )
            return 1
    else:
        try:
            m = _manifest_or_none(store, name, args.version)
        except ManifestUnreadable:
            m = {"version": _number(store, name, args.version)}  # verify says what is wrong
        if m is None:
            return 1
        versions = [int(m["version"])]
    bad = 0
    for v in versions:
        problems = verify_version(store, name, v)
        if problems:
            bad += 1
            print(f"v{v}: FAILED ({len(problems)} problem{'s' if len(problems) != 1 else ''})")
            for p in problems:
                print(f"  {p}")
        else:
            m = read_manifest(store, name, v)
            print(
                f"v{v}: ok ({len(m['shards'])} shards, {m['num_rows']} rows, {m['num_classes']} "
                "classes)"
            )
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# gc


def cmd_gc(args: argparse.Namespace) -> int:
    from storage.versions import gc, sweep_pool

    store, name = _open(args)
    from storage.forget import face_matcher, retention_cleanup
    from storage.versions import (
        finish_commits,
        prune_superseded,
        superseded_to_remove,
        unreadable_manifests,
    )

    bad = unreadable_manifests(store, name)
    if bad:
        # What such a version lists is unknown: sweeping shards or rewriting versions around it
        # could delete what it needs. Nothing is done until it is removed (or restored).
        for v, why in sorted(bad.items()):
            print(f"faceloop: error: v{v}: {why}", file=sys.stderr)
        print(
            "faceloop: error: gc did nothing: a version whose manifest is unreadable may list "
            "any shard",
            file=sys.stderr,
        )
        return 1
    ret = load_settings(args.config).retention
    extra: list[str] = []
    if args.dry_run:
        from storage.lock import read_holder

        # As the real gc, which takes the lock: with no live writer holding it, a half-written
        # version is a dead writer's, however young.
        holder = read_holder(store)
        idle = holder is None or holder.dead_reason() is not None
        removed = gc(store, name, dry_run=True, **({"stale_after_s": -1.0} if idle else {}))
        doomed = superseded_to_remove(
            store, name, ret.superseded_versions_keep, ret.superseded_versions_days
        )
        extra += prune_superseded(
            store,
            name,
            ret.superseded_versions_keep,
            ret.superseded_versions_days,
            dry_run=True,
        )
        extra += retention_cleanup(store, ret.run_records_days, ret.reports_days, dry_run=True)
        m = face_matcher(store)
        if m is not None:
            from storage.forget import tombstoned_faces_in_datasets

            n = tombstoned_faces_in_datasets(store, m, dry_run=True)
            if n:
                print(f"would remove {n} rows of forgotten faces from dataset versions")
        shards = sweep_pool(store, name, dry_run=True, without=doomed)
    else:
        from faceloop.runids import new_run_id
        from storage.lock import store_lock
        from storage.recovery import recover

        lock_cfg = load_settings(args.config).lock
        run_id = new_run_id()
        with store_lock(
            store,
            run_id,
            "gc",
            wait_seconds=lock_cfg.wait_seconds,
            lease_seconds=lock_cfg.lease_seconds,
            recover=False,
        ):
            # A commit killed before it moved `latest`: finished first, so that retention
            # does not take the newest version for a superseded one.
            for fixed in finish_commits(store, name):
                print(f"finished an interrupted commit: {fixed}")
            # Under the lock no writer is live: what dead ones left (a half-written version
            # of a writer killed minutes ago, its staging) goes now, not after gc's 15-minute
            # wait for a writer that may still be at work.
            removed = gc(store, name, stale_after_s=-1.0)
            for item in recover(store, keep_run=run_id):
                print(f"removed what a dead writer left: {item}")
            # Retention (settings `retention:`) and tombstones (`faceloop forget`): no retained
            # version may hold a forgotten face.
            extra += prune_superseded(
                store, name, ret.superseded_versions_keep, ret.superseded_versions_days
            )
            extra += retention_cleanup(store, ret.run_records_days, ret.reports_days)
            m = face_matcher(store)
            if m is not None:
                from storage.forget import tombstoned_faces_in_datasets

                n = tombstoned_faces_in_datasets(store, m)
                if n:
                    print(f"removed {n} rows of forgotten faces from dataset versions")
            # Last: shards are shared by versions; only those no version lists any more go.
            shards = sweep_pool(store, name)
    verb = "would remove" if args.dry_run else "removed"
    for item in extra:
        print(f"{verb} {item} (retention)")
    for uri in removed:
        print(f"{verb} {uri}")
    for rel in shards:
        print(f"{verb} {rel} (a shard no version lists)")
    dirs = f"{len(removed)} half-written version director{'y' if len(removed) == 1 else 'ies'}"
    print(f"{verb}: {dirs}, {len(shards)} shard{'' if len(shards) == 1 else 's'} no version lists")
    return 0
