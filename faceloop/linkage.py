"""Average-linkage (UPGMA) flat clusters at a distance cut, as SciPy computes them, in numpy.

The label stage groups an album's leftover faces by average linkage cut at a cosine distance
(``tasks.cluster._group_noise``). SciPy's ``linkage`` + ``fcluster`` did that, and importing
``scipy.cluster.hierarchy`` costs ~0.2 s of CPU in every process that labels albums (each Ray
label worker, and the driver of a small refresh) for a computation on a few dozen to a few
hundred faces. :func:`average_linkage_groups` follows SciPy 1.17's own steps:

- ``linkage(method="average")``: the nearest-neighbour chain (``_hierarchy.nn_chain``): the
  chain starts at the first live cluster, each step moves to the nearest live cluster (the
  previous link of the chain kept on a tie, else the lowest index), two mutual nearest
  neighbours are merged into the higher slot, and the distances to the merged cluster are
  ``(n_x d_xi + n_y d_yi) / (n_x + n_y)`` (Lance-Williams), in the same order, in float64;
- the merges sorted by distance (stable), and numbered by union-find (``_hierarchy.label``);
- ``fcluster(criterion="distance")`` (``_hierarchy.cluster_monocrit``): flat clusters numbered
  1, 2, ... in the order its walk from the root meets them.

So the same groups with the same numbers (tests/test_linkage.py compares them with SciPy's on
random and clustered inputs). The cosine distances themselves are numpy's (a BLAS product),
which may differ from SciPy's ``pdist`` in the last bits: a merge exactly at the cut could fall
the other way, which no real face pair is.
"""

from __future__ import annotations

import numpy as np


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """(n, n) float64 cosine distances ``1 - cos`` of the rows of ``x``, clipped to [0, 2]."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1.0
    u = x / norms[:, None]
    d = 1.0 - u @ u.T
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def nn_chain_average(d: np.ndarray) -> np.ndarray:
    """SciPy's linkage matrix ``Z`` ((n - 1, 4): the two merged clusters' ids, the distance,
    the merged size) of average linkage on the square distance matrix ``d`` (n >= 2)."""
    n = d.shape[0]
    dist = np.array(d, dtype=np.float64, copy=True)
    np.fill_diagonal(dist, np.inf)
    size = np.ones(n, dtype=np.int64)
    dead = np.zeros(n, dtype=bool)
    merges = np.empty((n - 1, 4), dtype=np.float64)
    chain: list[int] = []
    for k in range(n - 1):
        if not chain:
            chain.append(int(np.argmin(dead)))  # the first live cluster
        while True:
            x = chain[-1]
            # Dropped clusters' rows and columns, and the diagonal, hold inf.
            y = int(np.argmin(dist[x]))  # the lowest index at the minimum
            current = dist[x, y]
            if len(chain) > 1:
                prev = chain[-2]
                if not current < dist[x, prev]:  # SciPy keeps the previous link on a tie
                    y, current = prev, dist[x, prev]
                if y == prev:
                    break
            chain.append(y)
        chain.pop()
        chain.pop()
        if x > y:
            x, y = y, x
        nx, ny = int(size[x]), int(size[y])
        merges[k] = (x, y, current, nx + ny)
        # Slot y holds the merged cluster; slot x is dropped.
        dead[x] = True
        size[x] = 0
        size[y] = nx + ny
        live = ~dead
        live[y] = False
        new = (nx * dist[live, x] + ny * dist[live, y]) / (nx + ny)
        dist[live, y] = new
        dist[y, live] = new
        dist[x, :] = np.inf
        dist[:, x] = np.inf
    merges = merges[np.argsort(merges[:, 2], kind="mergesort")]
    _label(merges, n)
    return merges


def _label(z: np.ndarray, n: int) -> None:
    """SciPy's ``_hierarchy.label``: the merges' slot numbers replaced, in place, by cluster ids
    (leaves 0..n-1, the merge of row i is n + i), the smaller id first. The merged sizes
    (column 3) are those :func:`nn_chain_average` recorded."""
    parent = np.arange(2 * n - 1)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = int(parent[root])
        while parent[a] != root:  # path compression
            parent[a], a = root, int(parent[a])
        return root

    for i in range(n - 1):
        xr, yr = find(int(z[i, 0])), find(int(z[i, 1]))
        z[i, 0], z[i, 1] = (xr, yr) if xr < yr else (yr, xr)
        parent[xr] = parent[yr] = n + i


def fcluster_distance(z: np.ndarray, t: float) -> np.ndarray:
    """SciPy's ``fcluster(z, t, criterion="distance")``: (n,) flat cluster numbers from 1, in
    the order SciPy's walk from the root meets them; a cluster is a node whose largest merge
    distance is <= ``t``."""
    n = z.shape[0] + 1
    max_dist = np.empty(n - 1)
    for i in range(n - 1):  # rows are sorted by distance: children come before parents
        a, b = int(z[i, 0]), int(z[i, 1])
        m = z[i, 2]
        if a >= n:
            m = max(m, max_dist[a - n])
        if b >= n:
            m = max(m, max_dist[b - n])
        max_dist[i] = m
    out = np.zeros(n, dtype=np.int64)
    visited = np.zeros(2 * n - 1, dtype=bool)
    stack = [2 * n - 2]
    leader = -1
    count = 0
    while stack:
        root = stack[-1] - n
        lc, rc = int(z[root, 0]), int(z[root, 1])
        if leader == -1 and max_dist[root] <= t:
            leader = root
            count += 1
        if lc >= n and not visited[lc]:
            visited[lc] = True
            stack.append(lc)
            continue
        if rc >= n and not visited[rc]:
            visited[rc] = True
            stack.append(rc)
            continue
        for leaf in (lc, rc):
            if leaf < n:
                if leader == -1:
                    count += 1
                out[leaf] = count
        if leader == root:
            leader = -1
        stack.pop()
    return out


def average_linkage_groups(x: np.ndarray, t: float) -> np.ndarray:
    """(n,) flat cluster numbers (from 1) of the rows of ``x`` by average linkage on cosine
    distance cut at ``t``: SciPy's ``fcluster(linkage(pdist(x, "cosine") clipped to [0, 2],
    "average"), t, "distance")``. One row is cluster 1."""
    n = len(x)
    if n < 2:
        return np.ones(n, dtype=np.int64)
    return fcluster_distance(nn_chain_average(cosine_distances(x)), t)
