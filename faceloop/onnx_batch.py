"""A batch axis for recognizer graphs exported with the batch fixed at 1.

Some exported recognizers (EdgeFace's) declare a batch axis on their input but fix the batch at
1 inside: their Reshape nodes name a target shape ``[1, ...]``, so a call of N crops fails and
the refresh has to embed one crop per call. :func:`free_batch_axis` rewrites those targets to
``[0, ...]`` (ONNX Reshape: 0 copies the input's own dimension, here the batch) and drops the
recorded intermediate shapes (onnxruntime's optimizer would bake batch 1 back in from them).
Nothing else in the graph changes: the weights, and so the model's name and sha256 recorded
with every face, are the file's.

:func:`batched_session` builds an onnxruntime session of the rewritten graph and accepts it
only when a probe of a few crops gives the same embeddings in one call as the original gives
one crop at a time; :func:`with_batch_axis` is what a loader calls: the session to use and
whether it takes batches (otherwise the caller keeps one crop per call). docs/SCALING.md, issue
16: EdgeFace-S 16 -> 12-13 ms of CPU per face in calls of 4-16 crops on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Largest |batched - one at a time| a probe accepts, relative to the embedding's largest
# magnitude (float32 reassociation inside batched kernels: ~1e-6 measured on EdgeFace-S).
PROBE_TOLERANCE = 1e-4
PROBE_CROPS = 3


def crop_shape(session: Any) -> tuple[int, ...]:
    """One input crop's shape of a recognizer session (its input without the batch axis), e.g.
    (3, 112, 112); that when a dimension is symbolic."""
    dims = session.get_inputs()[0].shape[1:]
    if dims and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    return (3, 112, 112)


def takes_batches(session: Any) -> bool:
    """Whether a recognizer's onnxruntime session runs one call of two crops. Some exported
    graphs fix the batch at 1 inside although their input declares a batch axis (EdgeFace's
    Reshape nodes do); they must be fed one crop per call. The probe runs with onnxruntime's
    logging off for the call: its failure is the expected answer, not an error."""
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    blank = np.zeros((2, *crop_shape(session)), np.float32)
    try:
        out = session.run(None, {session.get_inputs()[0].name: blank}, quiet)[0]
    except Exception:  # onnxruntime raises its own Fail / RuntimeException types
        return False
    return bool(np.asarray(out).shape[0] == 2)


def free_batch_axis(model_bytes: bytes) -> bytes | None:
    """The serialized ONNX model with every Reshape target ``[1, d1, ...]`` (rank >= 2, from an
    initializer or a Constant node) rewritten to ``[0, d1, ...]``, its intermediate value
    shapes dropped and its outputs' first dimension made symbolic; None when no Reshape fixes
    a batch of 1 (nothing to free)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue  # 0 would mean an empty dimension there, not "copy the input's"
        name = node.input[1]
        if name in inits:
            target = numpy_helper.to_array(inits[name])
        elif (
            name in consts and consts[name].attribute and consts[name].attribute[0].name == "value"
        ):
            target = numpy_helper.to_array(consts[name].attribute[0].t)
        else:
            continue  # computed at run time: follows the input already
        if target.ndim != 1 or len(target) < 2 or int(target[0]) != 1:
            continue
        freed = target.copy()
        freed[0] = 0
        # A new initializer per node: a target shared with another node stays as it was there.
        new_name = f"{name}__batch_axis_{changed}"
        graph.initializer.append(numpy_helper.from_array(freed, new_name))
        node.input[1] = new_name
        changed += 1
    if not changed:
        return None
    del graph.value_info[:]
    for out in graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    return bytes(model.SerializeToString())


def batched_session(
    session: Any, model_bytes: bytes, make_session: Callable[[bytes], Any]
) -> tuple[Any, bytes] | None:
    """(a session of :func:`free_batch_axis`'s graph, that graph's bytes) when it embeds a probe
    of a few random crops in one call as ``session`` does one at a time (``make_session(bytes)``
    builds it with the caller's options and providers); None when there is nothing to free or
    the probe disagrees or fails."""
    freed = free_batch_axis(model_bytes)
    if freed is None:
        return None
    try:
        candidate = make_session(freed)
        name = session.get_inputs()[0].name
        shape = (PROBE_CROPS, *crop_shape(session))
        x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
        ref = np.concatenate(
            [np.asarray(session.run(None, {name: x[i : i + 1]})[0]) for i in range(len(x))]
        )
        got = np.asarray(candidate.run(None, {candidate.get_inputs()[0].name: x})[0])
    except Exception as exc:  # onnxruntime's own error types: the graph is not batchable
        log.info("recognizer graph: the freed batch axis does not run (%s): one crop per call", exc)
        return None
    scale = max(float(np.abs(ref).max()), 1e-12)
    if got.shape != ref.shape or float(np.abs(got - ref).max()) > PROBE_TOLERANCE * scale:
        log.info("recognizer graph: batched outputs differ from one crop per call: not used")
        return None
    return candidate, freed


def with_batch_axis(
    session: Any, model_path: str | Path, make_session: Callable[[bytes], Any]
) -> tuple[Any, bool, bytes | None]:
    """(the session to embed with, whether it takes batches, the freed graph's bytes): ``session``
    when it takes batches, else :func:`batched_session` of the graph at ``model_path`` when the
    probe accepts it (with its bytes, for :func:`keep_freed`), else ``session`` fed one crop per
    call (the bytes None whenever ``session`` is kept)."""
    if takes_batches(session):
        return session, True, None
    found = batched_session(session, Path(model_path).read_bytes(), make_session)
    if found is None:
        return session, False, None
    log.info("the recognizer's graph fixed its batch at 1: batch axis freed")
    return found[0], True, found[1]


# ---------------------------------------------------------------- the freed graph, kept

# What a kept freed graph is valid for: this format, the source graph's sha256, onnxruntime's
# version, the providers it was probed on and the probe's tolerance (graph_key).
_KEPT_FORMAT = 1


def graph_key(source_sha256: str, providers: list[str]) -> str:
    """The name a freed graph is kept under (:func:`keep_freed`): a digest of everything its
    probe's verdict depends on."""
    import onnxruntime as ort

    what = json.dumps(
        [_KEPT_FORMAT, source_sha256, ort.__version__, list(providers), PROBE_TOLERANCE]
    )
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def kept_freed(folder: Path, key: str) -> tuple[bytes, dict[str, Any]] | None:
    """``(graph bytes, record)`` of the freed graph kept under ``key`` in ``folder``; None when
    there is none, or its bytes are not the ones recorded (a partial or altered file)."""
    try:
        record = json.loads((folder / f"{key}.json").read_text())
        data = (folder / f"{key}.onnx").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return None
    return data, record


def keep_freed(folder: Path, key: str, data: bytes, record: dict[str, Any]) -> None:
    """Keep a freed graph that passed its probe, with ``record`` (plus its bytes' sha256), so
    that the next load of the same source graph under the same onnxruntime and providers
    builds its session at once: no session of the source graph, no rewrite, no probe (0.2 s
    of a 0.44 s EdgeFace-S load). Each file is written beside and renamed into place; a folder
    that cannot be written only costs the next load that time."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, body in (
            (f"{key}.onnx", data),
            (f"{key}.json", json.dumps(record | {"sha256": hashlib.sha256(data).hexdigest()})),
        ):
            tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            if isinstance(body, str):
                tmp.write_text(body)
            else:
                tmp.write_bytes(body)
            os.replace(tmp, folder / name)
    except OSError as exc:
        log.debug("the freed recognizer graph was not kept in %s: %s", folder, exc)
