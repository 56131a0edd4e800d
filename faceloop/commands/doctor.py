"""``faceloop doctor --store S``: check a store's invariants, one line per check.

Checks: every table file (faces, label overlays, images, label state) can be read; unique face
ids; every face has its image row and every photo with faces its face rows; every committed
dataset version verifies (storage/versions.verify_version) and no half-written version is
left; no orphan staging; no
stale temp files (in the store, and faceloop temp dirs of dead processes); the lock's state
(free or held by a live writer: a dead holder is a failure until the next writer takes over);
no interrupted ``faceloop forget`` (Label Studio tasks still to delete are reported, not failed);
a store format this faceloop knows (storage/format.py); the store's secret where tombstones or
the forget audit are keyed by it; the tombstones where the forget audit records forgets; the
forget audit's MAC chain, and the log itself wherever tombstones are.
Read-only: it never takes the lock nor repairs anything (the next refresh does, see
storage/recovery.py). Exit 0 when every check holds, 1 otherwise; ``--json`` prints
``{"ok": bool, "checks": [{"check", "ok", "detail"}]}``. Paths and counts only: never face
crops, embeddings or file contents.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from faceloop.commands import open_existing_store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check a store's invariants (exit 0 when all hold)")
    p.add_argument("--store", help="store root: a directory or s3://bucket/prefix")
    p.add_argument("--config", help="YAML config supplying the default of --store")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)


def _few(items: list[Any], n: int = 3) -> str:
    head = ", ".join(str(i) for i in items[:n])
    return head + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _versions(store: Any) -> Iterator[tuple[str, int]]:
    """``(dataset, version)`` of every committed version (folders that are no dataset's
    skipped)."""
    from storage.manifest import list_versions
    from storage.recovery import dataset_names

    for name in dataset_names(store):
        try:
            versions = list_versions(store, name)
        except ValueError:
            continue
        for v in versions:
            yield name, v


def _forgotten_in_versions(store: Any) -> tuple[bool, str]:
    """Whether no dataset version holds a face `faceloop forget` tombstoned (a version copied
    back from a backup, say), and what was found: `datasets gc` rewrites such versions. Versions
    whose shards cannot be read are left to the "dataset versions verify" check."""
    import pyarrow as pa

    from faceloop.errors import StorageError
    from storage.forget import face_matcher, forgotten_rows

    m = face_matcher(store)
    if m is None:
        return True, "nothing forgotten"
    held: list[str] = []
    for name, v in _versions(store):
        try:
            n = forgotten_rows(store, m, name, v)
        except (StorageError, OSError, ValueError, pa.ArrowException):
            continue
        if n:
            held.append(f"{name} v{v}: {n} rows")
    if held:
        return False, f"{_few(held)}: `faceloop datasets gc` removes them"
    return True, "none"


def _forget_audit(store: Any) -> tuple[bool, str]:
    """Whether the forget audit log is whole: every line chained by its MAC to the one before
    it (storage.privacy.check_audit; lines of an earlier faceloop, without one, accepted as a
    prefix), and there wherever tombstones are (a forget audits every tombstone it writes)."""
    from faceloop.errors import StorageError
    from storage import layout
    from storage.privacy import check_audit, read_pending, store_secret

    try:
        data = store.read_bytes(layout.AUDIT_FORGET)
    except FileNotFoundError:
        # (a forget killed before its line: its pending record holds the request)
        if store.exists(layout.TOMBSTONES) and read_pending(store) is None:
            return False, (
                f"{layout.AUDIT_FORGET} is missing, but {layout.TOMBSTONES} is there (removed?): "
                "restore it from a backup"
            )
        return True, "no forget recorded"
    try:
        key = store_secret(store, create=False)
    except StorageError:
        key = None
    if key is None:
        return False, 'cannot be verified: the store secret is missing (see "store secret")'
    c = check_audit(data, key)
    legacy = (
        f"; the first {c.legacy} lines, written before the log was chained, are taken as they are"
        if c.legacy
        else ""
    )
    if c.bad is not None:
        return False, (
            f"line {c.bad} of {layout.AUDIT_FORGET} does not verify (a line edited, removed or "
            f"moved at or before it): restore the log from a backup{legacy}"
        )
    return True, f"{c.chained} lines verify{legacy}"


def _interrupted_commits(store: Any) -> list[str]:
    """Datasets whose `latest` pointer is behind their newest committed version (a writer
    killed between its manifest and the pointer: storage.versions.finish_commits)."""
    from storage.manifest import latest_version, newest_version
    from storage.recovery import dataset_names

    out = []
    for name in dataset_names(store):
        try:
            latest, newest = latest_version(store, name), newest_version(store, name)
        except ValueError:
            continue
        if latest != newest:
            out.append(f"{name}: latest v{latest}, v{newest} committed")
    return out


def _open_folders(store: Any) -> list[str]:
    """Folders of a local store (its root and two levels below it) that another user could
    change: writable by others (not sticky), or owned by another user (who can make them so).
    Group write is left alone: ``storage.dir_mode`` may share a store with a team."""
    import os
    import stat
    from pathlib import Path

    from storage.objectstore import LocalStore

    if not isinstance(store, LocalStore):
        return []
    me = os.geteuid()
    root = Path(store.root)
    found: list[str] = []
    todo = [(root, 0)]
    while todo:
        d, depth = todo.pop()
        try:
            st = d.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        rel = str(d.relative_to(root)) if d != root else "."
        if st.st_uid != me:
            found.append(f"{rel} (owner uid {st.st_uid})")
        elif st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            found.append(f"{rel} (mode {stat.S_IMODE(st.st_mode):o})")
        if depth < 2:
            try:
                todo += [(c, depth + 1) for c in d.iterdir() if c.is_dir() and not c.is_symlink()]
            except OSError:
                continue
    return sorted(found)


def _readable_by_others(store: Any, file_mode: int, dir_mode: int) -> tuple[int, list[str]]:
    """Files and folders of a local store that other users can read (or enter) where the
    configured modes give them nothing: a restore or copy made without keeping the modes
    (``cp -r --no-preserve=all``: 0644 files, 0755 folders) put the crops, embeddings and the
    secret in every user's reach. ``(how many, the first few)``."""
    import os
    import stat

    from storage.objectstore import LocalStore

    if not isinstance(store, LocalStore):
        return 0, []
    file_bits = stat.S_IROTH & ~file_mode
    dir_bits = (stat.S_IROTH | stat.S_IXOTH) & ~dir_mode
    n, first = 0, list[str]()
    for here, dirs, files in os.walk(store.root):
        for name, bits in [(d, dir_bits) for d in dirs] + [(f, file_bits) for f in files]:
            path = os.path.join(here, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode) or not st.st_mode & bits:
                continue
            n += 1
            if len(first) < 3:
                rel = os.path.relpath(path, store.root)
                first.append(f"{rel} (mode {stat.S_IMODE(st.st_mode):o})")
    return n, first


def run_checks(store: Any, file_mode: int = 0o600, dir_mode: int = 0o700) -> list[dict[str, Any]]:
    """``[{check, ok, detail}]`` for ``store`` (an ObjectStore); ``file_mode`` / ``dir_mode``:
    the configured ``storage.file_mode`` / ``dir_mode``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from faceloop.errors import StorageError
    from faceloop.schema import FACES_SCHEMA, IMAGES_SCHEMA, IMG_OK
    from storage import layout
    from storage.lock import lock_state
    from storage.objectstore import conform
    from storage.recovery import (
        dead_temp_dirs,
        half_written_versions,
        label_commit_open,
        staging_runs,
        stale_temp_files,
    )
    from storage.tables import faces_files, read_faces_file
    from storage.versions import verify_version

    out: list[dict[str, Any]] = []

    def add(check: str, ok: bool, detail: str) -> None:
        out.append({"check": check, "ok": ok, "detail": detail})

    # An empty folder is a fresh store, and every check below holds on it: said so, since it
    # is also what an unmounted store's mount point looks like.
    from storage.objectstore import holds_anything

    held = holds_anything(store)
    add(
        "store made",
        True,
        "yes"
        if held
        else "not yet: nothing here (a fresh store; if one was expected here, check the path "
        "or its mount)",
    )

    # A store in a newer format than this faceloop's: every writer refuses it (storage/format.py).
    from storage.format import FORMAT, read_format, too_new

    try:
        fmt = read_format(store)
        why = too_new(fmt)
        add(
            "store format",
            why is None,
            why
            or (
                f"{fmt['format']} ({fmt.get('written_by') or 'writer not named'})"
                if fmt
                else f"no record yet (format {FORMAT}; the next writer records it)"
            ),
        )
    except StorageError as exc:
        add("store format", False, str(exc))

    # The secret tombstones and pseudonyms are keyed by, lost (a backup that left it out): the
    # next refresh would make a new one, and forgotten people's photos no longer match.
    from storage.secret import lost_secret

    secret_lost = lost_secret(store)
    add("store secret", secret_lost is None, secret_lost or "there, or nothing keyed by it yet")
    # The tombstones, lost the same way (or deleted as if state/ held caches): the next refresh
    # would take the forgotten people's photos in again.
    from storage.privacy import lost_tombstones

    tombstones_lost = lost_tombstones(store)
    add(
        "forget tombstones",
        tombstones_lost is None,
        tombstones_lost or "there, or no forget wrote any",
    )
    add("forget audit", *_forget_audit(store))

    # Every table file is read on its own: one that cannot be read (cut short, overwritten) is
    # a failed check naming it, and the checks below run on the others.
    unreadable: list[str] = []

    def each(rels: list[str], read: Any, schema: pa.Schema) -> pa.Table:
        """The files ``rels`` that ``read`` can read, as one table of ``schema``."""
        parts = [schema.empty_table()]
        for rel in rels:
            try:
                parts.append(conform(read(rel), schema))
            except (StorageError, pa.ArrowException, OSError) as exc:
                unreadable.append(f"{rel} ({type(exc).__name__})")
        return pa.concat_tables(parts)

    face_cols = ["face_id", "image_uri", "image_sha256"]
    face_schema = pa.schema([FACES_SCHEMA.field(c) for c in face_cols])
    overlays = {o.rel for o in store.list(layout.LABELS)}
    faces = each(
        faces_files(store), lambda r: read_faces_file(store, r, face_cols, overlays), face_schema
    )
    image_cols = ["image_uri", "image_sha256", "status", "n_faces"]
    images = each(
        [o.rel for o in store.list(layout.IMAGES) if o.rel.endswith(".parquet")],
        lambda r: store.read_parquet_file(r, columns=image_cols),
        pa.schema([IMAGES_SCHEMA.field(c) for c in image_cols]),
    )
    # The label state and discovery's stamps: caches (a refresh drops a damaged one and builds
    # it again from the tables), checked so that a damaged one is seen.
    caches = [o.rel for o in store.list(layout.LABEL_STATE) if o.rel.endswith(".parquet")]
    caches += [layout.SOURCE_STAMPS] if store.exists(layout.SOURCE_STAMPS) else []
    each(caches, lambda r: store.read_parquet_file(r, columns=[]), pa.schema([]))
    only_caches = all(r.split(" ", 1)[0] in caches for r in unreadable)
    add(
        "table files readable",
        not unreadable,
        "all"
        if not unreadable
        else f"{len(unreadable)} not: {_few(unreadable)}"
        + (" (caches: the next refresh drops and rebuilds them)" if only_caches else ""),
    )

    ids = faces.column("face_id")
    dup = faces.num_rows - pc.count_distinct(ids).as_py()
    add("unique face ids", dup == 0, f"{faces.num_rows} faces, {dup} duplicate ids")

    known = set(
        zip(
            images.column("image_uri").to_pylist(),
            images.column("image_sha256").to_pylist(),
            strict=True,
        )
    )
    missing = [
        f
        for f, u, s in zip(
            ids.to_pylist(),
            faces.column("image_uri").to_pylist(),
            faces.column("image_sha256").to_pylist(),
            strict=True,
        )
        if (u, s) not in known
    ]
    open_commit = label_commit_open(store) if missing else None
    add(
        "faces have image rows",
        not missing,
        f"{len(missing)} of {faces.num_rows} faces without an image row"
        + (f", e.g. {_few(missing)}" if missing else "")
        + (
            f" (run {open_commit} stopped inside its label commit: the next `faceloop "
            "refresh` completes it)"
            if open_commit
            else ""
        ),
    )
    # The other way: a photo the detector found faces on keeps them (by content: a moved or
    # copied photo's faces are its original's). A faces file deleted or replaced by hand left
    # doctor green while the next refresh published a version without those faces.
    with_faces = pc.and_(
        pc.equal(images.column("status"), str(IMG_OK)), pc.greater(images.column("n_faces"), 0)
    )
    decoded = set(images.filter(with_faces).column("image_sha256").to_pylist())
    lost = sorted(decoded - set(faces.column("image_sha256").to_pylist()))
    add(
        "images keep their faces",
        not lost,
        f"{len(decoded)} photos with faces"
        + (
            f", {len(lost)} of them without any face row (a faces file deleted or replaced?), "
            f"e.g. sha256 {_few([s[:12] for s in lost])}"
            if lost
            else ""
        ),
    )

    problems: list[str] = []
    n_versions = 0
    for name, v in _versions(store):
        n_versions += 1
        try:
            problems += [f"{name} v{v}: {p}" for p in verify_version(store, name, v)]
        except (OSError, ValueError, StorageError) as exc:
            # (a manifest without read permission stopped doctor before any line)
            problems.append(f"{name} v{v}: cannot be read ({type(exc).__name__}: {exc})")
    add(
        "dataset versions verify",
        not problems,
        f"{n_versions} versions" + (f"; {_few(problems)}" if problems else ", all verify"),
    )
    try:
        forgotten = (
            (False, 'unknown: the tombstones are missing (see "forget tombstones")')
            if tombstones_lost
            else _forgotten_in_versions(store)
        )
    except (OSError, ValueError, StorageError) as exc:
        forgotten = (False, f"versions cannot be read ({type(exc).__name__}: {exc})")
    add("no forgotten face in a dataset version", *forgotten)
    half = [f"{n} v{v}" for n, v in half_written_versions(store)]

    lock = lock_state(store)
    live_writer = lock["state"] == "held"
    # While a live writer runs, its staging and its half-written version are work in progress.
    if not half:
        half_said = "none"
    elif live_writer:
        half_said = f"{_few(half)} (a writer is live)"
    else:
        # (a writer killed, or one that could not remove its own: storage/versions.py)
        half_said = (
            f"{_few(half)} (left by a stopped writer: the next refresh or `faceloop datasets "
            "gc` removes it)"
        )
    add("no half-written versions", not half or live_writer, half_said)
    behind = _interrupted_commits(store)
    add(
        "latest is the newest version",
        not behind or live_writer,
        (f"{_few(behind)} (an interrupted commit: the next refresh or `datasets gc` finishes it)")
        if behind
        else "yes",
    )
    staging = staging_runs(store)
    add(
        "no orphan staging",
        not staging or live_writer,
        (f"staging of runs {_few(staging)}" if staging else "none")
        + (" (a writer is live)" if staging and live_writer else ""),
    )
    from tasks.reembed import relabel_pending

    # Faces re-embedded with another recognizer and the store not relabelled since (a refresh
    # that failed or was killed in between: its labels are the old embeddings'); the next
    # refresh finishes it. It was not reported, however many refreshes failed on it.
    pending_relabel = relabel_pending(store)
    add(
        "no re-embed left half done",
        not pending_relabel or live_writer,
        "the stored faces were re-embedded and not relabelled since: the next refresh finishes "
        "it" + (" (a writer is live)" if live_writer else "")
        if pending_relabel
        else "none",
    )
    tmp = stale_temp_files(store)
    dirs = [str(d) for d in dead_temp_dirs()]
    add(
        "no stale temp files",
        (not tmp or live_writer) and not dirs,
        f"{len(tmp)} in the store"
        + (f" ({_few(tmp)})" if tmp else "")
        + f", {len(dirs)} temp dirs of dead processes"
        + (f" ({_few(dirs)})" if dirs else ""),
    )
    from storage.privacy import read_pending

    pending = read_pending(store)
    # Not finished: store work left, or the audit line of a forget killed after it. Label
    # Studio tasks left (it was unreachable) are named, the store itself being whole.
    unfinished = []
    if pending is not None and not pending.store_done:
        unfinished.append("store work of an interrupted forget left")
    if pending is not None and pending.store_done and pending.requests:
        unfinished.append("the audit line of a forget killed after its store work")
    said = list(unfinished)
    if pending is not None and pending.ls_tasks:
        said.append(f"{len(pending.ls_tasks)} Label Studio tasks left to delete")
    add(
        "forget finished",
        not unfinished,
        "; ".join(said) + "; `faceloop forget --resume` finishes it"
        if said
        else "no pending forget",
    )
    add(
        "lock",
        lock["state"] != "dead",
        f"{lock['state']}" + (f": {lock['reason']}" if lock["reason"] else ""),
    )
    # A store holds biometric data and the secret its pseudonyms are keyed with: a folder others
    # can write lets them replace run records, tables or the secret.
    shared = _open_folders(store)
    add(
        "store folders private",
        not shared,
        f"others can change {_few(shared)}: make them this user's, not writable by others "
        "(chmod o-w, chown)"
        if shared
        else "no folder another user can write",
    )
    n_open, some = _readable_by_others(store, file_mode, dir_mode)
    add(
        "store unreadable to others",
        not n_open,
        f"other users can read {n_open} files or folders, e.g. {', '.join(some)} (a copy that "
        f"lost the modes?): chmod -R o-rwx {store.root}, or set storage.file_mode / dir_mode"
        if n_open
        else "nothing other users can read beyond storage.file_mode / dir_mode",
    )
    return out


def cmd_doctor(args: argparse.Namespace) -> int:
    from faceloop.config import load_settings

    settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
    # a mistyped path passed every check of an empty store: it holds none
    store = open_existing_store(settings.store)
    checks = run_checks(store, settings.storage.file_mode, settings.storage.dir_mode)
    ok = all(c["ok"] for c in checks)
    if args.json:
        print(json.dumps({"store": store.uri(""), "ok": ok, "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
    return 0 if ok else 1
