"""Roll back what a dead writer left, and find it (for ``faceloop doctor``).

Called by :func:`storage.lock.store_lock` right after the store lock is taken: the caller is
then the only writer, so everything in progress belongs to a writer that died (``kill -9``, a
lost machine, an S3 outage mid-write) and is removed at once, without waiting for any timeout:

- ``staging/<run>/`` of every run but the caller's (a crashed run's work list and detections;
  the images it never recorded are discovered again by the next run, so nothing is lost); a
  run that had recorded its images (its label commit done) and died before its run record
  (or failed, and could not write it: flows/refresh.py leaves its staging then) gets one that
  says so (:func:`record_interrupted_run`);
- half-written dataset versions (``v<N>/`` without ``manifest.json``), whatever their marker
  says (:func:`storage.versions.gc` with no staleness wait), then the pool shards they had
  written that no committed version lists (:func:`storage.versions.sweep_pool`);
- local temp files of atomic writes (``.<name>.tmp-<hex>``, e.g. ``state/.faces_generation.tmp-*``);
- faceloop temp dirs in the system temp dir whose process is gone (``faceloop-[<kind>-]<pid>-*``,
  :func:`storage.objectstore.temp_dir_prefix`), and pid-less ones from older versions after an
  hour.

Only paths are logged, never contents (face crops are biometric data).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from storage import layout
from storage.manifest import version_dirs
from storage.objectstore import TMP_MARK, LocalStore, ObjectStore

log = logging.getLogger(__name__)

_TEMP_DIR = re.compile(r"^faceloop-(?:[a-z]+-)?(\d+)-")
_LEGACY_TEMP_DIR = re.compile(r"^faceloop-(?:shard-)?[a-z0-9_]+$")
LEGACY_TEMP_AGE_S = 3600.0


def staging_runs(store: ObjectStore) -> list[str]:
    """Run ids that have a ``staging/<run>/`` folder."""
    runs = {o.rel.split("/")[1] for o in store.list(layout.STAGING) if o.rel.count("/") >= 2}
    return sorted(runs)


def dataset_names(store: ObjectStore) -> list[str]:
    names = {o.rel.split("/")[1] for o in store.list("datasets") if o.rel.count("/") >= 2}
    return sorted(names)


def half_written_versions(store: ObjectStore) -> list[tuple[str, int]]:
    """``(dataset, N)`` of every version directory without a manifest."""
    out = []
    for name in dataset_names(store):
        try:
            dirs = version_dirs(store, name)
        except ValueError:  # not a dataset name we would have written
            continue
        out += [(name, v) for v, files in sorted(dirs.items()) if layout.MANIFEST not in files]
    return out


def stale_temp_files(store: ObjectStore) -> list[str]:
    """Store-relative paths of leftover atomic-write temp files (local stores only: an S3 PUT
    leaves nothing half-written behind)."""
    if not isinstance(store, LocalStore):
        return []
    root = Path(store.root)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and TMP_MARK in name:
                out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def dead_temp_dirs(tmpdir: str | None = None) -> list[Path]:
    """faceloop temp dirs in the system temp dir whose owning process is gone."""
    from storage.lock import pid_alive

    try:
        base = Path(tmpdir or tempfile.gettempdir())
    except FileNotFoundError:  # no writable temp folder at all: none of ours can be there
        return []
    out = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    now = time.time()
    for p in entries:
        if not p.name.startswith("faceloop-"):
            continue
        with contextlib.suppress(OSError):
            if not p.is_dir() or p.is_symlink():
                continue
            m = _TEMP_DIR.match(p.name)
            if m:
                if not pid_alive(int(m.group(1))):
                    out.append(p)
            elif _LEGACY_TEMP_DIR.match(p.name) and now - p.stat().st_mtime > LEGACY_TEMP_AGE_S:
                out.append(p)
    return sorted(out)


def recover(store: ObjectStore, keep_run: str | None = None) -> list[str]:
    """Remove everything dead writers left (see the module docstring). The caller must hold the
    store lock. Returns what was removed (URIs and paths), for logs and tests."""
    from storage.versions import finish_commits, gc, sweep_pool

    removed: list[str] = []
    for run in staging_runs(store):
        if run == keep_run:
            continue
        record_interrupted_run(store, run, keep_run)
        store.delete_prefix(layout.staging_dir(run))
        removed.append(store.uri(layout.staging_dir(run)))
    for name in dataset_names(store):
        try:
            dirs = version_dirs(store, name)  # one listing of the dataset for both below
        except ValueError:  # not a dataset name we would have written
            continue
        # A commit killed between its manifest and the `latest` pointer.
        removed += finish_commits(store, name, dirs)
        if any(layout.MANIFEST not in files for files in dirs.values()):
            # Under the store lock no writer is live: no staleness wait (negative = always
            # stale).
            removed += gc(store, name, stale_after_s=-1.0)
            # The shards the dead writer put in the pool that no committed version lists.
            removed += sweep_pool(store, name)
    for rel in stale_temp_files(store):
        store_path = Path(store.uri(rel))
        with contextlib.suppress(FileNotFoundError):
            store_path.unlink()
            removed.append(str(store_path))
    for d in dead_temp_dirs():
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    if removed:
        log.warning("recovery: removed %d leftovers of dead writers: %s", len(removed), removed)
    return removed


def record_interrupted_run(
    store: ObjectStore, run: str, found_by: str | None, how: str = "stopped"
) -> str | None:
    """``runs/<run>.json`` for a refresh that died after recording its images (its label
    commit: the images and faces it found are in the tables) and before writing its record, so
    the store's run records account for every run that changed it. The next refresh counts
    those images as already seen and publishes their faces. Returns the record's key, or None
    (the run recorded no images, or has its record)."""
    from storage.tables import images_rel

    try:
        images = images_rel(run)
    except ValueError:  # not a run id a refresh makes
        return None
    rel = layout.run_record(run)
    if store.exists(rel) or not store.exists(images):
        return None
    recorded = store.read_parquet_file(images, columns=["status"]).num_rows
    published = _published_by(store, run)
    doc = {
        "run_id": run,
        "store": store.uri(""),
        "interrupted": (
            f"{how} after recording its images and faces, before its run record; "
            + (
                f"it had published them ({', '.join(published)})"
                if published
                else "the next refresh publishes them"
            )
        ),
        "found_by": found_by,
        "run": {"images_recorded": recorded},
        "record": rel,
    }
    store.write_bytes(rel, json.dumps(doc, indent=2).encode())
    log.warning("recovery: run %s stopped after its label commit; recorded in %s", run, rel)
    return rel


def _published_by(store: ObjectStore, run: str) -> list[str]:
    """``<dataset> v<n>`` of the newest committed version of each dataset when ``run``
    published it (a run stopped after its publish, before its record)."""
    from storage.manifest import latest_version
    from storage.versions import load_manifest

    out = []
    for name in dataset_names(store):
        try:
            v = latest_version(store, name)
            if v is not None and load_manifest(store, name, v).run_id == run:
                out.append(f"{name} v{v}")
        except (ValueError, OSError):
            continue
    return out


def finish_run(store: ObjectStore, run_id: str) -> None:
    """After a successful run: its staging is no longer needed."""
    store.delete_prefix(layout.staging_dir(run_id))


def label_commit_open(store: ObjectStore) -> str | None:
    """The run whose label commit stopped half-way (layout.LABEL_COMMIT_OPEN), else None: its
    groups are partly written until a refresh relabels the store."""
    try:
        return str(json.loads(store.read_bytes(layout.LABEL_COMMIT_OPEN)).get("run_id") or "?")
    except FileNotFoundError:
        return None
    except ValueError:
        return "?"


def refuse_half_labelled(store: ObjectStore, what: str) -> None:
    """FaceloopError when a refresh stopped in its label commit: ``what`` (a review push, a
    pull) would act on half-written labels (a proposal for an identity not yet written, a
    publish with a class of one face)."""
    from faceloop.errors import FaceloopError

    if (run := label_commit_open(store)) is not None:
        raise FaceloopError(
            f"refresh {run} stopped in its label stage, leaving some labels written and others "
            f"not: run `faceloop refresh` to finish it before {what}"
        )


def subjects_to_relabel(store: ObjectStore) -> set[str]:
    """ID-card subjects the next label stage decides again (layout.RELABEL_SUBJECTS): a
    ``faceloop forget`` removed photos their duplicate claims rested on."""
    try:
        return set(json.loads(store.read_bytes(layout.RELABEL_SUBJECTS)).get("subjects") or ())
    except FileNotFoundError:
        return set()


def note_subjects_to_relabel(store: ObjectStore, subjects: set[str]) -> None:
    """Record ``subjects`` as the ones to decide again (none: the record goes)."""
    if subjects:
        doc = {"subjects": sorted(subjects)}
        store.write_bytes(layout.RELABEL_SUBJECTS, json.dumps(doc, indent=1).encode())
    else:
        store.delete(layout.RELABEL_SUBJECTS)


def label_work_left(store: ObjectStore) -> bool:
    """Whether the next refresh must run its label stage even with nothing new: a label commit
    stopped half-way, or subjects wait to be decided again (:func:`subjects_to_relabel`)."""
    return label_commit_open(store) is not None or bool(subjects_to_relabel(store))


def drop_label_state(store: ObjectStore) -> None:
    """Delete the label stage's state (``state/label/``: centroid sums and face ids of every
    album) but the fingerprint of the label settings it was built under, in a meta.json of its
    own (no generation: the next label run rebuilds the state from the faces table). Without it
    a store counted as never labelled, and a change of label settings made since (an edited
    threshold, a new ``faceloop calibrate``) never reached the stored faces."""
    try:
        fingerprint = json.loads(store.read_bytes(layout.LABEL_META)).get("fingerprint")
    except (FileNotFoundError, ValueError, AttributeError):
        fingerprint = None  # (never labelled, or a damaged meta: nothing to keep)
    store.delete_prefix(layout.LABEL_STATE)
    if fingerprint:
        store.write_bytes(layout.LABEL_META, json.dumps({"fingerprint": fingerprint}).encode())
