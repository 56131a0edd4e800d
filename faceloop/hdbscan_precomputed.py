"""HDBSCAN on a precomputed distance matrix, labels equal to the ``hdbscan`` package's.

``hdbscan_labels(d, m, s)`` returns what ``hdbscan.HDBSCAN(min_cluster_size=m, min_samples=s,
metric="precomputed", cluster_selection_method="eom").fit_predict(d)`` returns, computed the
same way step by step: mutual reachability, Prim's minimum spanning tree (the same scan order,
so ties pick the same edges), the single-linkage tree, the condensed tree, the clusters'
stability and the excess-of-mass selection (including the package's float32 sum of the
children's stabilities). tests/test_hdbscan_precomputed.py checks the labels against the
package on random albums with ties and duplicates.

Why not the package: ``import hdbscan`` imports scikit-learn, ~0.85 s of every process that
clusters (the refresh's label stage, each Ray worker of the label passes) for the few numpy
operations an album's clustering needs. The package stays the reference in the tests and the
clusterer of albums too large for an exact distance matrix (tasks/cluster.py).

Ported from hdbscan 0.8.44 (``hdbscan_.py``, ``_hdbscan_reachability.pyx``,
``_hdbscan_linkage.pyx``, ``_hdbscan_tree.pyx``): Copyright (c) 2015, Leland McInnes, John
Healy, Steve Astels; BSD 3-Clause licence. Redistribution and use in source and binary forms,
with or without modification, are permitted provided that the following conditions are met:
(1) redistributions of source code must retain the above copyright notice, this list of
conditions and the following disclaimer; (2) redistributions in binary form must reproduce
the above copyright notice, this list of conditions and the following disclaimer in the
documentation and/or other materials provided with the distribution; (3) neither the name of
the copyright holder nor the names of its contributors may be used to endorse or promote
products derived from this software without specific prior written permission. THIS SOFTWARE
IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS
FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY
THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
POSSIBILITY OF SUCH DAMAGE.
"""

from __future__ import annotations

import numpy as np

_DBL_MAX = float(np.finfo(np.float64).max)


def hdbscan_labels(
    distances: np.ndarray, min_cluster_size: int, min_samples: int, symmetric: bool = False
) -> np.ndarray:
    """Cluster labels (-1: noise) of the ``n x n`` float64 distance matrix ``distances`` (not
    modified), as the ``hdbscan`` package gives them (module docstring). ``symmetric``: the
    caller guarantees ``distances`` equals its transpose exactly (faceloop's own matrices
    are built so), which spares a transposed copy."""
    d = np.asarray(distances)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"a square distance matrix is needed, got shape {d.shape}")
    if d.dtype != np.float64:
        raise ValueError(f"distances must be float64, got {d.dtype}")
    if not np.isfinite(d).all():
        raise ValueError("distances must be finite")
    if min_cluster_size < 2 or min_samples < 1:
        raise ValueError("min_cluster_size must be >= 2 and min_samples >= 1")
    n = d.shape[0]
    if n < 2:
        raise ValueError("at least two points are needed")
    k = min(n - 1, min_samples)  # >= 1: n >= 2 and min_samples >= 1
    mst = _prim(_mutual_reachability(d, k, symmetric))
    mst = mst[np.argsort(mst.T[2]), :]
    tree = _condense(_single_linkage(mst), min_cluster_size)
    return _eom_labels(tree, _stability(tree))


def _mutual_reachability(d: np.ndarray, min_points: int, symmetric: bool = False) -> np.ndarray:
    # Each column's min_points-th smallest distance (the package partitions along axis 0): taken
    # from the rows of a transposed copy, which reads memory in order. The values are the same
    # (an exact selection either way), 3x faster at 4,096 faces. A symmetric matrix's columns
    # are its rows: a plain copy, which reads and writes in order (2,324 faces: 0.05 -> 0.01 s).
    by_row = d.copy() if symmetric else np.ascontiguousarray(d.T)
    if min_points == 1 and not np.diagonal(by_row).any() and float(by_row.min()) >= 0.0:
        # The second smallest of a row whose own entry is its zero minimum is the smallest of
        # the others: one pass of a row minimum instead of a selection, the same values (a
        # 2,200-face album: 55 -> 11 ms for this step). faceloop's matrices always qualify.
        np.fill_diagonal(by_row, np.inf)
        core = by_row.min(axis=1)
    else:
        by_row.partition(min_points, axis=1)
        core = by_row[:, min_points].copy()
    # The copy's buffer takes the result (a second n x n buffer was fresh pages to fault in).
    out = np.maximum(d, core, out=by_row)
    np.maximum(out, core[:, None], out=out)
    return out


def _prim(m: np.ndarray) -> np.ndarray:
    """Prim's tree from node 0: each step updates the distances from the last node added and
    takes the first node (lowest index) at the smallest distance, as the package's C loop.
    Nodes in the tree hold +inf, so the smallest entry is always a node outside it."""
    n = m.shape[0]
    out = np.zeros((n - 1, 3))
    outside = np.ones(n, dtype=bool)
    current = np.full(n, _DBL_MAX)
    source = np.zeros(n, dtype=np.intp)
    closer = np.empty(n, dtype=bool)
    node = 0
    for i in range(n - 1):
        outside[node] = False
        current[node] = np.inf
        row = m[node]
        np.less(row, current, out=closer)
        closer &= outside
        np.copyto(current, row, where=closer)
        np.copyto(source, node, where=closer)
        j = int(current.argmin())
        out[i, 0] = source[j]
        out[i, 1] = j
        out[i, 2] = current[j]
        node = j
    return out


def _root(up: list[int], x: int) -> int:
    """The root of ``x`` in the union-find forest ``up`` (a root is its own parent), with the
    path to it compressed."""
    r = x
    while up[r] != r:
        r = up[r]
    while up[x] != r:
        up[x], x = r, up[x]
    return r


def _single_linkage(mst: np.ndarray) -> np.ndarray:
    """The sorted tree's edges merged with a union-find: scipy's linkage format."""
    n_edges = mst.shape[0]
    n = n_edges + 1
    parent = list(range(2 * n - 1))
    size = [1] * n + [0] * (n - 1)
    out = np.zeros((n_edges, 4))
    nxt = n
    a_col = mst[:, 0].astype(np.intp).tolist()
    b_col = mst[:, 1].astype(np.intp).tolist()
    for i in range(n_edges):
        aa, bb = _root(parent, a_col[i]), _root(parent, b_col[i])
        out[i, 0] = aa
        out[i, 1] = bb
        out[i, 3] = size[aa] + size[bb]
        size[nxt] = size[aa] + size[bb]
        parent[aa] = nxt
        parent[bb] = nxt
        nxt += 1
    out[:, 2] = mst[:, 2]
    return out


_TREE_DTYPE = [
    ("parent", np.intp),
    ("child", np.intp),
    ("lambda_val", float),
    ("child_size", np.intp),
]


def _condense(hierarchy: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """The condensed tree: splits into two parts of >= ``min_cluster_size`` make new clusters,
    smaller parts fall out of their cluster point by point at the split's lambda."""
    root = 2 * hierarchy.shape[0]
    num_points = root // 2 + 1
    left_of = hierarchy[:, 0].astype(np.intp).tolist()
    right_of = hierarchy[:, 1].astype(np.intp).tolist()
    dist = hierarchy[:, 2].tolist()
    count = hierarchy[:, 3].astype(np.intp).tolist()

    def bfs(start: int) -> list[int]:
        out: list[int] = []
        todo = [start]
        while todo:
            out.extend(todo)
            nxt: list[int] = []
            for x in todo:
                if x >= num_points:
                    nxt.append(left_of[x - num_points])
                    nxt.append(right_of[x - num_points])
            todo = nxt
        return out

    relabel = [0] * (root + 1)
    relabel[root] = num_points
    next_label = num_points + 1
    ignore = [False] * (root + 1)
    rows: list[tuple[int, int, float, int]] = []
    for node in bfs(root):
        if ignore[node] or node < num_points:
            continue
        k = node - num_points
        left, right = left_of[k], right_of[k]
        lam = 1.0 / dist[k] if dist[k] > 0.0 else np.inf
        n_left = count[left - num_points] if left >= num_points else 1
        n_right = count[right - num_points] if right >= num_points else 1
        here = relabel[node]
        if n_left >= min_cluster_size and n_right >= min_cluster_size:
            relabel[left] = next_label
            rows.append((here, next_label, lam, n_left))
            relabel[right] = next_label + 1
            rows.append((here, next_label + 1, lam, n_right))
            next_label += 2
            continue
        if n_left >= min_cluster_size:
            relabel[left] = here
            falling = [right]
        elif n_right >= min_cluster_size:
            relabel[right] = here
            falling = [left]
        else:
            falling = [left, right]
        for part in falling:
            for sub in bfs(part):
                if sub < num_points:
                    rows.append((here, sub, lam, 1))
                ignore[sub] = True
    return np.array(rows, dtype=_TREE_DTYPE)


def _stability(tree: np.ndarray) -> dict[int, float]:
    """Each cluster's stability: the sum over its rows of (lambda - its birth lambda) x size,
    added in row order."""
    parents = tree["parent"]
    children = tree["child"]
    lambdas = tree["lambda_val"]
    smallest = int(parents.min())
    largest_child = max(int(children.max()), smallest)
    births = np.full(largest_child + 1, np.nan)
    np.fmin.at(births, children, lambdas)
    births[smallest] = 0.0
    sums = np.zeros(int(parents.max()) - smallest + 1)
    np.add.at(sums, parents - smallest, (lambdas - births[parents]) * tree["child_size"])
    return {smallest + i: float(s) for i, s in enumerate(sums.tolist())}


def _eom_labels(tree: np.ndarray, stability: dict[int, float]) -> np.ndarray:
    """Excess of mass: a cluster is kept unless its children's stabilities add up to more
    (summed in float32, as the package does); no single cluster; then every point takes the
    kept cluster it falls out of, or -1."""
    nodes = sorted(stability, reverse=True)[:-1]  # the root is never a cluster
    is_cluster = dict.fromkeys(nodes, True)
    cluster_rows = tree[tree["child_size"] > 1]
    kids: dict[int, list[int]] = {}
    for p, c in zip(cluster_rows["parent"].tolist(), cluster_rows["child"].tolist(), strict=True):
        kids.setdefault(p, []).append(c)
    for node in nodes:
        total = np.float32(0.0)
        for ch in kids.get(node, []):
            total = np.float32(float(total) + stability[ch])
        if float(total) > stability[node]:
            is_cluster[node] = False
            stability[node] = float(total)
        else:
            todo = [node]
            while todo:
                nxt: list[int] = []
                for x in todo:
                    if x != node:
                        is_cluster[x] = False
                    nxt.extend(kids.get(x, []))
                todo = nxt
    clusters = sorted(c for c, kept in is_cluster.items() if kept)
    number = {c: i for i, c in enumerate(clusters)}

    parents = tree["parent"].tolist()
    children = tree["child"].tolist()
    root = min(parents)
    size = max(parents) + 1
    up = list(range(size))
    rank = [0] * size
    kept = set(clusters)
    for p, c in zip(parents, children, strict=True):
        if c in kept:
            continue
        a, b = _root(up, p), _root(up, c)
        if rank[a] < rank[b]:
            up[a] = b
        elif rank[a] > rank[b]:
            up[b] = a
        else:
            up[b] = a
            rank[a] += 1
    labels = np.empty(root, dtype=np.int64)
    for i in range(root):
        c = _root(up, i)
        labels[i] = number[c] if c > root else -1
    return labels
