"""Per-album clustering, cross-album merge and stable identity ids, on embeddings only.

Inputs are L2-normalised float32 embeddings (rows are renormalised defensively). For unit vectors
``||a - b||^2 = 2 - 2 cos(a, b)``, so Euclidean distance is a monotone decreasing function of
cosine similarity: HDBSCAN with the Euclidean metric on unit vectors orders neighbours exactly as
cosine does, and a cosine threshold t is the Euclidean radius ``sqrt(2 - 2 t)``.

Thresholds come from :class:`faceloop.config.PolicyThresholds` (cosine similarities):

- ``attach``: a face is close enough to a cluster centroid to belong to it (noise attach, and the
  average-linkage cut that groups faces HDBSCAN left as noise);
- ``outlier``: a clustered face less similar than this to its cluster's centroid (without itself)
  is evicted to noise;
- ``merge``: two groups whose centroids are at least this similar are one person. It is used both
  for the cross-album merge and, inside an album, to decide that a cluster holds two people (its
  2-means halves would not be merged). The cross-album merge compares every cluster with the
  whole store, so there it is a floor: :func:`gallery_merge_threshold` raises it when the store's
  own impostor tail, at the store's number of comparisons, reaches above it.

No I/O, no Prefect, no Ray. Logging only counts, never embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from faceloop.arrays import l2_normalize
from faceloop.config import ClusterSettings, PolicyThresholds
from faceloop.linkage import average_linkage_groups

log = logging.getLogger(__name__)

# Up to this many centroids the cross-album kNN is exact (faiss IndexFlatIP, O(n^2 d) but BLAS-fast:
# ~2e11 flops at 20k). Beyond it, candidates come from an inverted-file index (IndexIVFFlat) with
# nlist ~ 2 sqrt(n) cells and NPROBE probed cells, built on a PCA projection to PCA_DIM dims:
# each query scans ~NPROBE n / nlist vectors, so the cost is ~n^1.5 * PCA_DIM instead of n^2 d.
# A person's centroids are far closer to each other than to other people's, so they fall in the
# same or neighbouring cells. Candidate similarities are then recomputed exactly on the full
# vectors, so the approximation can only miss a pair (recall), never invent one (precision).
FLAT_MAX = 20_000
NPROBE = 8
PCA_DIM = 128
# Neighbours per centroid (itself included). A person seen in more albums than this is still
# connected because union-find chains their mutual neighbours.
KNN_K = 16


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {x.shape}")
    return l2_normalize(x)


def centroid(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Unit vector along the (weighted) mean of the rows of ``x``."""
    m = x.mean(axis=0) if weights is None else (weights[:, None] * x).sum(axis=0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def _quality_weights(quality: np.ndarray) -> np.ndarray:
    # Sharper, larger faces define where a person's centre lies; a floor keeps every member
    # counting.
    return np.clip(np.asarray(quality, dtype=np.float32), 0.05, 1.0)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered 0..k-1 in order of first appearance; -1 stays -1."""
    out = np.full(len(labels), -1, dtype=np.int64)
    mapping: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        if lab >= 0:
            out[i] = mapping.setdefault(lab, len(mapping))
    return out


def rerank_distances(x: np.ndarray, k: int, k2: int = 2, lam: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranked distances (Zhong et al., CVPR 2017) between the unit rows of
    ``x``, on the Euclidean scale of unit vectors (0..2).

    Each face's k-reciprocal neighbours (j is among i's k nearest and i among j's) are expanded
    by the half-size reciprocal sets of its members that overlap them by >= 2/3, weighted by
    ``exp(-d)``, averaged over the ``k2`` nearest faces (local query expansion); the Jaccard
    distance between those weight vectors is blended with the original distance
    (``lam`` x original). Two faces that share many reciprocal neighbours come closer; a face
    whose neighbours do not return the favour moves away. Symmetric, zero diagonal."""
    n = len(x)
    d = np.sqrt(np.clip(2.0 - 2.0 * (x @ x.T).astype(np.float64), 0.0, 4.0))
    np.fill_diagonal(d, 0.0)
    if n < 3:
        return d
    k = max(2, min(k, n - 1))
    order = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i: int, kk: int) -> np.ndarray:
        fwd = order[i, : kk + 1]
        back = order[fwd, : kk + 1]
        return fwd[(back == i).any(axis=1)]

    v = np.zeros((n, n), np.float64)
    half = max(1, round(k / 2))
    for i in range(n):
        r = reciprocal(i, k)
        expanded = set(r.tolist())
        for j in r.tolist():
            rj = reciprocal(j, half)
            if len(np.intersect1d(rj, r)) > 2.0 / 3.0 * len(rj):
                expanded.update(rj.tolist())
        idx = np.fromiter(expanded, dtype=np.int64)
        wgt = np.exp(-d[i, idx])
        v[i, idx] = wgt / wgt.sum()
    if k2 > 1:
        v = v[order[:, :k2]].mean(axis=1)
    mins = np.minimum(v[:, None, :], v[None, :, :]).sum(axis=2)
    maxs = np.maximum(v[:, None, :], v[None, :, :]).sum(axis=2)
    jac = 1.0 - mins / np.maximum(maxs, 1e-12)
    out = (1.0 - lam) * 2.0 * jac + lam * d  # Jaccard scaled to the 0..2 range of d
    out = (out + out.T) / 2.0
    np.fill_diagonal(out, 0.0)
    return out


def euclidean_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances of the rows of ``x`` (float64) from one Gram product:
    symmetric, zero diagonal. Within ~5e-15 of scipy's cdist and ~5x faster (a 2,200-face
    album: 0.23 vs 1.07 s); HDBSCAN's labels were identical on every album tried (100 LFW and
    synthetic albums, five of ~2,200 faces).

    The product's two triangles are summed tile by tile, in place, and the squared norms added
    a block of rows at a time: the same operations on the same values as ``g + g.T`` and
    ``sq_i + sq_j - s_ij`` over whole matrices (bit for bit), without the transposed pass over
    the whole matrix (it read memory out of order: 0.05 s of 0.16 at 2,324 faces) and with
    one n x n buffer instead of two (fresh pages cost most in a new Ray worker). 2,324 faces:
    0.16 -> 0.10 s."""
    g = x @ x.T
    n = len(g)
    for i in range(0, n, _SYM_TILE):  # g <- g + g.T (exactly symmetric: a + b == b + a)
        for j in range(i, n, _SYM_TILE):
            tile = np.add(
                g[i : i + _SYM_TILE, j : j + _SYM_TILE], g[j : j + _SYM_TILE, i : i + _SYM_TILE].T
            )
            g[i : i + _SYM_TILE, j : j + _SYM_TILE] = tile
            g[j : j + _SYM_TILE, i : i + _SYM_TILE] = tile.T
    sq = np.diag(g) / 2.0  # 2 g_ii / 2: the exact squared norms
    # d2 = sq_i + sq_j - s_ij, as before (s_ij = g_ij + g_ji, doubling and halving are exact).
    for i in range(0, n, _ROW_BLOCK):
        rows = g[i : i + _ROW_BLOCK]
        np.subtract(np.add(sq[i : i + _ROW_BLOCK, None], sq[None, :]), rows, out=rows)
    np.maximum(g, 0.0, out=g)
    np.fill_diagonal(g, 0.0)
    return np.sqrt(g, out=g)


# Tile side of euclidean_matrix's in-place g + g.T (two 128 x 128 float64 tiles fit in L2),
# and rows per block of its norm sums.
_SYM_TILE = 128
_ROW_BLOCK = 256


# Largest album clustered from an exact distance matrix (n^2 float64: 512 MB at 8,192; the
# process peaked at 1.2 GB on 8,000 faces). Beyond it the hdbscan package's tree, whose
# pruning fails in 512 dimensions: synthetic albums of 5,000 / 7,000 / 8,000 / 16,000 faces took
# 18 / 34 / 44 / 193 s there against 1.8 / 3.4 / 4.8 s here, with the same labels (docs/SCALING.md,
# "Fifty-fourth session"). 4,096 until then.
PRECOMPUTED_MAX = 8192


def _hdbscan(x: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    mcs = max(2, settings.min_cluster_size)
    ms = max(1, settings.min_samples)
    if settings.rerank_k > 0 or len(x) <= PRECOMPUTED_MAX:
        # On unit vectors Euclidean is monotone in cosine (module docstring). A KD-tree does not
        # prune in 512 dimensions: the exact distance matrix gives the same tree about 4x
        # faster for album-sized inputs. Its HDBSCAN is faceloop.hdbscan_precomputed: the hdbscan
        # package's labels without its scikit-learn import (~0.85 s of every process).
        from faceloop.hdbscan_precomputed import hdbscan_labels

        data = (
            rerank_distances(x, settings.rerank_k)
            if settings.rerank_k > 0
            else euclidean_matrix(x.astype(np.float64))
        )
        return hdbscan_labels(data, mcs, ms, symmetric=True)
    import hdbscan  # heavy import (scikit-learn); only for albums past PRECOMPUTED_MAX

    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=mcs, min_samples=ms, metric="euclidean", cluster_selection_method="eom"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn deprecation chatter inside hdbscan
        return np.asarray(clusterer.fit_predict(x.astype(np.float64)), dtype=np.int64)


def _mutual_nearest(sims: np.ndarray) -> list[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a < b``, that are each other's most similar row of ``sims`` (a square
    similarity matrix whose diagonal is -inf), in order of ``a``."""
    best = sims.argmax(axis=1)
    return [(a, int(best[a])) for a in range(len(sims)) if a < best[a] and best[best[a]] == a]


def repair_splits(
    x: np.ndarray, w: np.ndarray, labels: np.ndarray, threshold: float, floor: float = 0.0
) -> np.ndarray:
    """Within-album split repair: clusters A and B become one when each is the other's most
    similar cluster and their (quality-weighted) centroids have cosine >= ``threshold``, or,
    when ``0 < floor < threshold``, cosine >= ``floor`` and some face of A meets some face of B
    at cosine >= ``threshold`` (direct evidence that the centroids alone fall short of: a
    person's few poor shots pull their part's centroid away). Repeated until no such pair is
    left (a merged cluster gets a new centroid). Deterministic."""
    labels = labels.copy()
    lower = floor if 0 < floor < threshold else threshold
    while True:
        ids = sorted(set(labels[labels >= 0].tolist()))
        if len(ids) < 2:
            return labels
        cents = np.stack([centroid(x[labels == i], w[labels == i]) for i in ids])
        sims = cents @ cents.T
        np.fill_diagonal(sims, -np.inf)
        pairs = []
        for a, b in _mutual_nearest(sims):
            if sims[a, b] < lower:
                continue
            if sims[a, b] < threshold:
                cross = x[labels == ids[a]] @ x[labels == ids[b]].T
                if float(cross.max()) < threshold:
                    continue
            pairs.append((float(sims[a, b]), a, b))
        if not pairs:
            return labels
        for _, a, b in sorted(pairs, reverse=True):
            labels[labels == ids[b]] = ids[a]


def _two_means(x: np.ndarray, w: np.ndarray, iters: int = 10) -> np.ndarray:
    """Boolean split of the rows into two groups by spherical 2-means (deterministic init)."""
    c = centroid(x, w)
    a = int(np.argmin(x @ c))  # the member least like the whole
    b = int(np.argmin(x @ x[a]))  # and the member least like that one
    ca, cb = x[a], x[b]
    side = np.zeros(len(x), dtype=bool)
    for _ in range(iters):
        new = (x @ cb) > (x @ ca)
        if new.all() or not new.any():
            break
        if np.array_equal(new, side):
            side = new
            break
        side = new
        ca, cb = centroid(x[~side], w[~side]), centroid(x[side], w[side])
    return side


def _split_mixed(
    x: np.ndarray, w: np.ndarray, labels: np.ndarray, th: PolicyThresholds, min_size: int
) -> np.ndarray:
    """Split clusters that hold two people: a cluster is split in two when its 2-means halves
    each have >= ``min_size`` faces and their centroids are less similar than ``th.merge``
    (they would not be merged across albums either). Applied recursively to the halves."""
    labels = labels.copy()
    next_id = int(labels.max(initial=-1)) + 1
    queue = sorted(set(labels[labels >= 0].tolist()))
    splits = 0
    while queue:
        lab = queue.pop()
        idx = np.nonzero(labels == lab)[0]
        if len(idx) < max(4, 2 * min_size):
            continue
        side = _two_means(x[idx], w[idx])
        if side.sum() < min_size or (~side).sum() < min_size:
            continue
        sim = float(centroid(x[idx[side]], w[idx[side]]) @ centroid(x[idx[~side]], w[idx[~side]]))
        if sim >= th.merge:
            continue
        labels[idx[side]] = next_id
        queue += [lab, next_id]
        next_id += 1
        splits += 1
    if splits:
        log.info(
            "album clustering: split %d mixed cluster(s) (halves' centroid cosine < %.2f)",
            splits,
            th.merge,
        )
    return labels


def _evict_outliers(
    x: np.ndarray, w: np.ndarray, labels: np.ndarray, th: PolicyThresholds, min_size: int
) -> np.ndarray:
    """Members whose cosine to their cluster's centroid *without themselves* is below
    ``th.outlier`` become noise; clusters left smaller than ``min_size`` dissolve into noise."""
    labels = labels.copy()
    for lab in sorted(set(labels[labels >= 0].tolist())):
        idx = np.nonzero(labels == lab)[0]
        total = (w[idx, None] * x[idx]).sum(axis=0)
        loo = total[None, :] - w[idx, None] * x[idx]  # leave-one-out sums
        sims = np.einsum("ij,ij->i", x[idx], loo) / np.maximum(np.linalg.norm(loo, axis=1), 1e-12)
        labels[idx[sims < th.outlier]] = -1
        if (labels == lab).sum() < min_size:
            labels[labels == lab] = -1
    return labels


def _attach_noise(
    x: np.ndarray, w: np.ndarray, labels: np.ndarray, th: PolicyThresholds
) -> np.ndarray:
    """Each noise face joins the cluster with the most similar centroid if that cosine >= attach.
    Centroids are computed once, before any attach, so the result does not depend on order."""
    labels = labels.copy()
    noise = np.nonzero(labels < 0)[0]
    ids = sorted(set(labels[labels >= 0].tolist()))
    if len(noise) == 0 or not ids:
        return labels
    cents = np.stack([centroid(x[labels == i], w[labels == i]) for i in ids])
    sims = x[noise] @ cents.T
    best = sims.argmax(axis=1)
    ok = sims[np.arange(len(noise)), best] >= th.attach
    labels[noise[ok]] = np.asarray(ids)[best[ok]]
    return labels


def _group_noise(
    x: np.ndarray, labels: np.ndarray, th: PolicyThresholds, min_size: int
) -> np.ndarray:
    """Faces still noise are grouped by average linkage on cosine, cut at ``th.attach``; groups
    of >= ``min_size`` become clusters. This catches what HDBSCAN cannot express: an album of a
    single person (HDBSCAN needs two clusters to compare), and albums of 2-3 faces."""
    labels = labels.copy()
    noise = np.nonzero(labels < 0)[0]
    if len(noise) < max(2, min_size):
        return labels
    # SciPy's average linkage and flat clusters, without importing SciPy (faceloop.linkage).
    groups = average_linkage_groups(x[noise], 1.0 - th.attach)
    next_id = int(labels.max(initial=-1)) + 1
    for g in sorted(set(groups.tolist())):
        members = noise[groups == g]
        if len(members) >= min_size:
            labels[members] = next_id
            next_id += 1
    return labels


def _pair_noise(x: np.ndarray, labels: np.ndarray, floor: float) -> np.ndarray:
    """Two faces still noise that are each other's most similar noise face at cosine >=
    ``floor`` become a cluster of two (``floor`` <= 0: off). Average linkage at ``attach`` needs
    every member that close; a person seen twice in an album, in two poor shots, is often a
    little further apart, and still nearer to each other than to any other leftover face."""
    if floor <= 0:
        return labels
    noise = np.nonzero(labels < 0)[0]
    if len(noise) < 2:
        return labels
    labels = labels.copy()
    sims = x[noise] @ x[noise].T
    np.fill_diagonal(sims, -np.inf)
    next_id = int(labels.max(initial=-1)) + 1
    for i, j in _mutual_nearest(sims):
        if sims[i, j] >= floor:
            labels[noise[[i, j]]] = next_id
            next_id += 1
    return labels


def _drop_unanchored(labels: np.ndarray, q: np.ndarray, anchor_quality: float) -> np.ndarray:
    """Clusters none of whose faces reaches ``anchor_quality`` become noise. A face too poor to
    stand alone may join a cluster that a good face anchors, but a cluster of poor faces only
    (tiny, blurred, heavily compressed crops) can just as well be strangers who look alike
    at that resolution."""
    if anchor_quality <= 0:
        return labels
    labels = labels.copy()
    for lab in sorted(set(labels[labels >= 0].tolist())):
        m = labels == lab
        if float(q[m].max()) < anchor_quality:
            labels[m] = -1
    return labels


def cluster_album(
    emb: np.ndarray, quality: np.ndarray, settings: ClusterSettings, th: PolicyThresholds
) -> np.ndarray:
    """Local cluster labels (0..k-1, -1 = noise) for the faces of one album.

    Steps: HDBSCAN (Euclidean on unit vectors, ``settings.min_cluster_size`` /
    ``min_samples``) for albums of >= 4 faces; clusters whose 2-means halves are less similar
    than ``th.merge`` are split (two people merged); members below ``th.outlier`` to their
    centroid are evicted; noise faces attach to the nearest centroid at cosine >= ``th.attach``;
    remaining noise is grouped by average linkage at ``th.attach``; two faces still noise that
    are each other's nearest at >= ``pair_floor`` become a pair (when clusters of two are
    allowed); mutual-nearest clusters are joined by split repair (centroids at >= ``repair``, or
    at >= ``repair_floor`` with a face pair at ``repair``); clusters without a face of quality
    >= ``settings.anchor_quality`` become noise again. ``pair_floor``, ``repair`` and
    ``repair_floor`` are the policy's unless ``settings`` sets them. Centroids are
    quality-weighted.
    Promises: same length as ``emb``; deterministic; no cluster smaller than ``max(2,
    min_cluster_size)``; ids numbered by first appearance. Empty and 1-face albums give all
    noise (an empty array for 0 faces).
    """
    x = normalize(np.asarray(emb).reshape(len(emb), -1) if len(emb) else np.zeros((0, 1)))
    q = np.asarray(quality, dtype=np.float32)
    if len(q) != len(x):
        raise ValueError(f"quality has {len(q)} rows, embeddings {len(x)}")
    n = len(x)
    min_size = max(2, settings.min_cluster_size)
    if n < min_size:
        return np.full(n, -1, dtype=np.int64)
    w = _quality_weights(q)
    labels = _hdbscan(x, settings) if n >= max(4, min_size + 1) else np.full(n, -1, np.int64)
    labels = _split_mixed(x, w, labels, th, min_size)
    labels = _evict_outliers(x, w, labels, th, min_size)
    labels = _attach_noise(x, w, labels, th)
    labels = _group_noise(x, labels, th, min_size)
    if min_size <= 2:
        pair_floor = th.pair_floor if settings.pair_floor is None else settings.pair_floor
        labels = _pair_noise(x, labels, pair_floor)
    repair = th.repair if settings.repair is None else settings.repair
    if repair > 0:
        floor = th.repair_floor if settings.repair_floor is None else settings.repair_floor
        labels = repair_splits(x, w, labels, repair, floor)
    labels = _drop_unanchored(labels, q, settings.anchor_quality)
    labels = _relabel(labels)
    log.debug(
        "album clustering: %d faces -> %d clusters, %d noise",
        n,
        int(labels.max(initial=-1)) + 1,
        int((labels < 0).sum()),
    )
    return labels


def attach_to_identities(
    x: np.ndarray, cents: np.ndarray, threshold: float, margin: float
) -> np.ndarray:
    """For each unit row of ``x`` (faces no album cluster took), the row of ``cents`` (identity
    centroids) it joins, or -1: the most similar centroid, if its cosine is >= ``threshold``
    and exceeds the second most similar by >= ``margin``."""
    out = np.full(len(x), -1, np.int64)
    if len(x) == 0 or len(cents) == 0:
        return out
    sims = normalize(x) @ normalize(cents).T
    order = np.argsort(-sims, axis=1, kind="stable")
    best = sims[np.arange(len(x)), order[:, 0]]
    second = sims[np.arange(len(x)), order[:, 1]] if sims.shape[1] > 1 else np.full(len(x), -1.0)
    ok = (best >= threshold) & (best - second >= margin)
    out[ok] = order[ok, 0]
    return out


def album_centroids(
    emb: np.ndarray, labels: np.ndarray, quality: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids (k, d) unit float32, counts (k,))`` for clusters 0..k-1 of one album,
    quality-weighted like :func:`cluster_album`."""
    x = normalize(emb) if len(emb) else np.zeros((0, 1), np.float32)
    labels = np.asarray(labels)
    k = int(labels.max(initial=-1)) + 1
    w = _quality_weights(quality)
    cents = np.zeros((k, x.shape[1]), np.float32)
    counts = np.zeros(k, np.int64)
    for lab in range(k):
        m = labels == lab
        counts[lab] = int(m.sum())
        if counts[lab]:
            cents[lab] = centroid(x[m], w[m])
    return cents, counts


# ---------------------------------------------------------------- the merge's 1:N threshold

# Cosines between the clusters of one album are binned in IMPOSTOR_BINS bins over [-1, 1].
IMPOSTOR_BINS = 2000
# The impostor tail is read at these upper quantiles and extrapolated beyond the second, linear
# in log10 of the share (an exponential tail: heavier than a Gaussian one, so the estimate errs
# towards a higher threshold). Reading it needs TAIL_MIN_PAIRS pairs (30 above the 1e-3
# quantile); with fewer the store is too small to say, and thresholds.merge stands.
TAIL_P = (1e-2, 1e-3)
TAIL_MIN_PAIRS = 30_000


def within_album_histogram(centroids: np.ndarray, albums: Sequence[str]) -> np.ndarray:
    """Counts (IMPOSTOR_BINS) of the cosines between every two different clusters of one album,
    over all albums. The per-album clustering keeps two clusters of one album apart only when
    it judged them two people, so these pairs are the store's own impostor sample (relatives
    and look-alikes who share albums included)."""
    hist = np.zeros(IMPOSTOR_BINS, np.int64)
    if len(centroids) < 2:
        return hist
    x = normalize(centroids)
    a = np.asarray(albums, dtype=object)
    if len(a) != len(x):
        raise ValueError(f"centroids {len(x)}, albums {len(a)}: lengths differ")
    order = np.argsort(a, kind="stable")
    sa = a[order]
    cuts = np.flatnonzero(sa[1:] != sa[:-1]) + 1
    for rows in np.split(order, cuts):
        if len(rows) < 2:
            continue
        s = x[rows] @ x[rows].T
        vals = s[np.triu_indices(len(rows), 1)]
        b = np.clip(((vals + 1.0) * (IMPOSTOR_BINS / 2)).astype(np.int64), 0, IMPOSTOR_BINS - 1)
        hist += np.bincount(b, minlength=IMPOSTOR_BINS)
    return hist


def upper_quantile(hist: np.ndarray, share: float) -> float:
    """The cosine that ``share`` of the histogram's pairs lie above (linear within a bin)."""
    total = float(hist.sum())
    if total <= 0:
        raise ValueError("empty histogram")
    width = 2.0 / len(hist)
    above = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]]).astype(np.float64)  # >= bin i
    want = share * total
    i = int(np.flatnonzero(above[:-1] >= want)[-1]) if above[0] >= want else 0
    inside = (want - above[i + 1]) / max(float(hist[i]), 1.0)
    return -1.0 + width * (i + 1) - width * min(max(inside, 0.0), 1.0)


def gallery_merge_threshold(
    floor: float, hist: np.ndarray, n_units: int, fpir: float | None
) -> float:
    """The cross-album merge threshold for a store of ``n_units`` clusters: ``floor``
    (thresholds.merge) or, if higher, the impostor cosine that one cluster in ``1 / fpir``
    would clear against some other cluster of the store (per pair: ``fpir / (n_units - 1)``),
    the impostor tail read from ``hist`` (:func:`within_album_histogram`).

    ``floor`` when ``fpir`` is None or the histogram holds fewer than TAIL_MIN_PAIRS pairs.
    Deterministic (rounded to 1e-4), monotone: never below ``floor``, higher for a larger
    store or a smaller ``fpir``."""
    if fpir is None or n_units < 2 or int(hist.sum()) < TAIL_MIN_PAIRS:
        return floor
    p = fpir / (n_units - 1)
    lo, hi = TAIL_P
    q_lo, q_hi = upper_quantile(hist, lo), upper_quantile(hist, hi)
    if p >= hi:
        t = upper_quantile(hist, min(p, 1.0))
    else:
        t = q_hi + max(q_hi - q_lo, 0.0) / np.log10(lo / hi) * np.log10(hi / p)
    return max(floor, round(float(t), 4))


# ---------------------------------------------------------------- cross-album merge


def knn_index_kind(n: int) -> str:
    """Which faiss index :func:`merge_clusters` uses for ``n`` centroids: "flat" or "ivf"."""
    return "flat" if n <= FLAT_MAX else "ivf"


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product kNN of every row of ``x`` among all rows (itself included)."""
    import faiss

    n, d = x.shape
    k = min(k, n)
    if knn_index_kind(n) == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index.search(x, k)
    nlist = int(2 * np.sqrt(n))
    # faiss wants >= 39 points per cell to train; more buys little. Fixed seeds: deterministic.
    rng = np.random.default_rng(0)
    train_rows = np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))
    step = 65536  # bounded temporary buffers
    if d > PCA_DIM:
        pca = faiss.PCAMatrix(d, PCA_DIM)
        pca.train(x[train_rows])
        xr = np.empty((n, PCA_DIM), np.float32)
        for lo in range(0, n, step):
            xr[lo : lo + step] = pca.apply(x[lo : lo + step])
        faiss.normalize_L2(xr)
    else:
        xr = x
    dr = xr.shape[1]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dr), dr, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = 1234
    ivf.train(xr[train_rows])
    ivf.add(xr)
    ivf.nprobe = NPROBE
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for lo in range(0, n, step):
        _, ids[lo : lo + step] = ivf.search(xr[lo : lo + step], k)
    # Exact cosine on the full vectors for every candidate (small blocks: the gathered
    # neighbours take block * k * d * 4 bytes).
    block = 2048
    for lo in range(0, n, block):
        nb = ids[lo : lo + block]
        sims[lo : lo + block] = np.einsum("id,ikd->ik", x[lo : lo + block], x[np.maximum(nb, 0)])
    sims[ids < 0] = -np.inf
    return sims, ids


# Two album photos are one capture (one file re-saved, exported to another format, its metadata
# edited by a photo app) when every face of one lies where a face of the other lies: the box
# and the five landmarks within CAPTURE_PX pixels, or CAPTURE_SHARE of the face's height when
# that is more, and the faces' embeddings at cosine >= CAPTURE_COSINE. The decision rests on
# geometry: the detector finds a face at the same pixels only in the same pixels, and another
# shot of a person, however alike, moves some landmark by more. The cosine floor is a sanity
# check far below a copy's 0.97-1.0, so that a re-embed (which moves cosines by ~0.01) cannot
# flip it (docs/QUALITY.md, "Copies of one capture").
CAPTURE_PX = 2.0
CAPTURE_SHARE = 0.02
CAPTURE_COSINE = 0.9
# Faces each face is compared with, the nearest in coordinate order (capture_copies).
CAPTURE_NEIGHBOURS = 8
CAPTURE_GRAM = 512


def capture_copies(
    photo: Sequence[str | None],
    first_seen: Sequence[str | None],
    geometry: np.ndarray,
    emb: np.ndarray,
    has_emb: np.ndarray,
) -> dict[int, int]:
    """Faces of album photos that are copies of one capture (see CAPTURE_PX): face row -> the
    row of the same face in the photo kept, the one first seen (smallest ``first_seen``, e.g.
    the run that detected it; then the smallest ``photo``). ``photo``: each face's photo key
    (its content hash); ``geometry``: (n, 14) float, box x1 y1 x2 y2 then five landmarks (x, y),
    NaN where unknown (such faces match nothing). A photo is a copy only when all its faces and
    all the other photo's faces pair up. Deterministic; no I/O."""
    n = len(photo)
    g = np.asarray(geometry, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, 14))
    if n < 2 or g.shape[1] < 4:
        return {}
    known = ~np.isnan(g).any(axis=1)
    h = np.where(known, g[:, 3] - g[:, 1], 0.0)
    tol = np.maximum(CAPTURE_PX, CAPTURE_SHARE * np.abs(h))
    idx = np.flatnonzero(known)
    if len(idx) < 2:
        return {}
    # Candidates: each face against the next CAPTURE_NEIGHBOURS faces in the order of its
    # coordinates (a copy's face lies at the same pixels: next to it in that order). Bounded:
    # faces sharing one geometry (a fixed camera, a synthetic store) cost n x k, not n^2.
    order = idx[np.lexsort(g[idx].T[::-1])]
    n_known = len(order)
    k = min(CAPTURE_NEIGHBOURS, n_known - 1)
    a_pos = np.repeat(np.arange(n_known), k)
    b_pos = a_pos + np.tile(np.arange(1, k + 1), n_known)
    inside = b_pos < n_known
    a_pos, b_pos = a_pos[inside], b_pos[inside]
    a, b = order[a_pos], order[b_pos]
    pa_ = np.asarray(photo, dtype=object)
    near = (np.abs(g[a] - g[b]) <= np.maximum(tol[a], tol[b])[:, None]).all(axis=1)
    near &= pa_[a] != pa_[b]
    if not near.any():
        return {}
    a, b = a[near], b[near]
    # Each face normalised once (normalising the pairs' gathered rows cost ~4 ms for a 200-face
    # album of one geometry: as much as reading the album); then, for an album of up to
    # CAPTURE_GRAM faces, one matrix product (0.3 ms at 200 faces) rather than gathering both
    # faces of every pair (0.8 ms); a larger album's pairs one by one (the product grows as n^2).
    x = l2_normalize(emb)
    cos = (x @ x.T)[a, b] if n <= CAPTURE_GRAM else np.einsum("ij,ij->i", x[a], x[b])
    both = np.asarray(has_emb, dtype=bool)
    ok = ~(both[a] & both[b]) | (cos >= CAPTURE_COSINE)
    if not ok.any():  # faces at one place, but other faces (a fixed camera): no copy
        return {}
    faces_of: dict[str, list[int]] = {}
    for i in range(n):
        if photo[i] is not None:
            faces_of.setdefault(str(photo[i]), []).append(i)
    pairs: dict[tuple[str, str], dict[int, int]] = {}
    for i, j in zip(a[ok].tolist(), b[ok].tolist(), strict=True):
        p, q = str(photo[i]), str(photo[j])
        if p > q:
            p, q, i, j = q, p, j, i
        pairs.setdefault((p, q), {}).setdefault(i, j)
    parent: dict[str, str] = {}

    def find(p: str) -> str:
        while parent.get(p, p) != p:
            p = parent[p]
        return p

    def rank(p: str) -> tuple[str, str]:
        return (min(str(first_seen[i] or "") for i in faces_of[p]), p)

    match: dict[tuple[str, str], dict[int, int]] = {}
    for (p, q), m in sorted(pairs.items()):
        fp, fq = faces_of[p], faces_of[q]
        # Every face of each photo in one pair, each used once: the same faces, one capture.
        if len(fp) != len(fq) or len(m) != len(fp) or len(set(m.values())) != len(fq):
            continue
        match[(p, q)] = m
        match[(q, p)] = {j: i for i, j in m.items()}
        rp, rq = find(p), find(q)
        if rp != rq:
            keep, drop = sorted((rp, rq), key=rank)
            parent[drop] = keep
    links: dict[str, list[str]] = {}
    for p, q in sorted(match):
        links.setdefault(p, []).append(q)
    out: dict[int, int] = {}
    for p in sorted(faces_of):
        root = find(p)
        if root == p:
            continue
        # The face map to the photo kept, composed along the shortest chain of copies.
        way: dict[str, dict[int, int]] = {p: {i: i for i in faces_of[p]}}
        todo = [p]
        while root not in way:
            nxt = []
            for u in todo:
                for v in links.get(u, []):
                    if v not in way:
                        way[v] = {i: match[(u, v)][j] for i, j in way[u].items()}
                        nxt.append(v)
            todo = nxt
        m = way[root]
        out.update(m)
    return out


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:  # path compression
            p[a], a = root, p[a]
        return root


def merge_clusters(
    centroids: np.ndarray, counts: Sequence[int] | np.ndarray, keys: Sequence[str], threshold: float
) -> np.ndarray:
    """Component id (0..C-1) per per-album cluster centroid: clusters of one person across albums
    share a component.

    Rule (guards against single-linkage chaining): candidate pairs are each centroid's
    ``KNN_K`` nearest neighbours with cosine >= ``threshold``. Pairs are taken from most to least
    similar; a pair joins two components only if the components' count-weighted mean
    embeddings (centroid linkage: ``sum(count_i * centroid_i)``) also have cosine >=
    ``threshold``. A bridge cluster B between persons P and Q therefore joins one of them, and
    that merged component's mean stays far from the other person, so P and Q stay apart.

    Promises: deterministic and independent of input order for exact kNN (ties broken by
    ``keys``; component ids numbered by each component's smallest key); near-linear cost
    (exact kNN up to ``FLAT_MAX`` centroids, IVF beyond: see module constants); memory ~
    2x the centroid array plus n x KNN_K neighbours.
    """
    x = normalize(centroids) if len(centroids) else np.zeros((0, 1), np.float32)
    n = len(x)
    c = np.asarray(counts, dtype=np.float32)
    if len(c) != n or len(keys) != n:
        raise ValueError(f"centroids {n}, counts {len(c)}, keys {len(keys)}: lengths differ")
    if len(set(keys)) != n:
        raise ValueError("keys must be unique")
    if n == 0:
        return np.zeros(0, np.int64)
    x = np.ascontiguousarray(x)
    rank = np.empty(n, np.int64)
    rank[np.argsort(np.asarray(keys, dtype=object), kind="stable")] = np.arange(n)

    sims, nbrs = knn(x, KNN_K)
    rows = np.repeat(np.arange(n), sims.shape[1])
    sims, nbrs = sims.ravel(), nbrs.ravel()
    keep = (nbrs >= 0) & (nbrs != rows) & (sims >= threshold)
    a, b, s = rows[keep], nbrs[keep], sims[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    # Each undirected pair once; order: most similar first, then by the keys (input-order free).
    # Similarities are rounded so float noise between index layouts cannot reorder near-ties.
    s_round = np.round(s.astype(np.float64), 6)
    rlo, rhi = np.minimum(rank[lo], rank[hi]), np.maximum(rank[lo], rank[hi])
    order = np.lexsort((rhi, rlo, -s_round))
    pair = rlo[order] * n + rhi[order]
    _, first = np.unique(pair, return_index=True)
    order = order[np.sort(first)]
    lo, hi = lo[order].tolist(), hi[order].tolist()

    sums = x * c[:, None]  # float32: 4 bytes x d per centroid; float64 buys nothing here
    norms = np.linalg.norm(sums, axis=1)
    uf = _UnionFind(n)
    joined = blocked = 0
    for i, j in zip(lo, hi, strict=False):
        ri, rj = uf.find(i), uf.find(j)
        if ri == rj:
            continue
        sim = float(sums[ri] @ sums[rj]) / max(norms[ri] * norms[rj], 1e-12)
        if sim < threshold:
            blocked += 1
            continue
        if uf.size[ri] < uf.size[rj]:
            ri, rj = rj, ri
        uf.parent[rj] = ri
        uf.size[ri] += uf.size[rj]
        sums[ri] += sums[rj]
        norms[ri] = float(np.linalg.norm(sums[ri]))
        joined += 1
    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    # Number components by their smallest key.
    first_rank: dict[int, int] = {}
    for r, kr in zip(roots.tolist(), rank.tolist(), strict=False):
        if r not in first_rank or kr < first_rank[r]:
            first_rank[r] = kr
    ordered = sorted(first_rank, key=first_rank.__getitem__)
    comp_of = {r: k for k, r in enumerate(ordered)}
    out = np.fromiter((comp_of[r] for r in roots.tolist()), dtype=np.int64, count=n)
    log.info(
        "cross-album merge: %d clusters -> %d identities (%d joins, %d blocked by centroid "
        "linkage, index %s)",
        n,
        len(ordered),
        joined,
        blocked,
        knn_index_kind(n),
    )
    return out


# ---------------------------------------------------------------- stable ids


def new_identity_id(face_ids: Sequence[str]) -> str:
    """Deterministic id of a new identity: ``"id-" + sha1(smallest face_id)[:12]``."""
    return "id-" + hashlib.sha1(min(face_ids).encode()).hexdigest()[:12]


def assign_identity_ids(
    components: Sequence[int] | np.ndarray,
    member_face_ids: Sequence[Sequence[str]],
    previous_identity_ids: Mapping[str, str | None],
) -> list[str]:
    """Identity id for each component ``0..C-1`` (the returned list is indexed by component id).

    ``components[i]`` is the component of cluster i and ``member_face_ids[i]`` the faces of
    cluster i; ``previous_identity_ids`` maps face_id to the identity it had before (missing or
    None: new face).

    Promises: a component keeps the previous id held by most of its faces (tie: the
    lexicographically smallest id). Each previous id goes to at most one component: candidates
    (component, previous id) are granted in order of most faces holding it, then larger
    component, then smaller id, so when an identity splits, the larger part keeps it and the
    other part takes its next-best previous id or a new one. New ids are
    :func:`new_identity_id` of the component's faces (a numeric suffix if that id is taken).
    No two components get the same id. Deterministic.
    """
    comps = np.asarray(components, dtype=np.int64)
    if len(comps) != len(member_face_ids):
        raise ValueError("components and member_face_ids differ in length")
    votes = [
        Counter(p for p in (previous_identity_ids.get(f) for f in fids) if p)
        for fids in member_face_ids
    ]
    return assign_identity_ids_from_votes(
        comps,
        votes,
        [len(f) for f in member_face_ids],
        [min(f) if f else None for f in member_face_ids],
        {p for p in previous_identity_ids.values() if p},
    )


def assign_identity_ids_from_votes(
    components: Sequence[int] | np.ndarray,
    votes: Sequence[Mapping[str, int]],
    sizes: Sequence[int],
    min_face_ids: Sequence[str | None],
    reserved: Iterable[str],
) -> list[str]:
    """:func:`assign_identity_ids` on per-cluster summaries instead of face lists: cluster i has
    ``sizes[i]`` faces, the smallest face id ``min_face_ids[i]`` and ``votes[i]`` (previous
    identity id -> how many of its faces held it). ``reserved``: every previous identity id (a
    new identity never takes one). Same promises, same result."""
    comps = np.asarray(components, dtype=np.int64)
    if not (len(comps) == len(votes) == len(sizes) == len(min_face_ids)):
        raise ValueError("components, votes, sizes and min_face_ids differ in length")
    n_comp = int(comps.max(initial=-1)) + 1
    comp_votes: list[Counter[str]] = [Counter() for _ in range(n_comp)]
    comp_size = [0] * n_comp
    comp_min: list[str | None] = [None] * n_comp
    for comp, v, size, low in zip(comps.tolist(), votes, sizes, min_face_ids, strict=True):
        comp_votes[comp].update(v)
        comp_size[comp] += int(size)
        m = comp_min[comp]
        if low is not None and (m is None or low < m):
            comp_min[comp] = low
    mins: list[str] = []
    for k in range(n_comp):
        m = comp_min[k]
        if m is None or comp_size[k] == 0:
            raise ValueError(f"component {k} has no faces")
        mins.append(m)

    candidates: list[tuple[int, int, str, int]] = []  # (-votes, -size, prev_id, comp)
    for k in range(n_comp):
        candidates += [(-v, -comp_size[k], pid, k) for pid, v in comp_votes[k].items() if v]
    candidates.sort(key=lambda t: (t[0], t[1], t[2], mins[t[3]]))
    ids: list[str | None] = [None] * n_comp
    used: set[str] = set()
    for _, _, pid, k in candidates:
        if ids[k] is None and pid not in used:
            ids[k] = pid
            used.add(pid)
    # Ids a new identity must never take: anything granted now, and every previous id (reusing
    # a retired id would silently merge a new person into an old identity's history).
    taken = used | set(reserved)
    for k in sorted(range(n_comp), key=lambda k: mins[k]):
        if ids[k] is None:
            base = "id-" + hashlib.sha1(mins[k].encode()).hexdigest()[:12]
            cand, suffix = base, 1
            while cand in taken:
                cand, suffix = f"{base}-{suffix}", suffix + 1
            ids[k] = cand
            taken.add(cand)
    return [i for i in ids if i is not None]
