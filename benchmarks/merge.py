"""The cross-album merge at scale on synthetic centroids: time, memory and pairwise precision /
recall against the synthetic truth."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from evaluation.synthetic import make_centroids, pair_scores


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def bench_merge(n_faces: int, seed: int = 0) -> dict[str, float | int | str]:
    """Time the cross-album merge on ~``n_faces`` synthetic faces; prints nothing.

    Returns faces, centroids, identities, components, wall and CPU seconds (merge only), the peak
    resident memory added during the merge (sampled every 20 ms), the index kind used, and
    pairwise precision / recall over faces against the synthetic truth at the default insightface
    merge threshold."""
    from faceloop.config import DEFAULT_POLICY
    from tasks.cluster import knn_index_kind, merge_clusters

    data = make_centroids(n_faces, seed=seed)
    th = DEFAULT_POLICY["insightface"].merge
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        comp = merge_clusters(data.centroids, data.counts, data.keys, th)
    finally:
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    scores = pair_scores(comp, data.identity, data.counts)
    return {
        "n_faces": int(data.counts.sum()),
        "n_centroids": len(data.centroids),
        "n_identities": len(np.unique(data.identity)),
        "n_components": int(comp.max() + 1) if len(comp) else 0,
        "index": knn_index_kind(len(data.centroids)),
        "seconds": round(seconds, 3),
        # CPU time of this process (all threads): less sensitive than wall time to a busy machine.
        "cpu_seconds": round(cpu_seconds, 3),
        "peak_rss_added_mb": round((peak[0] - base) / 2**20, 1),
        "input_mb": round(data.centroids.nbytes / 2**20, 1),
        "pair_precision": round(scores["precision"], 5),
        "pair_recall": round(scores["recall"], 5),
        "threshold": th,
    }
