"""Closing the loop: re-embed stored faces when a newly trained recognizer is registered.

``faceloop models register FILE`` appends the model to ``<store>/models/registry.json``; the next
refresh (1) embeds new images with it (the Ray stage loads it in place of the backend's
recognizer) and (2) re-embeds every stored face whose ``model`` tag differs, from the aligned
crop kept in the faces table, then relabels everything. Identity ids stay stable where the
membership is unchanged because the relabel keeps, per identity, the id most of its faces had
(tasks/cluster.assign_identity_ids).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.config import Settings
from faceloop.errors import BadInputError, ConfigError, ModelLoadError
from storage import layout
from storage.objectstore import ObjectStore
from storage.tables import iter_faces, write_group
from training.infer import onnx_embed_fn
from training.registry import current_model

log = logging.getLogger(__name__)


def with_registered_model(settings: Settings) -> Settings:
    """``settings`` with the store's current registered recognizer (if any) copied next to the
    other models and set as ``models.recognizer``; unchanged when nothing is registered."""
    entry = current_model(settings.store)  # validated: sha256 is 64 hex, file its store path
    if not entry:
        if settings.models.registered_sha256:
            # A pin is there to catch a store whose registry was changed behind its back: an
            # emptied or deleted one re-embedded every face with the built-in recognizer.
            raise ConfigError(
                f"models.registered_sha256 pins {settings.models.registered_sha256.lower()}, "
                "but the store has no registered recognizer: refusing to embed with another "
                "(register that file again, or unset the pin)"
            )
        return settings
    import hashlib

    from faceloop.hashing import sha256_file
    from storage.objectstore import open_store

    sha = entry["sha256"]
    pinned = settings.models.registered_sha256
    if pinned and pinned.lower() != sha:
        raise ConfigError(
            f"the store's current registered recognizer has sha256 {sha}, not the pinned "
            f"models.registered_sha256 {pinned.lower()}: refusing to use it"
        )
    root = Path(settings.models.root).absolute()
    local = root / "registered" / f"{sha}.onnx"
    if not local.absolute().is_relative_to(root):  # unreachable with a valid sha; belt and braces
        raise ConfigError(f"registered model path {local} leaves models.root {root}")
    held = local.is_file() and sha256_file(local) == sha
    if not held and not _writable_dir(local.parent):
        # A read-only models folder (README: it may be): this user's cache holds the copy.
        from faceloop.config import default_models_root

        root = Path(default_models_root()).absolute()
        local = root / "registered" / f"{sha}.onnx"
        held = local.is_file() and sha256_file(local) == sha
    if not held:
        # Not fetched yet, or this machine's copy damaged: the store's copy is the record.
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = open_store(settings.store).read_bytes(entry["file"])
        except FileNotFoundError:
            raise ConfigError(
                f"the store's current registered recognizer {entry.get('name') or sha[:12]} "
                f"(sha256 {sha[:12]}...) is missing from the store ({entry['file']}): register "
                "its file again with `faceloop models register FILE`"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise ConfigError(
                f"registered model {entry['file']} has sha256 {actual}, not the {sha} its "
                "registry entry names: refusing to use it (re-register the model)"
            )
        tmp = local.with_suffix(".part")
        # Derived from the store's faces: the owner's only, as in the store (a umask of 022
        # left it and its folder readable by every user of the machine).
        os.chmod(local.parent, 0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(local)
    out = _judged_as(settings, entry)
    out.models.recognizer = str(local)
    out.models.recognizer_sha256 = entry["sha256"]
    return out


def _writable_dir(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def judged_as_stored(settings: Settings, store: ObjectStore) -> Settings:
    """``settings`` with the thresholds a refresh judges the store's faces by: those of the
    registered recognizer (:func:`training.registry.with_policy_of`) when every stored face
    carries its embedding (``state/embedded_with.json``), else as given. For the commands that
    act on the faces without embedding any (review push and pull): they used the built-in
    recognizer's thresholds on faces a registered model had embedded. No model file is read."""
    entry = current_model(settings.store)
    tag = embedded_with(store)
    if not entry or not tag or not tag.endswith(f"@sha256:{entry['sha256']}"):
        return settings
    out = _judged_as(settings, entry)
    out.models.recognizer = "registered"  # judged as a refresh judges it (thresholds_key)
    return out


def _judged_as(settings: Settings, entry: dict) -> Settings:
    """``settings`` judging the registry ``entry``'s recognizer by its thresholds
    (:func:`training.registry.with_policy_of`)."""
    from training.registry import with_policy_of

    return with_policy_of(
        settings, str(entry.get("name") or entry["sha256"][:12]), entry.get("base")
    )


def stored_embeddings_current(store: ObjectStore, tag: str) -> bool:
    """Whether every stored face carries recognizer ``tag`` and the store was relabelled since
    (no re-embed pending, none half done): what a dataset version naming ``tag`` needs."""
    recorded = embedded_with(store)
    return (recorded is None or recorded == tag) and not relabel_pending(store)


def recognizer_tag(settings: Settings) -> str | None:
    """The ``model`` tag faces embedded by the registered recognizer carry."""
    if not settings.models.recognizer:
        return None
    return f"{Path(settings.models.recognizer).name}@sha256:{settings.models.recognizer_sha256}"


def embedded_with(store: ObjectStore) -> str | None:
    """The recognizer tag every stored face carries, when a complete pass recorded one."""
    import json

    if not store.exists(layout.EMBEDDED_WITH):
        return None
    try:
        value = json.loads(store.read_bytes(layout.EMBEDDED_WITH)).get("model")
    except (ValueError, AttributeError):
        return None  # unreadable: the next pass checks every face and writes it again
    return value if isinstance(value, str) else None


def note_recognizer(store: ObjectStore, tag: str) -> bool:
    """Called before a run embeds faces with recognizer ``tag``: forget a recorded tag that is
    not this one (the store is about to hold faces of two recognizers). True when the record
    names ``tag``: every stored face already carries it, nothing to re-embed."""
    recorded = embedded_with(store)
    if recorded == tag:
        return True
    if recorded is not None:
        store.delete(layout.EMBEDDED_WITH)
    return False


def reembed_store(settings: Settings, store: ObjectStore, tag: str | None = None) -> int:
    """Re-embed every stored face not embedded by this run's recognizer (``tag``; default:
    the registered one, else the backend's own), one group file at a time (bounded memory).
    Returns how many faces were re-embedded (0: nothing to do).

    When ``state/embedded_with.json`` already names this recognizer no file is read: a
    refresh with an unchanged recognizer stays O(1) here. It is written after a complete pass.
    Before the first group is rewritten ``state/relabel_pending.json`` is: the labels are the
    old recognizer's until a label stage relabels everything (:func:`relabel_pending`)."""
    import json

    tag = tag or recognizer_tag(settings) or _backend_recognizer_tag(settings)
    if embedded_with(store) == tag:
        return 0
    embed = None
    done = 0
    before: set[str] = set()
    for table in iter_faces(store):
        if len(table) == 0 or pc.all(pc.equal(table.column("model"), tag)).as_py():
            continue
        before |= {m.split("@")[0] for m in pc.unique(table.column("model")).to_pylist() if m}
        if embed is None:
            embed = _embed_fn(settings, tag)
            store.write_bytes(layout.RELABEL_PENDING, json.dumps({"model": tag}).encode())
        new = reembed_faces(table, embed, model_tag=tag)
        kind, group = (
            table.column("source_kind")[0].as_py(),
            table.column("source_group")[0].as_py(),
        )
        write_group(store, kind, group, new)
        done += len(table)
    if done:
        # Said plainly: after an upgrade whose default recognizer changed, this is why a
        # refresh with nothing new takes minutes and relabels the store.
        # (A registered recognizer is used whatever models.recognizer says: going back is
        # `faceloop models unregister`, which the advice names then.)
        log.warning(
            "re-embedded %d stored faces with %s (they were %s's): the store is relabelled; %s",
            done,
            tag.split("@")[0],
            ", ".join(sorted(before - {tag.split("@")[0]})) or "another recognizer",
            "`faceloop models unregister` goes back to the recognizer before it"
            if current_model(settings.store)
            else "set models.recognizer to keep a store on its recognizer",
        )
    store.write_bytes(layout.EMBEDDED_WITH, json.dumps({"model": tag}).encode())
    return done


def _backend_recognizer_tag(settings: Settings) -> str:
    from tasks.backends import model_infos

    return next(i.tag for i in model_infos(settings.models) if i.role == "recognizer")


def _embed_fn(settings: Settings, tag: str) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """What embeds aligned crops as this run's recognizer does: the registered (or built-in)
    graph named by ``models.recognizer``, else the backend's own recognizer."""
    if settings.models.recognizer:
        return onnx_embed_fn(settings.models.recognizer, threads=settings.models.threads)
    from tasks.backends import load_backend

    backend = load_backend(settings.models)
    if backend.recognizer_tag != tag:  # pragma: no cover - the tag is the backend's own
        raise ConfigError(f"the {backend.name} backend's recognizer is not {tag}")
    return backend.embed


def relabel_pending(store: ObjectStore) -> bool:
    """Whether stored faces were re-embedded and the store not relabelled since (a run killed
    between the two): the next label stage must relabel every album."""
    return store.exists(layout.RELABEL_PENDING)


def relabelled(store: ObjectStore) -> None:
    """A label stage relabelled every album after a re-embedding pass."""
    store.delete(layout.RELABEL_PENDING)


def reembed_faces(
    faces_table: pa.Table,
    embed_fn: Callable[[Sequence[np.ndarray]], np.ndarray],
    batch_size: int = 256,
    model_tag: str | None = None,
) -> pa.Table:
    """The faces table with ``embedding`` recomputed from ``aligned_jpeg`` (decoded to BGR, in
    batches of ``batch_size``) by ``embed_fn`` (list of 112x112 BGR uint8 -> ``(N, D)``
    float32, like ``FaceBackend.embed``). Rows without a crop keep a null embedding. With
    ``model_tag`` the ``model`` column is set to it on re-embedded rows. No other column
    changes, row order included; identity ids are re-decided by the re-labelling that follows
    (see the module docstring). Raises :class:`BadInputError` for a crop that does not decode."""
    n = faces_table.num_rows
    crops = faces_table.column("aligned_jpeg").to_pylist()
    vectors: list[list[float] | None] = [None] * n
    todo = [i for i, c in enumerate(crops) if c]
    for lo in range(0, len(todo), batch_size):
        rows = todo[lo : lo + batch_size]
        images = []
        for i in rows:
            bgr = cv2.imdecode(np.frombuffer(crops[i], np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise BadInputError("bad_aligned_jpeg", f"row {i} does not decode")
            images.append(bgr)
        emb = np.asarray(embed_fn(images), np.float32)
        if emb.shape[0] != len(rows):
            raise ValueError(f"embed_fn returned {emb.shape[0]} vectors for {len(rows)} crops")
        if not np.isfinite(emb).all():
            # Never written: NaN embeddings made every later refresh fail in the clustering
            # ("distances must be finite") with the store half re-embedded.
            raise ModelLoadError(
                "the recognizer returned embeddings that are not finite for stored faces: "
                "`faceloop models unregister` it (or register a working one)"
            )
        for i, v in zip(rows, emb, strict=False):
            vectors[i] = v.tolist()
    idx = faces_table.schema.get_field_index("embedding")
    out = faces_table.set_column(
        idx, faces_table.schema.field(idx), pa.array(vectors, faces_table.schema.field(idx).type)
    )
    if model_tag is not None and "model" in out.column_names:
        m = out.schema.get_field_index("model")
        old = out.column("model").to_pylist()
        new = [model_tag if vectors[i] is not None else old[i] for i in range(n)]
        out = out.set_column(m, out.schema.field(m), pa.array(new, out.schema.field(m).type))
    return out
