"""faceloop.hdbscan_precomputed gives the hdbscan package's labels, ties and duplicates included."""

from __future__ import annotations

import warnings

import hdbscan
import numpy as np
import pytest

from faceloop.hdbscan_precomputed import hdbscan_labels
from tasks.cluster import euclidean_matrix, rerank_distances


def _package(d: np.ndarray, mcs: int, ms: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hdbscan.HDBSCAN(
            min_cluster_size=mcs, min_samples=ms, metric="precomputed"
        ).fit_predict(d.copy())


def _album(rng: np.random.Generator, n: int, dim: int, people: int, spread: float) -> np.ndarray:
    """Unit vectors around ``people`` centres, with some faces repeated exactly (a photo
    filed twice: zero distances, ties in the tree)."""
    centres = rng.standard_normal((people, dim))
    x = centres[rng.integers(0, people, n)] + spread * rng.standard_normal((n, dim))
    dup = rng.random(n) < 0.15
    if dup.any() and n > 1:
        x[dup] = x[rng.integers(0, n, int(dup.sum()))]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(40))
def test_labels_equal_the_packages(seed: int) -> None:
    rng = np.random.default_rng([7, seed])
    n = int(rng.integers(4, 400))
    x = _album(rng, n, int(rng.choice([8, 64, 512])), int(rng.integers(1, 30)), rng.uniform(0.2, 2))
    d = euclidean_matrix(x.astype(np.float64))
    for mcs, ms in ((2, 1), (3, 2), (5, 3), (int(rng.integers(2, 9)), int(rng.integers(1, 9)))):
        want = _package(d, mcs, ms)
        got = hdbscan_labels(d, mcs, ms)
        assert got.tolist() == want.tolist(), (n, mcs, ms)
        # euclidean_matrix's output is exactly symmetric: the copy-free path, same labels.
        assert hdbscan_labels(d, mcs, ms, symmetric=True).tolist() == want.tolist()
    assert np.array_equal(d, euclidean_matrix(x.astype(np.float64)))  # not modified


@pytest.mark.parametrize("seed", range(10))
def test_labels_equal_the_packages_on_reranked_distances(seed: int) -> None:
    rng = np.random.default_rng([11, seed])
    x = _album(rng, int(rng.integers(8, 300)), 64, int(rng.integers(2, 20)), rng.uniform(0.3, 1.5))
    d = rerank_distances(x, int(rng.integers(2, 12)))
    for mcs, ms in ((2, 1), (3, 2)):
        want = _package(d, mcs, ms).tolist()
        assert hdbscan_labels(d, mcs, ms).tolist() == want
        assert hdbscan_labels(d, mcs, ms, symmetric=True).tolist() == want


def test_rounded_distances_tie_everywhere() -> None:
    # Distances on a coarse grid: most edges of the tree tie with others.
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(4, 120))
        x = rng.integers(0, 4, (n, 3)).astype(np.float64)
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        for mcs, ms in ((2, 1), (3, 3), (4, 2)):
            assert hdbscan_labels(d, mcs, ms).tolist() == _package(d, mcs, ms).tolist()


def test_degenerate_albums() -> None:
    same = np.zeros((6, 6))  # one face six times
    two = np.array([[0.0, 1.0], [1.0, 0.0]])
    for d in (same, two):
        for mcs, ms in ((2, 1), (3, 5)):
            assert hdbscan_labels(d, mcs, ms).tolist() == _package(d, mcs, ms).tolist()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        hdbscan_labels(np.zeros((3, 2)), 2, 1)
    with pytest.raises(ValueError, match="float64"):
        hdbscan_labels(np.zeros((3, 3), np.float32), 2, 1)
    with pytest.raises(ValueError, match="finite"):
        hdbscan_labels(np.full((3, 3), np.nan), 2, 1)
    with pytest.raises(ValueError, match="min_cluster_size"):
        hdbscan_labels(np.zeros((3, 3)), 1, 1)


def test_clustering_an_album_does_not_import_scikit_learn() -> None:
    """The point of the port: an album's clustering costs no scikit-learn import (~0.85 s of
    every process that clusters)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from faceloop.config import ClusterSettings, PolicyThresholds\n"
        "from tasks.cluster import cluster_album\n"
        "x = np.random.default_rng(0).standard_normal((60, 512)).astype(np.float32)\n"
        "x[30:] = x[:30] + 0.1 * x[30:]\n"
        "cluster_album(x, np.full(60, 0.9, np.float32), ClusterSettings(), PolicyThresholds())\n"
        "print(sorted(m for m in ('sklearn', 'hdbscan') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("seed", range(20))
def test_core_distances_of_one_point_by_row_minimum_equal_the_selection(seed: int) -> None:
    """min_samples 1 takes each row's smallest off-diagonal distance instead of a selection:
    the same mutual reachability, duplicates (zero distances) included; a matrix whose diagonal
    is not zero or that holds a negative entry goes the selection's way."""
    from faceloop.hdbscan_precomputed import _mutual_reachability

    def selected(d: np.ndarray, symmetric: bool) -> np.ndarray:
        by_row = d.copy() if symmetric else np.ascontiguousarray(d.T)
        by_row.partition(1, axis=1)
        core = by_row[:, 1].copy()
        out = np.maximum(d, core)
        return np.maximum(out, core[:, None])

    rng = np.random.default_rng([13, seed])
    x = _album(rng, int(rng.integers(2, 120)), 16, int(rng.integers(1, 10)), rng.uniform(0.1, 1))
    d = euclidean_matrix(x.astype(np.float64))
    for symmetric in (True, False):
        assert np.array_equal(_mutual_reachability(d, 1, symmetric), selected(d, symmetric))
    odd = d.copy()
    odd[0, 0] = 0.25
    if len(odd) > 2:
        odd[1, 2] = -0.5
    assert np.array_equal(_mutual_reachability(odd, 1), selected(odd, False))
