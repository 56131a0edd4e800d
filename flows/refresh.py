"""The refresh flow: discover → detect/align/score/embed (Ray Data) → label → publish.

Run it with ``faceloop refresh --config FILE`` or as the Prefect deployment in prefect.yaml.
A rerun over unchanged sources finds nothing new, does no model work and changes no label.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.exceptions import TerminationSignal

from faceloop.config import Settings, load_settings, parse_source_override
from faceloop.errors import StoreLockedError
from faceloop.memory import configure_memory
from faceloop.modelstore import ModelInfo
from faceloop.progress import stages
from faceloop.runids import RUN_ID, checked_run_id, new_run_id
from flows.heartbeat import no_wait_at_end
from flows.runlogs import run_logs
from flows.steps import discover_step, faces_step, label_step, publish_step, reembed_step
from storage.lock import StoreLock, store_lock
from storage.objectstore import ObjectStore, open_store, use_store_modes
from storage.recovery import finish_run, record_interrupted_run
from storage.tables import image_runs, run_committed
from tasks.discover import check_local_sources
from tasks.summary import (
    DatasetInfo,
    RunCounts,
    RunSummary,
    group_summaries,
    markdown_table,
    review_queue_current,
    store_counts,
    write_review_queue,
    write_run_record,
)

# Named, not ``__name__``: a deployment's worker loads this file by its path (prefect.yaml's
# entrypoint) as a module named "refresh", and flows/runlogs.py sends only its packages' loggers
# to the flow run's log (this module's warnings stayed on the worker's console).
log = logging.getLogger("flows.refresh")


def _model_infos(settings: Settings) -> list[dict]:
    """name, file, sha256, package of the models this run uses (verified on disk)."""
    from tasks.backends import model_infos

    return [i.to_dict() for i in model_infos(settings.models)]


def _finish_interrupted_forget(settings: Settings, run_id: str, lock: StoreLock) -> str:
    """A refresh must not publish from, or leave behind, what was asked to be forgotten: the
    store work of an interrupted `faceloop forget` is done first (storage.forget). What it
    did, for the run summary ("no": no forget was interrupted)."""
    from storage.forget import finish_interrupted

    done = finish_interrupted(open_store(settings.store), run_id, lock.check)
    if done is None:
        return "no"
    removed, left = done
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in removed.items() if v)
    said = f"yes ({counts or 'nothing left'})" + (
        f"; {left} Label Studio tasks left: `faceloop forget --resume` deletes them" if left else ""
    )
    get_run_logger().warning("finished an interrupted `faceloop forget` first: %s", said)
    return said


def _by_reason(counts: dict[str, int]) -> str:
    """`` (wrong_layout 3, unsupported_extension 1)``: a run's quarantines by reason, most first."""
    if not counts:
        return ""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return " (" + ", ".join(f"{code} {n}" for code, n in ordered) + ")"


def _models_ahead(settings: Settings, run_id: str) -> Callable[[int], None] | None:
    """For discovery: a run whose face stage may run in this process starts loading the models
    (:func:`tasks.backends.load_ahead`) once discovery has found files to read, fewer than
    ``ray.face_min_images``, on the core that hashing them leaves idle; the stage then finds
    them loaded. A run with nothing new loads nothing."""
    from tasks.ray_faces import may_run_inline, runs_inline

    if not may_run_inline(settings.ray):
        return None

    def start(n_files: int) -> None:
        if runs_inline(settings.ray, n_files):
            from tasks.backends import load_ahead

            load_ahead(run_id, settings.models)

    return start


# Settings handed in by run_refresh, by handle. Prefect stores a flow run's parameters in its
# database (flow_run.parameters) and shows them in its UI: the flow takes strings only, and a
# program's Settings object (with review.token, paths of biometric sources) stays in this process.
_HANDED_IN: dict[str, Settings] = {}


def _flow_run_name() -> str:
    """The Prefect flow run's name is the faceloop run id (``runs/<run_id>.json``,
    ``reports/<run_id>.html``): the ``run_id`` parameter when given, else a new one, which the
    flow then reads back from its own name."""
    from prefect.runtime import flow_run

    given = (flow_run.parameters or {}).get("run_id")
    # A run id of the wrong form is refused by the flow itself (a failed run saying why): raised
    # here, while Prefect names the run, it crashed the run with "exited with status code 1".
    return str(given) if given and RUN_ID.match(str(given)) else new_run_id()


def _after_committed_runs(store: ObjectStore, run_id: str) -> str:
    """``run_id``, or a new one when a refresh whose id sorts after it wrote the store first
    (it took the lock while this run waited, or this host's clock is behind another's or was
    set back): a URI's latest row in the images table is its latest run id's
    (storage.tables.latest_images)."""
    runs = image_runs(store)
    if run_committed(store, run_id):
        # The id of a run that committed (a re-run notebook cell, a deployment run given the
        # same run_id twice): its images file would be replaced, and that run's rows lost.
        new = new_run_id(after=max(runs, default=None))
        log.warning(
            "run id %s names a run that already recorded its images: this run is recorded as %s",
            run_id,
            new,
        )
        return new
    latest = max(runs, default=None)
    if latest is None:
        # Said once per run: a scheduled refresh over a store path that should hold one (a
        # network drive not mounted, a wrong path in the deployment) starts a store anew.
        log.warning(
            "store %s holds no earlier run: starting a new store (as expected on a first run; "
            "otherwise check the store path or its mount)",
            store.uri(""),
        )
        return run_id
    if run_id > latest:
        return run_id
    new = new_run_id(after=latest)
    log.warning(
        "run %s sorts before run %s, which wrote the store first (it took the lock while "
        "this run waited, or this host's clock is behind): this run is recorded as %s",
        run_id,
        latest,
        new,
    )
    return new


def _own_run_id() -> str:
    """This flow run's run id: its name when the name is one (see :func:`_flow_run_name`)."""
    from prefect.runtime import flow_run

    name = flow_run.name or ""
    return name if RUN_ID.match(name) else new_run_id()


def settings_from_flags(
    config: str | None, store: str | None, sources: list[str] | None
) -> Settings:
    """The settings of a refresh from its flags: the YAML ``config``, overridden by ``store``
    and ``sources`` (``KIND=URI``). ConfigError when any of them is wrong."""
    overrides: dict[str, Any] = {"store": store}
    if sources:
        overrides["sources"] = [parse_source_override(s) for s in sources]
    return load_settings(config, **overrides)


@no_wait_at_end
@flow(name="faceloop-refresh", flow_run_name=_flow_run_name, validate_parameters=False)
def refresh_flow(
    config: str | None = None,
    store: str | None = None,
    sources: list[str] | None = None,
    settings_handle: str | None = None,
    run_id: str | None = None,
    rehash: bool = False,
) -> RunSummary:
    """Bring the store up to date with the sources and publish a dataset version if labels changed.

    ``config`` is a YAML file; ``store`` and ``sources`` (``KIND=URI``) override it.
    ``settings_handle`` (set by :func:`run_refresh` only) names settings held in this process,
    which replace all three. ``run_id`` names the run (default: a new one); the Prefect flow
    run carries the same name. ``rehash`` reads and hashes every listed file instead of trusting
    the stamps (size + mtime + inode, ETag) of the files read before: for a file rewritten in
    place with its size and mtime put back (``exiftool -P``, ``rsync --inplace -t``).
    """
    with run_logs():  # the stages' own warnings in the flow run's log (flows/runlogs.py)
        return _refresh_flow(config, store, sources, settings_handle, run_id, rehash)


def _refresh_flow(
    config: str | None,
    store: str | None,
    sources: list[str] | None,
    settings_handle: str | None,
    run_id: str | None,
    rehash: bool,
) -> RunSummary:
    """:func:`refresh_flow`'s body."""
    if settings_handle is not None:
        try:
            settings = _HANDED_IN[settings_handle]
        except KeyError:
            raise ValueError(
                "settings_handle names no settings in this process: use run_refresh()"
            ) from None
    else:
        settings = settings_from_flags(config, store, sources)
    use_store_modes(settings)
    configure_memory()  # a deployment's worker process does not pass through the CLI
    run_id = checked_run_id(run_id) if run_id else _own_run_id()
    check_local_sources(settings)  # a mistyped folder fails here, before the store is made
    # One writer at a time: a second refresh (or a review pull, a gc) waits up to
    # lock.wait_seconds, then fails naming the holder (exit 3). Taking the lock first rolls back
    # whatever a crashed writer left, so a crash is recovered by this very run.
    with store_lock(
        open_store(settings.store),
        run_id,
        "refresh",
        wait_seconds=settings.lock.wait_seconds,
        lease_seconds=settings.lock.lease_seconds,
        on_wait=get_run_logger().warning,
    ) as lock:
        run_id = _after_committed_runs(open_store(settings.store), run_id)
        try:
            try:
                summary = _refresh(settings, run_id, lock, rehash)
            finally:
                from tasks.backends import drop_ahead

                drop_ahead(run_id)  # models loaded ahead that the face stage did not take
            finish_run(open_store(settings.store), run_id)  # staging is not needed after success
        except (KeyboardInterrupt, SystemExit, TerminationSignal):
            # Ctrl-C, or SIGTERM (a scheduler's stop, `timeout`; Prefect turns it into
            # TerminationSignal, then SystemExit), at any point of the run: its staging goes
            # with it (the next run's recovery would remove it; until then `faceloop doctor`
            # reported an orphan staging). The tables are as the run left them, and the next
            # refresh completes it as after any crash. A run that had recorded its images gets
            # the record a killed one gets from the next writer (its staging, which says so,
            # goes now).
            _record_stopped_run(settings, run_id, "stopped (SIGTERM or Ctrl-C)")
            raise
        except Exception as exc:
            # A run that lost the lock (stopped past its lease) fails on what the new holder's
            # recovery removed (its staging): that is the error to report (exit 3), and the
            # store is the new holder's now: nothing of it is touched.
            if isinstance(exc, StoreLockedError):
                raise
            try:
                lock.check()
            except StoreLockedError as lost:
                raise lost from exc
            # Any other failure (a stopped cluster, a bad address, an outage, a full disk): the
            # same, so an operator's `faceloop doctor` after a failed scheduled run is clean
            # too.
            _record_stopped_run(
                settings, run_id, f"failed ({type(exc).__name__}; the flow run's log says why)"
            )
            raise
    return summary


def _record_stopped_run(settings: Settings, run_id: str, how: str) -> None:
    """A run that failed or was stopped: its record when it had recorded its images
    (:func:`storage.recovery.record_interrupted_run`), then its staging goes. A record that
    cannot be written (the store unreachable or unwritable, a full disk: often what failed the
    run) keeps the staging: the next writer's recovery writes the record from it
    (storage.recovery.recover), and `faceloop doctor` reports the staging until then. Removed
    with the record unwritten, the run that took images in was left with no record at all.
    Never raises: the run's own failure is the one to report."""
    try:
        record_interrupted_run(open_store(settings.store), run_id, run_id, how)
    except Exception as exc:
        log.warning(
            "run %s: its run record could not be written (%s): its staging is left for the "
            "next refresh, which records it",
            run_id,
            exc,
        )
        return
    with contextlib.suppress(Exception):  # the next writer's recovery removes it
        finish_run(open_store(settings.store), run_id)


def _refresh(settings: Settings, run_id: str, lock: StoreLock, rehash: bool = False) -> RunSummary:
    from storage.recovery import label_work_left
    from tasks.discover import note_input_limits
    from tasks.label import label_settings_changed
    from tasks.reembed import relabel_pending, relabelled, with_registered_model

    settings = with_registered_model(settings)  # a newly trained recognizer, if one was registered
    logger = get_run_logger()
    timings: dict[str, float] = {}
    models = _model_infos(settings)  # fails fast, before any work, when models are missing
    progress = _Progress(run_id)
    forget_finished = _finish_interrupted_forget(settings, run_id, lock)

    # Faces embedded by another recognizer are re-embedded from their stored crops first (a
    # recognizer recorded for the whole store skips the check).
    t = time.perf_counter()
    rec_tag = next(ModelInfo(**m).tag for m in models if m["role"] == "recognizer")
    reembedded = reembed_step(settings, rec_tag)
    if settings.models.recognizer:
        timings["reembed_s"] = time.perf_counter() - t
        progress.done("re-embed", f"{reembedded} faces re-embedded", timings["reembed_s"])

    t = time.perf_counter()
    disc = discover_step(settings, run_id, _models_ahead(settings, run_id), rehash)
    timings["discover_s"] = time.perf_counter() - t
    progress.done(
        "discover",
        # "new": new contents for the face stage, which quarantines those it cannot decode
        # (the run's summary counts them there; its "new images" are the decoded ones).
        f"{disc.listed} files listed ({disc.hashed} read), {disc.new} new (to decode), "
        f"{disc.seen} already seen, {disc.moved} moved, "
        + (f"{disc.restored} restored, " if disc.restored else "")
        + f"{disc.duplicates} duplicates, "
        f"{disc.quarantined} quarantined"
        + _by_reason(disc.quarantined_by)
        + (f", {disc.ignored} ignored" if disc.ignored else "")
        + (
            f" ({disc.retried} quarantined under other limits looked at again)"
            if disc.retried
            else ""
        )
        + (
            f" ({disc.in_place_again} quarantined for their place in a source, now in place)"
            if disc.in_place_again
            else ""
        )
        + (
            f" ({disc.content_changed} known paths with new content, taken as new images)"
            if disc.content_changed
            else ""
        )
        + (
            f" ({disc.renamed_album_photos} new photos in renamed album folders, clustered with"
            " their album's earlier photos)"
            if disc.renamed_album_photos
            else ""
        ),
        timings["discover_s"],
    )

    if disc.quarantined_by.get("wrong_layout"):
        # Counts only: source paths (names of people, often) stay out of Prefect's logs.
        logger.warning(
            "%d files are not where the sources' layout expects them (albums: "
            "<source>/<album_id>/<image>; ID cards: <source>/<subject_id>/id.<ext> and "
            "live*.<ext>): a source one folder too high puts every photo a level too deep. "
            "`faceloop explain <file>` gives each one's reason",
            disc.quarantined_by["wrong_layout"],
        )

    detections_rel = None
    sent_to_models = 0
    if disc.pending_rel:
        t = time.perf_counter()
        stage = faces_step(settings, run_id, disc.pending_rel, disc.new)
        timings["faces_s"] = time.perf_counter() - t
        if stage.ray_start_seconds:  # part of faces_s: Ray's start, before any image
            timings["ray_start_s"] = stage.ray_start_seconds
        detections_rel = stage.detections_rel
        sent_to_models = stage.sent_to_models
        progress.done(
            "faces",
            f"{stage.images} images -> {stage.rows} detection rows "
            f"({stage.images / max(timings['faces_s'], 1e-9):.1f} images/s"
            f"{', in this process: fewer than ray.face_min_images' if stage.in_driver else ''})",
            timings["faces_s"],
        )

    labelled = None
    manifest = None
    # Thresholds, clustering or quality gates changed since the last label run (a new
    # `faceloop calibrate`, an edited config): relabel the store even with nothing new.
    resettled = label_settings_changed(open_store(settings.store), settings)
    if resettled:
        get_run_logger().info(
            "the store was labelled under other label settings or rules (a config change, or "
            "a faceloop release whose label rules changed): every album and subject is "
            "relabelled once, with no model work"
        )
    # A label commit an earlier run left half-way is finished by this one, new images or not.
    # So are ID subjects whose duplicate claim named a subject `faceloop forget` took away.
    unfinished = label_work_left(open_store(settings.store))
    # Faces re-embedded by this run, or by one killed before its label stage relabelled them.
    pending = relabel_pending(open_store(settings.store))
    relabel = bool(reembedded) or pending
    relabelled_all = (
        "yes: faces re-embedded with another recognizer"
        if reembedded
        else "yes: faces an earlier run re-embedded"
        if pending
        else "yes: the label settings or rules changed"
        if resettled
        else "no"
    )
    if detections_rel or disc.quarantined_rows or relabel or resettled or unfinished:
        lock.check()  # never commit labels after another writer took the store over
        t = time.perf_counter()
        labelled = label_step(
            settings, run_id, detections_rel, disc.quarantined_rows, relabel_all=relabel
        )
        if relabel:
            relabelled(open_store(settings.store))
        timings["label_s"] = time.perf_counter() - t
        # Its parts (part of label_s), as ray_start_s is of faces_s: where a label stage's time
        # goes at scale (the album passes) shows in the run record and report.
        timings.update({f"label_{k}_s": v for k, v in labelled.pass_seconds.items()})
        progress.done(
            "label",
            f"{labelled.new_faces} new faces, {labelled.changed_faces} changed, "
            f"{labelled.new_images} new images",
            timings["label_s"],
        )
    # Publish compares the accepted faces with the latest version and writes nothing when they
    # match, so it also catches label changes made outside this run (applied review answers).
    lock.check()  # never publish after another writer took the store over
    t = time.perf_counter()
    manifest, publish_nodes = publish_step(settings, run_id, models)
    timings["publish_s"] = time.perf_counter() - t
    progress.done(
        "publish",
        f"{manifest['name']} v{manifest['version']}: {manifest['num_rows']} faces, "
        f"{manifest['num_classes']} identities"
        if manifest
        else "dataset unchanged",
        timings["publish_s"],
    )

    st = open_store(settings.store)
    # The limits this run completed under: files they quarantined are looked at again only
    # once they change (tasks/discover.py).
    note_input_limits(st, settings)
    groups = group_summaries(st)  # reads only the faces files written since it last ran
    # Also when the faces changed since the queue was written without a label run here (one
    # killed after its label commit): the queue and the push were left undone.
    due = labelled is not None or not review_queue_current(st)
    if due:
        write_review_queue(st, run_id, groups)
    # And when the faces in review never reached Label Studio (a refresh with review off, or
    # with Label Studio down): nothing new, but a backlog the annotators do not have.
    review = _push_review(settings) if due or _push_behind(settings, st) else None

    summary = RunSummary(
        run_id=run_id,
        store=settings.store,
        totals=store_counts(st, groups),
        run=RunCounts(
            files_listed=disc.listed,
            already_seen=disc.seen,
            new_images=labelled.new_images if labelled else 0,
            moved=disc.moved,
            restored=disc.restored,
            renamed_album_photos=disc.renamed_album_photos,
            refiled_faces=labelled.refiled_faces if labelled else 0,
            lapsed_answers=labelled.lapsed_answers if labelled else 0,
            subjects_decided_again=labelled.subjects_decided_again if labelled else 0,
            duplicates=labelled.duplicates if labelled else disc.duplicates,
            quarantined=labelled.quarantined if labelled else disc.quarantined,
            new_faces=labelled.new_faces if labelled else 0,
            changed_faces=labelled.changed_faces if labelled else 0,
            reembedded_faces=reembedded,
            relabelled_all=relabelled_all if labelled else "no",
            forget_finished=forget_finished,
            files_hashed=disc.hashed,
            ignored=disc.ignored,
            images_sent_to_models=sent_to_models,
            label_nodes=len(labelled.ray_nodes) if labelled else 0,
            publish_nodes=publish_nodes,
            dataset_version=f"{manifest['name']} v{manifest['version']}"
            if manifest
            else "unchanged",
            empty_sources="; ".join(f"{u} ({n} images)" for u, n in disc.empty_sources.items())
            or "none",
        ),
        timings={k: round(v, 3) for k, v in timings.items()},
        dataset=DatasetInfo(
            **{k: manifest[k] for k in ("name", "version", "num_rows", "num_classes")}
        )
        if manifest
        else None,
        models=models,
        review=review,
    )
    if labelled is not None:
        summary.report = _write_report(settings, run_id, summary)
    table = markdown_table(summary)
    write_run_record(st, summary)
    create_markdown_artifact(
        key="refresh-summary",
        markdown="# faceloop refresh\n\n" + table,
        description=f"run {run_id}",
    )
    progress.finish(summary)
    logger.info("refresh %s done: %s", run_id, summary.totals)
    return summary


# Share of a run's time each stage usually takes (the face stage dominates).
_STAGE_WEIGHT = {"re-embed": 5.0, "discover": 10.0, "faces": 60.0, "label": 20.0, "publish": 5.0}

# The progress artifact moves at a stage's end only when it last moved this many seconds ago
# (the run's end always moves it to 100%). Each move is a round trip to the Prefect server,
# which runs beside the refresh: 13 ms on a quiet machine, ~70 ms right after a 200-photo face
# stage on two cores, where five moves in a 10 s run were 0.42 s of it; a run of hours still
# shows every stage.
PROGRESS_MIN_INTERVAL_S = 5.0


class _Progress:
    """One INFO line per finished stage (``faceloop.stages``: shown by ``faceloop refresh``),
    and the run's Prefect progress artifact (key ``refresh-progress``), moved at a stage's end
    when it has not moved for :data:`PROGRESS_MIN_INTERVAL_S` and at the run's end. An artifact
    that cannot be written never fails the run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.percent = 0.0
        self.moved_at = time.monotonic()
        self.artifact: UUID | None = None
        try:
            made = create_progress_artifact(
                0.0, key="refresh-progress", description=f"run {run_id}: started"
            )
            self.artifact = made if isinstance(made, UUID) else None
        except Exception as exc:
            log.warning("progress artifact not created: %s", exc)

    def _set(self, percent: float, description: str, now: bool = False) -> None:
        self.percent = min(100.0, percent)
        if self.artifact is None:
            return
        if not now and time.monotonic() - self.moved_at < PROGRESS_MIN_INTERVAL_S:
            return
        try:
            update_progress_artifact(self.artifact, self.percent, description=description)
        except Exception as exc:
            log.warning("progress artifact not updated: %s", exc)
        self.moved_at = time.monotonic()

    def done(self, stage: str, counts: str, seconds: float) -> None:
        stages.info("%s: %s (%.1f s)", stage, counts, seconds)
        self._set(self.percent + _STAGE_WEIGHT.get(stage, 0.0), f"run {self.run_id}: {stage} done")

    def finish(self, summary: RunSummary) -> None:
        self._set(100.0, f"run {self.run_id}: finished", now=True)


def _push_behind(settings: Settings, store: ObjectStore) -> bool:
    """Review is on and the last successful push was of other faces than these."""
    if not settings.review.enabled:
        return False
    from annotate.sync import review_pushed_current

    return not review_pushed_current(store)


def _push_review(settings: Settings) -> str | None:
    """Push the review queue to Label Studio when it is enabled and reachable.

    A refresh must not fail because annotators' server is down: the push is idempotent over
    all status=review faces, so `faceloop review push` or the next refresh catches up.
    """
    if not settings.review.enabled:
        return None
    from annotate import server
    from faceloop.localnet import health
    from flows.review import push_review

    if not health(settings.review.url):
        msg = (
            f"Label Studio not reachable at {settings.review.url}: start it (make review-up), "
            "then `faceloop review push`"
        )
        get_run_logger().warning(msg)
        return msg
    settings = server.with_token(settings)
    state = push_review(settings, return_state=True)
    if state.is_failed():
        msg = (
            f"review push failed ({state.message}); nothing is lost: `faceloop review push` retries"
        )
        get_run_logger().warning(msg)
        return msg
    res = state.result()
    return (
        f"{settings.review.url}: {res.get('created', 0)} tasks created, "
        f"{res.get('already_pushed', 0)} already there"
    )


def _write_report(settings: Settings, run_id: str, summary: RunSummary) -> str | None:
    """The run's HTML report (plots, contact sheets under the privacy setting), and a markdown
    artifact with its figures that the Prefect UI shows as it is: a ``file://`` or ``s3://``
    link does not open from a browser, so the report's path is shown as text beside them.
    A report that fails to render is logged, never fails the run: the labels are already stored."""
    from evaluation.report import report_markdown, run_report_and_plots

    try:
        uri, plots = run_report_and_plots(settings, run_id, summary=summary)
    except Exception as exc:
        get_run_logger().warning("run report failed: %s", exc)
        return None
    try:
        create_markdown_artifact(
            key="refresh-report",
            markdown=report_markdown(summary, uri, plots),
            description=f"run {run_id}: figures of the report",
        )
    except Exception as exc:
        get_run_logger().warning("report artifact not created: %s", exc)
    return uri


def run_refresh(settings: Settings, *, rehash: bool = False) -> RunSummary:
    """Plain entry point for programs (eval, bench): runs the flow with these settings.
    ``rehash``: as ``faceloop refresh --rehash``, every listed file is read and hashed (a file
    rewritten in place with its size and mtime kept is found changed).

    The settings reach the flow through a process-local handle, never as a Prefect parameter
    (see ``_HANDED_IN``): Prefect records only a random id."""
    handle = secrets.token_hex(8)
    _HANDED_IN[handle] = settings
    try:
        return refresh_flow(settings_handle=handle, rehash=rehash)
    finally:
        _HANDED_IN.pop(handle, None)
