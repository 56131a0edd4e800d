"""faceloop.linkage: SciPy's average linkage and distance-cut flat clusters, without SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from faceloop.linkage import average_linkage_groups, fcluster_distance, nn_chain_average


def _faces(seed: int) -> np.ndarray:
    """Unit rows around a few centres, at a spread drawn per case (tight groups to noise)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 90))
    dim = int(rng.choice([8, 64, 512]))
    centres = rng.normal(size=(int(rng.integers(1, max(2, n // 3))), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = float(rng.choice([0.2, 0.5, 1.0, 3.0]))
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, dim)) / dim**0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", range(0, 200, 7))
def test_the_same_linkage_as_scipy_on_its_own_distances(seed):
    """Given SciPy's distances, the merges, their distances and ids are SciPy's to the bit,
    and so are the flat clusters and their numbers at any cut."""
    d = np.clip(pdist(_faces(seed).astype(np.float64), metric="cosine"), 0.0, 2.0)
    want = linkage(d, method="average")
    got = nn_chain_average(squareform(d))
    assert np.array_equal(got, want)
    for t in (0.2, 0.441, 0.7, 1.5):
        assert np.array_equal(fcluster_distance(got, t), fcluster(want, t, criterion="distance"))


@pytest.mark.parametrize("seed", range(1, 200, 5))
def test_the_same_groups_as_scipy_from_the_embeddings(seed):
    """From the embeddings (numpy's cosine distances, not pdist's): the same groups, numbered as
    fcluster numbers them, at the label stage's cut and around it."""
    x = _faces(seed)
    d = np.clip(pdist(x.astype(np.float64), metric="cosine"), 0.0, 2.0)
    z = linkage(d, method="average")
    for t in (0.3, 0.441, 0.6):
        assert np.array_equal(average_linkage_groups(x, t), fcluster(z, t, criterion="distance"))


def test_ties_one_row_and_identical_rows():
    """Exact ties (identical faces) and the smallest inputs behave as SciPy's."""
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    d = np.clip(pdist(x.astype(np.float64), metric="cosine"), 0.0, 2.0)
    assert np.array_equal(nn_chain_average(squareform(d)), linkage(d, method="average"))
    assert np.array_equal(
        average_linkage_groups(x, 0.5), fcluster(linkage(d, "average"), 0.5, "distance")
    )
    assert average_linkage_groups(x[:1], 0.5).tolist() == [1]
    assert average_linkage_groups(x[:0], 0.5).tolist() == []
    two = np.array([[1, 0], [0.6, 0.8]], np.float32)  # cosine 0.6: distance 0.4
    assert average_linkage_groups(two, 0.41).tolist() == [1, 1]
    assert average_linkage_groups(two, 0.39).tolist() == [1, 2]
