"""The model registry of a store, ``<store>/models/registry.json``: which trained recognizers
exist and which is current. Torch-free: the refresh reads it on every run."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from faceloop.errors import ConfigError, FaceloopError
from faceloop.hashing import is_sha256, sha256_file
from storage import layout
from storage.objectstore import open_store

log = logging.getLogger(__name__)

REGISTRY = layout.MODEL_REGISTRY


def validate_entry(entry: object, where: str = REGISTRY) -> dict[str, Any]:
    """``entry`` if it is a well-formed registry entry, else :class:`ConfigError`.

    The registry lives in the store, which others may write: its ``sha256`` becomes a file name
    in ``models.root`` and its ``file`` a store path, so both are checked before any use (a
    ``"../../x"`` must not write outside ``models.root``): ``sha256`` is 64 lowercase hex and
    ``file`` is exactly ``models/files/<sha256>.onnx``.
    """
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an entry is not a JSON object")
    sha = entry.get("sha256")
    if not is_sha256(sha):
        raise ConfigError(f"{where}: entry sha256 {str(sha)[:80]!r} is not 64 lowercase hex digits")
    assert isinstance(sha, str)
    if entry.get("file") != layout.model_file(sha):
        raise ConfigError(
            f"{where}: entry file {str(entry.get('file'))[:120]!r} must be "
            f"{layout.model_file(sha)!r}"
        )
    return entry


def load_registry(store_root: str) -> list[dict[str, Any]]:
    """The registered recognizers, oldest first (empty when nothing was registered); every
    entry validated (:func:`validate_entry`), :class:`ConfigError` for a bad registry."""

    try:
        entries = json.loads(open_store(store_root).read_bytes(REGISTRY))
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise ConfigError(f"{REGISTRY} in {store_root} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ConfigError(f"{REGISTRY} must hold a JSON list")
    return [validate_entry(e, f"{REGISTRY} in {store_root}") for e in entries]


def unregister_models(store_root: str, name: str | None) -> list[dict[str, Any]]:
    """Take the recognizers registered as ``name`` (None: every one) out of the registry; the
    one registered before becomes current again, or, with none left, the configured (built-in)
    recognizer. Their files stay in the store (a version's manifest names them). Returns the
    entries taken out; :class:`ConfigError` when ``name`` names none."""
    entries = load_registry(store_root)
    out = [e for e in entries if name is None or e.get("name") == name]
    if not out:  # nothing found: exit 1, as the other commands that find nothing
        known = ", ".join(sorted({str(e.get("name")) for e in entries})) or "none"
        raise FaceloopError(
            "no recognizer is registered in this store"
            if name is None
            else f"no recognizer registered as {name!r} (registered: {known})"
        )
    left = [e for e in entries if e not in out]
    store = open_store(store_root)
    if left:
        store.write_bytes(REGISTRY, json.dumps(left, indent=2).encode())
    elif store.exists(REGISTRY):
        store.delete(REGISTRY)
    return out


def current_model(store_root: str) -> dict[str, Any] | None:
    """The most recently registered recognizer: the one the next refresh re-embeds with."""
    entries = load_registry(store_root)
    return entries[-1] if entries else None


# The check a recognizer passes before the CLI registers it (:func:`check_recognizer`): at most
# this share of the dataset's pairs of identities may have centroids at the merge threshold the
# refresh will use. Not 0: the dataset's labels are the old model's, and one person it split
# in two is a pair a better model rightly merges (the demo's store with ArcFace w600k_mbf: 2 of
# 325 pairs; 1.2% of its pairs of faces of different identities, at a mean cosine of 0.04).
# A model that maps everyone close together merges nearly all of them.
CHECK_MAX_MERGED = 0.05
CHECK_FACES = 2000  # faces of the dataset version embedded for the check (the first shards')


def sidecar_info(onnx_path: str | Path) -> dict[str, Any]:
    """What ``recognizer.json`` beside an exported recognizer says of it (:func:`train` writes
    it); empty when there is none. :class:`ConfigError` naming the file when it is not such a
    description (a bare TypeError or JSONDecodeError named nothing)."""
    sidecar = Path(onnx_path).with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        info = json.loads(sidecar.read_text())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{sidecar} (read as the model's description): {exc}") from None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("sha256", ""), str)
        or not isinstance(info.get("dataset") or {}, dict)
    ):
        raise ConfigError(
            f"{sidecar} (read as the model's description) is not one: an object whose sha256 "
            "is a string and dataset an object, as `faceloop train` writes it; move it away"
        )
    return info


def probe_recognizer(onnx_path: str | Path) -> int:
    """The embedding size of a recognizer file, found by running it as a refresh would: on 1,
    2 and 3 crops (an odd batch too). :class:`ConfigError` when it fails to run, gives another
    shape or size per batch, or outputs that are not finite or are all zero: such files passed
    the static check, were registered, and broke every refresh after (NaN embeddings refused by
    the clustering; all zeros rejected every face and published an empty dataset; a batch the
    graph could not take failed half-way through the re-embed)."""
    import numpy as np

    from training.infer import onnx_embed_fn

    rng = np.random.default_rng(0)
    try:
        embed = onnx_embed_fn(onnx_path)
        outs = [
            np.asarray(embed([rng.integers(0, 256, (112, 112, 3), np.uint8) for _ in range(n)]))
            for n in (1, 2, 3)
        ]
    except Exception as exc:  # onnxruntime's errors: a graph that cannot run as a recognizer
        raise ConfigError(
            f"{onnx_path} does not run as a recognizer on 1, 2 and 3 crops: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    dims = {o.shape[1] if o.ndim == 2 else None for o in outs}
    if (
        any(o.ndim != 2 or o.shape[0] != n for o, n in zip(outs, (1, 2, 3), strict=True))
        or len(dims) != 1
    ):
        raise ConfigError(
            f"{onnx_path} gives outputs of shapes {[o.shape for o in outs]} for 1, 2 and 3 "
            "crops: a recognizer gives (N, D)"
        )
    raw = np.concatenate(outs)
    if not np.isfinite(raw).all() or not (np.linalg.norm(raw, axis=1) > 1e-6).all():
        raise ConfigError(
            f"{onnx_path} outputs embeddings that are not finite or are all zero: a refresh "
            "could not tell anyone apart with it"
        )
    return int(raw.shape[1])


def check_recognizer(
    store_root: str,
    onnx_path: str | Path,
    merge: float,
    policy_key: str,
    dataset: dict[str, Any] | None = None,
    max_faces: int = CHECK_FACES,
) -> dict[str, Any]:
    """What a refresh would make of the store's people with this recognizer: up to
    ``max_faces`` faces of the dataset version it was trained on (``dataset``: name and
    version; default: recognizer.json's, else the store's newest dataset) embedded with it; the
    share of the pairs of identities whose centroids reach ``merge``, the cross-album merge
    threshold the refresh would judge it by (``policy.<policy_key>``), as ``merged``; and, for
    information, the shares of pairs of faces of different identities (``far``) and of one
    identity (``tar``) at or above it. ``ok`` is False when ``merged`` exceeds
    :data:`CHECK_MAX_MERGED`: a refresh would merge those people into one identity and publish
    it. A model trained too little (or on too few people) maps everyone close together. No
    dataset (or one identity) to check on: ``ok`` None."""
    import cv2
    import numpy as np

    from storage.manifest import latest_version
    from storage.recovery import dataset_names
    from storage.versions import iter_shards
    from training.infer import onnx_embed_fn

    store = open_store(store_root)
    if dataset is None:
        dataset = sidecar_info(onnx_path).get("dataset")
    if not dataset or "name" not in dataset:
        names = [n for n in dataset_names(store) if latest_version(store, n) is not None]
        dataset = {"name": names[0], "version": latest_version(store, names[0])} if names else None
    if dataset is not None:
        dataset = {k: dataset[k] for k in ("name", "version") if k in dataset}
    out: dict[str, Any] = {"ok": None, "merge": merge, "policy": policy_key, "dataset": dataset}
    if dataset is None:
        return out | {"why": "no published dataset to check it on"}
    ids: list[str] = []
    crops: list[np.ndarray] = []
    for t in iter_shards(
        store, dataset["name"], dataset.get("version", "latest"), ["identity_id", "image"]
    ):
        for ident, jpeg in zip(
            t.column("identity_id").to_pylist(), t.column("image").to_pylist(), strict=True
        ):
            img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            if img is not None:
                ids.append(ident)
                crops.append(img)
        if len(ids) >= max_faces:
            break
    ids, crops = ids[:max_faces], crops[:max_faces]
    if len(set(ids)) < 2:
        return out | {"faces": len(ids), "why": "fewer than 2 identities to check it on"}
    embed = onnx_embed_fn(onnx_path)
    emb = np.concatenate([embed(crops[i : i + 256]) for i in range(0, len(crops), 256)])
    sims = emb @ emb.T
    codes = np.unique(np.asarray(ids), return_inverse=True)[1]
    upper = np.triu(np.ones(sims.shape, bool), k=1)
    same = (codes[:, None] == codes[None, :]) & upper
    diff = (codes[:, None] != codes[None, :]) & upper
    far = float((sims[diff] >= merge).mean())
    tar = float((sims[same] >= merge).mean()) if same.any() else None
    k = int(codes.max()) + 1
    cents = np.zeros((k, emb.shape[1]), np.float64)
    np.add.at(cents, codes, emb)
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    pairs = np.triu(cents @ cents.T, k=1)[np.triu_indices(k, k=1)]
    merged = int((pairs >= merge).sum())
    return out | {
        "ok": merged <= CHECK_MAX_MERGED * len(pairs),
        "faces": len(ids),
        "identities": k,
        "identity_pairs": len(pairs),
        "identity_pairs_merged": merged,
        "far": far,
        "tar": tar,
        "impostor_mean": float(sims[diff].mean()),
        "genuine_mean": float(sims[same].mean()) if same.any() else None,
    }


def refuse_unless_checked(check: dict[str, Any], force: bool) -> None:
    """:class:`FaceloopError` (exit 1) for a failed :func:`check_recognizer` unless ``force``."""
    if check.get("ok") is not False or force:
        return
    ds = check["dataset"]
    raise FaceloopError(
        f"with this recognizer {check['identity_pairs_merged']} of the "
        f"{check['identity_pairs']} pairs of identities of dataset {ds['name']!r} "
        f"v{ds.get('version')} ({check['faces']} faces, {check['identities']} identities) reach "
        f"the merge threshold {check['merge']:.2f} (policy.{check['policy']}; mean cosine of "
        f"faces of different identities {check['impostor_mean']:.2f}, of one "
        f"{check['genuine_mean'] or 0:.2f}): a refresh would merge those people and publish them "
        "as one. Train it longer or on more people (or --on-top), give it its own thresholds "
        "(policy.<its name>), or register it anyway with --force"
    )


def model_name(onnx_path: str | Path, name: str | None = None) -> str:
    """The name a registration gives the model: ``name``, else recognizer.json's, else the
    file's stem."""
    return str(name or sidecar_info(onnx_path).get("name") or Path(onnx_path).stem)


def base_name(store_root: str, onnx_path: str | Path) -> str | None:
    """The recognizer a model trained ``--on-top`` builds on (recognizer.json), else None; a
    base that is itself a registered on-top model gives way to that one's base."""
    base = sidecar_info(onnx_path).get("base")
    if not isinstance(base, dict) or not base.get("name"):
        return None
    name = str(base["name"])
    by_name = {str(e.get("name")): e for e in load_registry(store_root)}
    seen: set[str] = set()
    while name in by_name and by_name[name].get("base") and name not in seen:
        seen.add(name)
        name = str(by_name[name]["base"])
    return name


def with_policy_of(settings: Any, name: str, base: str | None) -> Any:
    """``settings`` judging the registered model ``name`` (its ``models.recognizer_name``): by
    ``policy.<name>`` when the config sets one, else by its base's (a model trained on top of
    a recognizer starts from that recognizer's embeddings, and their scale), else by the
    backend's."""
    s = settings.model_copy(deep=True)
    s.models.recognizer_name = name
    if name not in s.policy and base is not None and base in s.policy:
        s.policy[name] = s.policy[base]
    return s


def thresholds_for(settings: Any, name: str, base: str | None = None) -> tuple[float, str]:
    """The merge threshold a refresh under ``settings`` judges a registered model ``name`` by,
    and the ``policy`` key it comes from (:func:`with_policy_of`)."""
    s = with_policy_of(settings, name, base)
    s.models.recognizer = "registered"
    key = str(s.thresholds_key)
    if key == name and name not in settings.policy:
        key = str(base)  # the base's entry, copied
    return float(s.thresholds.merge), key


def register_model(
    store_root: str,
    onnx_path: str | Path,
    *,
    name: str | None = None,
    dataset: dict[str, Any] | None = None,
    expected_sha256: str | None = None,
    check: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Copy an exported recognizer into ``<store>/models/files/<sha256>.onnx`` and append it to
    ``<store>/models/registry.json`` (name, sha256, file, created, parent dataset version,
    embedding size), making it the current model. Reads ``recognizer.json`` next to the file
    (written by :func:`train`) for what is not given. Registering a file whose sha256 is already
    registered makes it current again instead of adding a duplicate. Returns the entry.

    ``expected_sha256`` is a hash known from outside the store (e.g. published with the
    training run): registration is refused unless the file has it.

    ``check``: called once the file is known to be a recognizer, before anything is written;
    what it returns is recorded as the entry's ``check`` (the CLI's :func:`check_recognizer`),
    and what it raises refuses the registration.

    The registry is rewritten whole (read, append, write): run one registration at a time.
    """
    if expected_sha256 is not None and not is_sha256(expected_sha256.strip().lower()):
        raise ConfigError(f"--expected-sha256 {expected_sha256!r} is not 64 hex digits")

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"model file not found: {onnx_path}")
    sidecar = onnx_path.with_suffix(".json")
    info = sidecar_info(onnx_path)
    sha = sha256_file(onnx_path)
    if expected_sha256 is not None and sha != expected_sha256.strip().lower():
        raise ConfigError(
            f"{onnx_path} has sha256 {sha}, not the expected {expected_sha256.strip().lower()}: "
            "refusing to register it"
        )
    if info.get("sha256") not in (None, sha):
        raise ConfigError(f"{sidecar} describes another file (sha256 {info['sha256'][:12]}...)")
    declared = onnx_output_dim(onnx_path)
    dim = probe_recognizer(onnx_path)
    if declared is not None and declared != dim:
        raise ConfigError(f"{onnx_path} declares {declared}-d embeddings and gives {dim}-d ones")
    # The file is a recognizer with the hash asked for: now what it would do to the store
    # (check_recognizer; raises to refuse it).
    figures = check() if check is not None else None
    store = open_store(store_root)
    rel = layout.model_file(sha)
    if not store.exists(rel) or hashlib.sha256(store.read_bytes(rel)).hexdigest() != sha:
        # Absent, or a damaged copy (the refresh refuses it and says to register again).
        store.put_file(rel, onnx_path)
    parent = dataset if dataset is not None else info.get("dataset")
    entry = {
        "name": model_name(onnx_path, name),
        "role": "recognizer",
        "sha256": sha,
        "file": rel,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {k: parent[k] for k in ("name", "version") if k in parent} if parent else None,
        "embedding_dim": dim,
    }
    if (base := base_name(store_root, onnx_path)) is not None:
        entry["base"] = base  # its thresholds are the base's (with_policy_of)
    if expected_sha256 is not None:
        entry["verified"] = "expected_sha256"  # checked against a hash from outside the store
    if figures is not None:
        entry["check"] = figures  # check_recognizer's figures (and "forced" when overridden)
    entries = [e for e in load_registry(store_root) if e.get("sha256") != sha]
    entries.append(entry)
    store.write_bytes(REGISTRY, json.dumps(entries, indent=2).encode())
    log.info("registered recognizer %s (sha256 %s) in %s", entry["name"], sha[:12], store_root)
    return entry


def onnx_output_dim(path: Path) -> int | None:
    """Embedding size of an ONNX recognizer as its graph declares it (None: a symbolic size,
    which :func:`probe_recognizer` finds); :class:`ConfigError` unless it takes
    ``(N, 3, 112, 112)`` and returns ``(N, D)``."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise ConfigError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.input or not model.graph.output:
        raise ConfigError(f"{path} is not a recognizer: its graph has no input or output")
    dims = [
        [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in (model.graph.input[0], model.graph.output[0])
    ]
    if len(model.graph.output) != 1 or dims[0][1:] != [3, 112, 112] or len(dims[1]) != 2:
        raise ConfigError(f"{path} is not a 112x112 recognizer (input {dims[0]}, output {dims[1]})")
    return dims[1][1] if isinstance(dims[1][1], int) else None
