"""Arrow schemas of the tables that stages hand to each other, and their status vocabulary.

Each table is a folder of Parquet files in the store. Columns marked *contract* are relied on by
evaluators, training jobs and the review bridge: add columns freely, never rename these.
"""

from __future__ import annotations

import pyarrow as pa

from faceloop.vocab import ImageStatus, Role, Status

# The status vocabulary lives in faceloop.vocab (StrEnums); these names are kept for brevity.
AUTO, REVIEW, REJECTED, QUARANTINED, HUMAN = (
    Status.AUTO,
    Status.REVIEW,
    Status.REJECTED,
    Status.QUARANTINED,
    Status.HUMAN,
)
FACE_STATUSES = tuple(Status)
IMG_OK, IMG_NO_FACE, IMG_QUARANTINED = ImageStatus.OK, ImageStatus.NO_FACE, ImageStatus.QUARANTINED
ROLE_ALBUM, ROLE_ID, ROLE_LIVE = Role.ALBUM, Role.ID, Role.LIVE

EMBED = pa.list_(pa.float32())
BBOX = pa.list_(pa.float32(), 4)  # x1, y1, x2, y2 in original pixels after EXIF rotation
LANDMARKS = pa.list_(pa.float32(), 10)  # 5 points (x, y): left eye, right eye, nose, mouth l, r

# Work list written by discovery: one row per new image to process.
PENDING_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("size_bytes", pa.int64()),
        ("source_kind", pa.string()),
        ("source_group", pa.string()),
        ("role", pa.string()),
        ("run_id", pa.string()),
    ]
)

# Output of the detect/align/score/embed stage (Ray Data). One row per detected face, plus one
# row with face_index = -1 for an image that yielded no face or could not be read.
DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("source_kind", pa.string()),
        ("source_group", pa.string()),
        ("role", pa.string()),
        ("run_id", pa.string()),
        ("image_status", pa.string()),
        ("image_reason", pa.string()),
        ("image_reason_code", pa.string()),  # the stable code image_reason starts with
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int32()),
        ("image_phash", pa.int64()),  # ID-card photos: 64-bit pHash (faceloop.hashing.phash64)
        ("face_index", pa.int32()),
        ("face_id", pa.string()),
        ("bbox", BBOX),
        ("landmarks", LANDMARKS),
        ("det_score", pa.float32()),
        ("face_px", pa.float32()),  # shorter side of the bbox
        ("blur", pa.float32()),  # Laplacian variance of the aligned crop (quality.sharpness)
        ("yaw", pa.float32()),  # degrees, from landmarks
        ("pitch", pa.float32()),
        ("quality", pa.float32()),
        ("embedding", EMBED),
        ("aligned_jpeg", pa.binary()),  # 112x112 aligned crop, JPEG
        ("model", pa.string()),  # "<recognizer file>@sha256:<hex>"
        ("detector", pa.string()),
    ]
)

# <store>/tables/faces/ (contract): current state, one row per face ever detected.
FACES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("source_kind", pa.string()),
        ("source_group", pa.string()),
        ("role", pa.string()),
        ("face_index", pa.int32()),
        ("bbox", BBOX),
        ("landmarks", LANDMARKS),
        ("det_score", pa.float32()),
        ("face_px", pa.float32()),
        ("blur", pa.float32()),
        ("yaw", pa.float32()),
        ("pitch", pa.float32()),
        ("quality", pa.float32()),
        ("embedding", EMBED),
        ("aligned_jpeg", pa.binary()),
        ("model", pa.string()),
        ("detector", pa.string()),
        ("cluster_id", pa.string()),  # per-album cluster before cross-album merge (nullable)
        ("identity_id", pa.string()),  # nullable
        ("status", pa.string()),
        ("reason", pa.string()),
        # The stable code the reason starts with (faceloop.vocab); null in rows written before
        # the column existed: readers fall back to faceloop.vocab.reason_code(reason).
        ("reason_code", pa.string()),
        ("score", pa.float32()),  # the similarity the decision rests on (nullable)
        ("run_id", pa.string()),  # run that detected the face
        ("labelled_run_id", pa.string()),  # run that last changed status / identity
    ]
)

# The columns a label decision writes: a label overlay (tables/labels/, storage/tables.py) holds
# face_id and these for every face of a group, replacing the faces file's own.
FACE_LABEL_COLUMNS = (
    "cluster_id",
    "identity_id",
    "status",
    "reason",
    "reason_code",
    "score",
    "labelled_run_id",
)
LABELS_SCHEMA = pa.schema(
    [FACES_SCHEMA.field("face_id"), *(FACES_SCHEMA.field(c) for c in FACE_LABEL_COLUMNS)]
)

# <store>/tables/images/ (contract): one row per image ever seen (the discovery state).
IMAGES_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("size_bytes", pa.int64()),
        ("source_kind", pa.string()),
        ("source_group", pa.string()),
        ("role", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("reason_code", pa.string()),  # as in the faces table (null in older rows)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int32()),
        ("run_id", pa.string()),
        # ID-card photos: 64-bit DCT pHash of the decoded pixels (faceloop.hashing.phash64),
        # which finds the same photo re-encoded or resized under another subject; null for
        # album photos, undecodable files and rows written before the column existed.
        ("phash", pa.int64()),
        # A ``moved`` row of an album photo that left one path while a copy of its bytes stays
        # listed at another: the path it left (which alone stops counting as an image; a
        # ``moved`` row without it says no path of these bytes is listed any more). Null for
        # every other row and for rows written before the column existed.
        ("moved_from", pa.string()),
    ]
)

# One row of a published training shard (contract).
SHARD_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("identity_id", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),  # 112x112 aligned JPEG
        ("quality", pa.float32()),
        ("source_kind", pa.string()),
    ]
)
