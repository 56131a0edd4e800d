"""The anchor labeller faceloop must beat: a simple Immich-style labeller.

Immich (``machine-learning`` + server face clustering) in its simplest form: one global DBSCAN
over all faces with cosine distance ``eps`` 0.5 and ``min_samples`` 3, faces with detector score
below 0.7 left out; no review queue. For ID cards: ID vs live accepted at cosine >= 0.28,
rejected below. It runs on faceloop's own detections and embeddings (the faces table), so the
comparison isolates the labelling policy from the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from faceloop.arrays import l2_normalize


@dataclass(frozen=True)
class BaselineParams:
    eps: float = 0.5  # cosine distance
    min_samples: int = 3
    min_det_score: float = 0.7
    idcard_accept: float = 0.28


def cluster_albums(
    face_ids: Sequence[str],
    embeddings: np.ndarray,
    det_scores: Sequence[float],
    params: BaselineParams = BaselineParams(),
) -> dict[str, str | None]:
    """face_id -> identity (``"b<k>"``) or ``None`` (noise, or below the detector score)."""
    from sklearn.cluster import DBSCAN

    keep = [i for i, s in enumerate(det_scores) if s is not None and s >= params.min_det_score]
    out: dict[str, str | None] = {f: None for f in face_ids}
    if not keep:
        return out
    x = l2_normalize(np.asarray(embeddings, dtype=np.float32)[keep])
    labels = DBSCAN(
        eps=params.eps, min_samples=params.min_samples, metric="cosine", algorithm="brute"
    ).fit_predict(x)
    for i, lab in zip(keep, labels, strict=False):
        out[face_ids[i]] = f"b{lab}" if lab >= 0 else None
    return out


def idcard_decision(
    id_emb: np.ndarray | None,
    live_emb: np.ndarray | None,
    params: BaselineParams = BaselineParams(),
) -> str:
    """``accept`` when cosine(ID, live) >= the anchor's threshold, ``reject`` otherwise (and
    ``no_face`` when either face is missing)."""
    if id_emb is None or live_emb is None:
        return "no_face"
    a = np.asarray(id_emb, dtype=np.float32)
    b = np.asarray(live_emb, dtype=np.float32)
    cos = float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
    return "accept" if cos >= params.idcard_accept else "reject"
