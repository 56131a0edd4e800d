"""The typed vocabulary every room shares: face statuses, image statuses, roles, review task
kinds, and the reason codes decisions carry.

Values are ``StrEnum`` members, so they compare equal to (and are stored as) their plain strings:
Parquet tables keep ``"auto"``, ``"review"``, ... and old stores read back unchanged.
A decision's reason is ``(code, detail)``: the stable machine-readable ``code`` (stored in the
``reason_code`` column) and a human-readable ``detail``; the rendered ``reason`` is
``"<code>: <detail>"`` (or just the code).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple


class Status(StrEnum):
    """What happened to a face (contract). ``human`` is set only by review and never overridden."""

    AUTO = "auto"
    REVIEW = "review"
    REJECTED = "rejected"
    QUARANTINED = "quarantined"
    HUMAN = "human"


class ImageStatus(StrEnum):
    """What happened to an image: ``ok`` (>= 1 face), ``no_face`` (decoded, nothing found),
    ``quarantined`` (unreadable, not an image, too big, ...)."""

    OK = "ok"
    NO_FACE = "no_face"
    QUARANTINED = "quarantined"


class Role(StrEnum):
    """The role of an image inside its source group."""

    ALBUM = "album"
    ID = "id"
    LIVE = "live"


class TaskKind(StrEnum):
    """The four questions human review asks (one Label Studio project each per store).

    ``quality_check`` asks "is this face usable for training?" about a face that matches its
    identity but whose crop is poor: a question about the crop, never about who it is."""

    IDCARD_PAIR = "idcard_pair"
    CLUSTER_CHECK = "cluster_check"
    DUPLICATE = "duplicate"
    QUALITY_CHECK = "quality_check"


class InputCode(StrEnum):
    """Reason codes of images recorded without (or instead of) a model's verdict: files a source
    lists that cannot be read as an image, copies of content already processed, and ID-card
    subjects whose ID photo is missing or unusable."""

    NOT_A_REGULAR_FILE = "not_a_regular_file"  # FIFO, socket, device, symlink to a folder
    DANGLING_SYMLINK = "dangling_symlink"
    OUTSIDE_SOURCE_ROOT = "outside_source_root"  # a symlink pointing out of the source
    UNREADABLE = "unreadable"  # permission denied, I/O error
    VANISHED = "vanished"  # listed, then gone when read
    # Its bytes changed between discovery's hash and the face stage's read (a file still being
    # copied in, an atomic swap): recorded as unread, so the next refresh reads it again.
    CHANGED_WHILE_READ = "changed_while_read"
    # A file or folder name that is not valid UTF-8 (e.g. Latin-1 bytes from an old archive):
    # recorded under its name with those bytes escaped, never opened nor walked.
    NON_UTF8_NAME = "non_utf8_name"
    DUPLICATE_CONTENT = "duplicate_content"  # same bytes as an image under another URI
    # Same bytes as an image a model decoded, whose recorded URIs are all gone (a moved or
    # renamed file or folder): the known faces are reused, no model work (tasks/discover.py).
    # Also unusable bytes moved (status quarantined, the verdict they got named in the reason).
    MOVED = "moved"
    # Bytes a path held before it held others, back at it (an edit reverted): the known faces
    # stay, no model work; the path's latest row names them again (tasks/discover.py).
    RESTORED = "restored"
    IDCARD_NO_ID_PHOTO = "idcard_no_id_photo"  # the subject's id.<ext> is missing or unusable
    # A forgotten file's placeholder row (``forgotten:<keyed digest>`` uri) whose path a later run
    # took in (other bytes written there, its subject's tombstone lifted): the path counts under
    # its own row from then on, not under this one too (tasks/discover.py). Never counted.
    FORGOTTEN_TAKEN_IN = "forgotten_taken_in"


# The reason text of an UNREADABLE row recorded for a folder of a source that could not be
# listed (its files are not in the table while it stays so): "<this>: <the OS's message>".
UNLISTED_FOLDER = "folder cannot be listed"

# What the images table records instead of a sha256 for a file that could not be read as
# discovery hashed it (unreadable, vanished, its bytes changed before the face stage read them):
# ``unread:<code>``. Never "seen" for the file's real bytes, so the next refresh reads it again.
UNREAD_PREFIX = "unread:"


def unread_hash(code: str) -> str:
    """The images-table hash of a file not read for reason ``code``."""
    return f"{UNREAD_PREFIX}{code}"


# Face reason code: one ID or live photo (identical bytes, or near-identical by perceptual hash)
# filed under two ID subjects; detail = the other subject's store pseudonym(s). Every subject
# involved goes to review (tasks/label.duplicate_claims). The same photo reused inside one album
# is not a claim: the copy stays ``duplicate_content``.
DUPLICATE_CLAIM = "duplicate_claim"

# Face reason code: an album face of another file of one photo (a metadata edit, an export to
# another format, a re-save): its faces lie where the faces of a photo seen before lie
# (tasks/cluster.capture_copies). Rejected, so that one capture counts as one sighting and the
# training set holds its crops once; detail = the face kept.
SAME_CAPTURE = "same_capture"

# Face reason code: an ID-card subject folder holds more than one ID photo (``id.jpg`` and
# ``id.png``, say) with a face: whose ID is it? Every main face of the subject goes to review
# (an ID photo's largest face is not taken for another's "ghost portrait"); detail = the files.
SEVERAL_ID_PHOTOS = "idcard_several_id_photos"

# Face reason code: a live photo of an ID-card subject that is the subject's own ID photo (the
# same bytes, or a near-identical copy: pHash within PHASH_COPY_BITS and main faces at
# tasks/label.COPY_COSINE) is no live capture: its faces are rejected and it confirms nothing;
# the ID face of a subject with no other live face goes to review with this code.
LIVE_IS_ID_PHOTO = "idcard_live_is_id_photo"

# Face reason code: the identity would auto-label two or more faces of one photo; all but the
# largest go to review with the identity proposed (tasks/purity.one_face_per_photo).
SAME_PHOTO = "same_photo"

HUMAN_PREFIX = "human_"
_CODE = re.compile(r"[A-Za-z0-9_]+")


def reason_code(reason: str | None) -> str:
    """The stable code a rendered reason starts with (``"outlier: 0.21 < 0.30"`` -> ``"outlier"``);
    ``""`` for an empty reason. For stores written before the ``reason_code`` column existed."""
    m = _CODE.match((reason or "").strip())
    return m.group(0) if m else ""


# Codes whose detail starts with the identity they name, rendered ``"<code> <identity>: ..."``
# (``"possible_duplicate_of id-b: centroid similarity 0.71 >= 0.65"``): the stored text predates
# the code/detail split and must not change.
SUBJECT_CODES = frozenset({"possible_duplicate_of", "unclustered_near_identity"})


def render_reason(code: str, detail: str = "") -> str:
    """The human-readable reason stored beside its code: ``"<code>: <detail>"`` (``"<code>
    <detail>"`` for :data:`SUBJECT_CODES`, whose detail starts with the identity named)."""
    if not detail:
        return code
    return f"{code} {detail}" if code in SUBJECT_CODES else f"{code}: {detail}"


class Reason(NamedTuple):
    """One check's verdict: its stable ``code`` and a human-readable ``detail``."""

    code: str
    detail: str = ""

    @property
    def text(self) -> str:
        """The rendered reason (:func:`render_reason`)."""
        return render_reason(self.code, self.detail)


def join_reasons(reasons: Sequence[Reason]) -> Reason:
    """Several failed checks as one reason: the first (deciding) check's code, and a detail that
    continues with the other checks rendered, ``"; "``-separated, so that the rendered text is
    ``"<first>; <second>; ..."``. The first check must carry a detail."""
    first, rest = reasons[0], reasons[1:]
    if not rest:
        return first
    return Reason(first.code, "; ".join([first.detail, *(r.text for r in rest)]))


# A measured figure in a rendered reason: a decimal stated before the comparison it failed or
# passed (``"outlier: similarity to identity centroid 0.21 < 0.30"``) or as the best one found
# (``"(best 0.21)"``); the thresholds after the comparisons are not measured figures.
_MEASURED = re.compile(r"-?\d+\.\d+(?= (?:<|>=) )|(?<=best )-?\d+\.\d+")


def threshold_text(t: float) -> str:
    """A threshold as a reason prints it: as many decimals as it has (2 to 4), the same text for
    one threshold whatever is compared with it (:func:`reason_key` keeps thresholds)."""
    for nd in (2, 3):
        if abs(round(t, nd) - t) < 1e-9:
            return f"{t:.{nd}f}"
    return f"{t:.4f}"


_OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, ">=": operator.ge}


def compared(x: float, op: str, t: float) -> str:
    """``"<x> <op> <t>"`` for a reason, with as many decimals of ``x`` as it takes for the
    comparison to read as what was decided: "cosine 0.47 < 0.47" for 0.4656 against 0.468 read
    as a contradiction (``"0.466 < 0.468"`` now). ``op``: ``"<"`` or ``">="``."""
    tt = threshold_text(t)
    for d in range(len(tt.split(".", 1)[1]), 7):  # threshold_text gives 2 to 4 decimals
        xs = f"{x:.{d}f}"
        if _OPS[op](float(xs), float(tt)):
            return f"{xs} {op} {tt}"
    return f"{x:.6f} {op} {tt}"


def reason_key(reason: str | None) -> str:
    """``reason`` with its measured figures masked: two reasons with the same key state the same
    decision for the same reasons (``"outlier: similarity to identity centroid 0.21 < 0.30"`` and
    ``"... 0.22 < 0.30"`` do; another code, identity named or threshold does not). A figure that
    drifts as an identity grows is not a new decision, and must not rewrite a group file."""
    return _MEASURED.sub("#", reason or "")


def reason_codes(reason: str | None) -> tuple[str, ...]:
    """Every check's code in a rendered reason, deciding one first (:func:`join_reasons` joins
    checks with ``"; "``): ``"low_quality: 0.4 < 0.5; outlier: 0.2 < 0.3"`` ->
    ``("low_quality", "outlier")``."""
    parts = [reason_code(p) for p in (reason or "").split("; ")]
    return tuple(c for c in parts if c)


def row_reason_code(row: Mapping[str, Any]) -> str:
    """A stored row's reason code: its ``reason_code`` column, or for rows of stores written
    before that column existed (null there), the code parsed from its ``reason``."""
    return row.get("reason_code") or reason_code(row.get("reason"))


def is_human(row: Mapping[str, Any]) -> bool:
    """True when a person decided this face; automatic stages must leave such rows alone."""
    return row.get("status") == Status.HUMAN or str(row.get("reason") or "").startswith(
        HUMAN_PREFIX
    )


def human_mask(status: Any, reason: Any) -> list[bool]:
    """:func:`is_human` of every row of two Arrow string columns, in one vectorised pass."""
    import pyarrow.compute as pc

    mask = pc.or_(
        pc.fill_null(pc.equal(status, str(Status.HUMAN)), False),
        pc.fill_null(pc.starts_with(reason, HUMAN_PREFIX), False),
    )
    return mask.to_pylist()


# Which review question a status=review reason code asks (codes not listed are not pushed).
# idcard_review (live in the band), idcard_low_quality (match on a poor crop) and
# idcard_unconfirmed (the ID face no live face matched) are all one question: same person?
# So is duplicate_claim (the photo is also filed under another subject): the task carries the
# reason, naming the other subject by pseudonym.
# A face the machine would put into an identity but doubts (an outlier, a mixed identity, a lone
# face near an identity, an identity too small to trust) is one question: does it belong? The
# cluster check asks it with the identity's other faces beside it. A face held back only for a
# poor crop is another question (quality_check: usable for training?); when a poor crop comes
# with another doubt, annotate.review.plan_items asks the cluster check instead. Faces with no
# proposed identity stay in review unpushed (annotate.review.plan_items counts them).
_TASK_KIND_BY_CODE: dict[str, TaskKind] = {
    "idcard_review": TaskKind.IDCARD_PAIR,
    "idcard_low_quality": TaskKind.IDCARD_PAIR,
    "idcard_unconfirmed": TaskKind.IDCARD_PAIR,
    DUPLICATE_CLAIM: TaskKind.IDCARD_PAIR,
    SEVERAL_ID_PHOTOS: TaskKind.IDCARD_PAIR,
    "outlier": TaskKind.CLUSTER_CHECK,
    "low_cohesion": TaskKind.CLUSTER_CHECK,
    "low_quality": TaskKind.QUALITY_CHECK,
    "too_few_faces": TaskKind.CLUSTER_CHECK,
    "unclustered_near_identity": TaskKind.CLUSTER_CHECK,
    SAME_PHOTO: TaskKind.CLUSTER_CHECK,
    "possible_duplicate_of": TaskKind.DUPLICATE,
}


def task_kind_for_code(code: str | None) -> TaskKind | None:
    """The task kind a status=review reason code maps to, or None when it is not pushed."""
    return _TASK_KIND_BY_CODE.get(code or "")


def task_kind_for(reason: str | None) -> TaskKind | None:
    """The task kind a status=review rendered reason maps to (see :func:`task_kind_for_code`)."""
    return task_kind_for_code(reason_code(reason))
