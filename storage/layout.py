"""Every path inside a faceloop store, in one place (layout in docs/DESIGN.md).

Paths are relative, ``/``-separated keys under the store root (see :mod:`storage.objectstore`).
The functions only format keys; checking that a name or run id is usable is the caller's
business (:mod:`storage.versions` checks dataset names, :mod:`storage.tables` run ids).

::

    tables/faces/<kind>/<group_key>.parquet   current faces of one source group
    tables/labels/<kind>/<group_key>.parquet  newer label columns of that group's faces,
                                              valid for one write of its faces file only
    tables/images/<run_id>.parquet            images one run has seen
    tables/reviews/...                        review tasks, answers, applied answers, state
    tables/review_queue/queue.parquet         what awaits review after the latest run
    tables/sources/stamps.parquet             uri -> size/mtime (ETag) stamp -> sha256 of
                                              every file last hashed (discovery's cache)
    staging/<run_id>/pending.parquet          work list of a run's new images
    staging/<run_id>/detections/...           a run's per-image detections
    staging/<run_id>/label/tables/...         the label stage's files before they move in
    runs/<run_id>.json                        a run's summary record
    reports/<run_id>.html                     a run's HTML report
    datasets/<name>/v<N>/...                  one dataset version (classes, changes,
                                              manifest.json written last, _writing.json marker)
    datasets/<name>/shards/<sha256>.parquet   shards, named by their content, shared by every
                                              version whose manifest lists them
    datasets/<name>/latest                    ``v<N>`` of the latest committed version
    models/registry.json                      trained recognizers
    models/files/<sha256>.onnx                their weights
    state/faces_generation                    token replaced around every faces write
    state/published/<name>.json               what the last publish of a dataset decided
    state/published/<name>.keys.parquet       its accepted keys per faces file (a cache)
    state/published/<name>.keys-delta.parquet the cache's entries changed since it was written
    state/summary.parquet                     per faces file: counts per status and identity,
                                              plot bins, review rows (a cache)
    state/label/clusters/<kind>/<key>.parquet one group's per-album clusters (centroid sums)
    state/label/units.parquet                 every merge unit: album, identity, index id
    state/label/centroids.faiss               ANN index of the merge units' centroids
    state/label/identities.parquet            every identity's centroid sum, size, look-alike
    state/label/identities-delta.parquet      the identities changed since that file was written
    state/label/meta.json                     faces generation the label state matches
    state/lock.json                           the store lock's holder record (storage/lock.py)
    state/store_format.json                   the store's layout version (storage/format.py)
    state/embedded_with.json                  the recognizer tag every stored face carries
    state/relabel_pending.json                faces re-embedded, the store not relabelled yet
    state/input_limits.json                   the input limits of the last successful refresh
    state/store_id                            the store's random id, written once
    state/secret                              per-store HMAC key of tombstones and audit (0600)
    state/tombstones.json                     keyed digests of forgotten images, subjects, faces
    state/forget_pending.json                 unfinished forget work (keyed digests, LS task ids)
    state/relabel_subjects.json               ID subjects the next label stage decides again
                                              (their duplicate claim named a forgotten one)
    audit/forget.jsonl                        one line per forget: when, who, kinds, counts
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# Tables

FACES = "tables/faces"
IMAGES = "tables/images"
REVIEWS = "tables/reviews"
REVIEW_TASKS = f"{REVIEWS}/tasks"
REVIEW_ANSWERS = f"{REVIEWS}/answers"
REVIEW_APPLIED = f"{REVIEWS}/applied"
REVIEW_STATE = f"{REVIEWS}/state.json"
REVIEW_QUEUE = "tables/review_queue/queue.parquet"
# The faces generation (FACES_GENERATION) the review queue was written from: a refresh that
# finds it behind writes the queue again and pushes (a run killed after its label commit left
# both undone, and the next run had nothing to label).
REVIEW_QUEUE_GENERATION = "state/review_queue_generation"
# The faces generation whose review faces the last successful push to Label Studio covered
# (annotate/sync.push_review): a refresh that finds it behind pushes, new faces or not (the
# backlog of a refresh that ran with review off or Label Studio down).
REVIEW_PUSHED = "state/review_pushed_generation"
# Discovery's stat cache: under tables/ so that forget scrubs it like every other table.
SOURCE_STAMPS = "tables/sources/stamps.parquet"


def faces_kind_dir(kind: str) -> str:
    """``tables/faces/<kind>``: the faces of every group of one source kind."""
    return f"{FACES}/{kind}"


def faces_group(kind: str, key: str) -> str:
    """``tables/faces/<kind>/<group_key>.parquet``: one source group's faces."""
    return f"{faces_kind_dir(kind)}/{key}.parquet"


# Label overlays: when only the labels of an album changed, the label stage writes its label
# columns here (a few KB) instead of rewriting the faces file with its embeddings and crops.
LABELS = "tables/labels"


def labels_of(faces_rel: str) -> str:
    """The label overlay of the faces file ``faces_rel`` (``tables/faces/<kind>/<key>.parquet``)."""
    if not faces_rel.startswith(FACES + "/"):
        raise ValueError(f"not a faces group file: {faces_rel!r}")
    return LABELS + faces_rel[len(FACES) :]


def faces_of(labels_rel: str) -> str:
    """The faces file a label overlay ``tables/labels/<kind>/<key>.parquet`` belongs to."""
    if not labels_rel.startswith(LABELS + "/"):
        raise ValueError(f"not a label overlay: {labels_rel!r}")
    return FACES + labels_rel[len(LABELS) :]


def images_run(run_id: str) -> str:
    """``tables/images/<run_id>.parquet``: the image rows one run recorded."""
    return f"{IMAGES}/{run_id}.parquet"


# --------------------------------------------------------------------------------------------
# Runs


STAGING = "staging"


def staging_dir(run_id: str) -> str:
    """``staging/<run_id>``: a run's intermediate files."""
    return f"{STAGING}/{run_id}"


def staging_pending(run_id: str) -> str:
    """``staging/<run_id>/pending.parquet``: the run's work list of new images."""
    return f"{staging_dir(run_id)}/pending.parquet"


def staging_detections(run_id: str) -> str:
    """``staging/<run_id>/detections``: the run's detections (one or more Parquet parts)."""
    return f"{staging_dir(run_id)}/detections"


def staging_detections_part(run_id: str, index: int = 0) -> str:
    """``staging/<run_id>/detections/part-<index:05d>.parquet``."""
    return f"{staging_detections(run_id)}/part-{index:05d}.parquet"


def staging_label(run_id: str) -> str:
    """``staging/<run_id>/label``: the label stage's table files, written here in full before
    any of them is moved into ``tables/`` (see storage.tables.commit_run_tables)."""
    return f"{staging_dir(run_id)}/label"


def staging_label_file(run_id: str, table_rel: str) -> str:
    """``staging/<run_id>/label/<table_rel>``: where ``table_rel`` waits to be moved in."""
    return f"{staging_label(run_id)}/{table_rel}"


def run_record(run_id: str) -> str:
    """``runs/<run_id>.json``: a run's summary."""
    return f"runs/{run_id}.json"


def run_report(run_id: str) -> str:
    """``reports/<run_id>.html``: a run's report."""
    return f"reports/{run_id}.html"


# --------------------------------------------------------------------------------------------
# Datasets

MANIFEST = "manifest.json"  # a version's commit marker: written last
MARKER = "_writing.json"  # a half-written version's writer, heartbeat and state
LATEST = "latest"  # holds "v<N>"
CLASSES = "classes.parquet"
CHANGES = "changes.parquet"
# Rows of reused pool shards that a version does not hold (format /3): shard sha256, row.
DELETIONS = "deletions.parquet"
SHARDS = "shards"


def dataset_dir(name: str) -> str:
    """``datasets/<name>``."""
    return f"datasets/{name}"


def dataset_latest(name: str) -> str:
    """``datasets/<name>/latest``."""
    return f"{dataset_dir(name)}/{LATEST}"


def version_dir_name(version: int) -> str:
    """``v<N>``: a version's directory name, also what ``latest`` holds."""
    return f"v{version}"


def version_dir(name: str, version: int) -> str:
    """``datasets/<name>/v<N>``."""
    return f"{dataset_dir(name)}/{version_dir_name(version)}"


def version_manifest(name: str, version: int) -> str:
    """``datasets/<name>/v<N>/manifest.json``."""
    return f"{version_dir(name, version)}/{MANIFEST}"


def version_marker(name: str, version: int) -> str:
    """``datasets/<name>/v<N>/_writing.json``."""
    return f"{version_dir(name, version)}/{MARKER}"


def pool_shard(sha256: str) -> str:
    """``shards/<sha256>.parquet``: a shard in a dataset's pool, relative to the dataset dir."""
    return f"{SHARDS}/{sha256}.parquet"


def dataset_pool(name: str) -> str:
    """``datasets/<name>/shards``: the content-addressed shards every version shares."""
    return f"{dataset_dir(name)}/{SHARDS}"


def shard_file(index: int) -> str:
    """``shards/part-<index:05d>.parquet``: a shard, relative to its version directory."""
    return f"{SHARDS}/part-{index:05d}.parquet"


# --------------------------------------------------------------------------------------------
# Models and state

MODEL_REGISTRY = "models/registry.json"
SUMMARY_CACHE = "state/summary.parquet"  # tasks.summary.group_summaries
# The `limits` settings (extensions, bytes, pixels) the last successful refresh ran under: when
# they change, files quarantined by a limit are looked at again (tasks/discover.py).
INPUT_LIMITS = "state/input_limits.json"
FACES_GENERATION = "state/faces_generation"
# {"model": "<recognizer file>@sha256:<hex>"}: every stored face was embedded by that recognizer
# (tasks/reembed.py). Written after a complete re-embedding pass, removed before a run embeds
# faces with another one, so a refresh with an unchanged recognizer skips the O(store) check.
EMBEDDED_WITH = "state/embedded_with.json"
# {"model": tag}: a re-embedding pass began rewriting faces with that recognizer; the store's
# labels are the old recognizer's until a label stage relabels every album, which removes it.
# Written before the first re-embedded group, so a run killed after the pass (or in it)
# leaves it for the next refresh, whose pass may find nothing left to re-embed.
RELABEL_PENDING = "state/relabel_pending.json"
STORE_LOCK = "state/lock.json"  # one writer at a time: holder, lease, heartbeat
# {"format": N, "written_by": "faceloop <version>"}: the layout the store holds; a writer that
# knows an older one refuses the store (storage/format.py).
STORE_FORMAT = "state/store_format.json"
# 32 random bytes, created on first use (mode 0600): the key of the store's pseudonyms
# (storage/secret.py), e.g. the subject pseudonyms Label Studio sees instead of subject ids.
STORE_SECRET = "state/secret"

# The store's identity: a random hex id written once (storage/identity.py). Label Studio
# projects carry it, so two stores never share a project.
STORE_ID = "state/store_id"


def model_file(sha256: str) -> str:
    """``models/files/<sha256>.onnx``: registered weights, named by content."""
    return f"models/files/{sha256}.onnx"


# The label stage's incremental state (tasks/label.py): valid only while the faces generation
# token equals the one meta.json recorded; otherwise the next refresh rebuilds it.
LABEL_STATE = "state/label"
LABEL_UNITS = f"{LABEL_STATE}/units.parquet"
# Units that differ from that file (changed, added, or gone) since it was written.
LABEL_UNITS_DELTA = f"{LABEL_STATE}/units-delta.parquet"
LABEL_INDEX = f"{LABEL_STATE}/centroids.faiss"
# Changes to the index since its file was written (tasks/label.py: base + delta).
LABEL_INDEX_DELTA = f"{LABEL_STATE}/centroids-delta.parquet"
LABEL_IDENTITIES = f"{LABEL_STATE}/identities.parquet"
# Identities that differ from that file (changed, added, or gone) since it was written.
LABEL_IDENTITIES_DELTA = f"{LABEL_STATE}/identities-delta.parquet"
LABEL_META = f"{LABEL_STATE}/meta.json"
# Written by a label run before it moves its files into tables/, removed once its state is
# recorded: while it is there a refresh stopped half-way through its label commit (some groups
# written, others not) and only a refresh may finish it (review refuses to act on such labels).
# Outside state/label/, which `faceloop forget` deletes.
LABEL_COMMIT_OPEN = "state/label_commit_open.json"
# ID-card subjects the next label stage decides again though nothing new reached them: `faceloop
# forget` took away photos a duplicate claim of theirs rested on (storage/recovery.py).
RELABEL_SUBJECTS = "state/relabel_subjects.json"
# Faces files the label commit removed itself, because every face they held moved to another
# group (an ID-card subject folder renamed): publish's check for faces files lost outside
# faceloop (tasks/publish.py) passes over them. A file written again leaves the list.
FACES_REMOVED = "state/faces_removed.json"
# The album faces in no identity (tasks/label.py "loose faces"): their unit embeddings in a
# faiss index kept as the centroids' (file + delta), and the albums their ids point at.
LABEL_LOOSE = f"{LABEL_STATE}/loose.faiss"
LABEL_LOOSE_DELTA = f"{LABEL_STATE}/loose-delta.parquet"
LABEL_LOOSE_ALBUMS = f"{LABEL_STATE}/loose-albums.parquet"


def label_clusters(kind: str, key: str) -> str:
    """``state/label/clusters/<kind>/<key>.parquet``: one source group's per-album clusters."""
    return f"{LABEL_STATE}/clusters/{kind}/{key}.parquet"


def staging_label_new(run_id: str, kind: str, key: str) -> str:
    """``staging/<run_id>/label-new/<kind>/<key>.parquet``: a run's new faces of one group,
    handed to the label stage's per-group workers."""
    return f"{staging_dir(run_id)}/label-new/{kind}/{key}.parquet"


def published_state(name: str) -> str:
    """``state/published/<name>.json``: what the last publish of dataset ``name`` decided."""
    return f"state/published/{name}.json"


def published_keys(name: str) -> str:
    """``state/published/<name>.keys.parquet``: the accepted (face_id, identity_id) of every
    faces group file as of the last publish of ``name``, with the file's stamp (a cache: a
    file whose stamp changed is read again)."""
    return f"state/published/{name}.keys.parquet"


def published_files(name: str) -> str:
    """``state/published/<name>.files.json``: the faces files that held published faces of
    ``name``, written by ``faceloop forget`` in place of the keys cache it deletes (which names
    face and identity ids) and read by the next publish in its stead, to refuse a file
    deleted outside faceloop; that publish removes it."""
    return f"state/published/{name}.files.json"


def published_keys_delta(name: str) -> str:
    """``state/published/<name>.keys-delta.parquet``: the keys-cache entries of the group files
    read (or removed) since ``published_keys`` was last written whole."""
    return f"state/published/{name}.keys-delta.parquet"


# --------------------------------------------------------------------------------------------
# Privacy: forgetting a person (storage/privacy.py, storage/forget.py)

# STORE_SECRET (above) is also the HMAC key of the keyed digests.
TOMBSTONES = "state/tombstones.json"  # keyed digests only: never a raw hash, uri or name
FORGET_PENDING = "state/forget_pending.json"  # what a forget has still to do (`--resume`)
AUDIT_FORGET = "audit/forget.jsonl"  # append-only audit of forget runs (no raw identifiers)
RUNS = "runs"
REPORTS = "reports"
DATASETS = "datasets"
