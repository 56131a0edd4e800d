"""The model registry of a store, ``<store>/models/registry.json``: which trained recognizers
exist and which is current. Torch-free: the refresh reads it on every run."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from faceloop.errors import ConfigError
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


def current_model(store_root: str) -> dict[str, Any] | None:
    """The most recently registered recognizer: the one the next refresh re-embeds with."""
    entries = load_registry(store_root)
    return entries[-1] if entries else None


def register_model(
    store_root: str,
    onnx_path: str | Path,
    *,
    name: str | None = None,
    dataset: dict[str, Any] | None = None,
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """Copy an exported recognizer into ``<store>/models/files/<sha256>.onnx`` and append it to
    ``<store>/models/registry.json`` (name, sha256, file, created, parent dataset version,
    embedding size), making it the current model. Reads ``recognizer.json`` next to the file
    (written by :func:`train`) for what is not given. Registering a file whose sha256 is already
    registered makes it current again instead of adding a duplicate. Returns the entry.

    ``expected_sha256`` is a hash known from outside the store (e.g. published with the
    training run): registration is refused unless the file has it.

    The registry is rewritten whole (read, append, write): run one registration at a time.
    """
    if expected_sha256 is not None and not is_sha256(expected_sha256.strip().lower()):
        raise ConfigError(f"--expected-sha256 {expected_sha256!r} is not 64 hex digits")

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"model file not found: {onnx_path}")
    sidecar = onnx_path.with_suffix(".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    sha = sha256_file(onnx_path)
    if expected_sha256 is not None and sha != expected_sha256.strip().lower():
        raise ConfigError(
            f"{onnx_path} has sha256 {sha}, not the expected {expected_sha256.strip().lower()}: "
            "refusing to register it"
        )
    if info.get("sha256") not in (None, sha):
        raise ConfigError(f"{sidecar} describes another file (sha256 {info['sha256'][:12]}...)")
    dim = onnx_output_dim(onnx_path)
    store = open_store(store_root)
    rel = layout.model_file(sha)
    if not store.exists(rel):
        store.put_file(rel, onnx_path)
    parent = dataset if dataset is not None else info.get("dataset")
    entry = {
        "name": name or info.get("name") or onnx_path.stem,
        "role": "recognizer",
        "sha256": sha,
        "file": rel,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {k: parent[k] for k in ("name", "version") if k in parent} if parent else None,
        "embedding_dim": dim,
    }
    if expected_sha256 is not None:
        entry["verified"] = "expected_sha256"  # checked against a hash from outside the store
    entries = [e for e in load_registry(store_root) if e.get("sha256") != sha]
    entries.append(entry)
    store.write_bytes(REGISTRY, json.dumps(entries, indent=2).encode())
    log.info("registered recognizer %s (sha256 %s) in %s", entry["name"], sha[:12], store_root)
    return entry


def onnx_output_dim(path: Path) -> int:
    """Embedding size of an ONNX recognizer; :class:`ConfigError` unless it takes
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
    return int(dims[1][1])
