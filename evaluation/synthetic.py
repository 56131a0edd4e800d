"""Seeded synthetic face embeddings with known identities, for tests and the merge benchmark.

The geometry imitates ArcFace-style recognizers (L2-normalised, cosine similarity):

- identity centres are random unit vectors drawn from an anisotropic Gaussian (a decaying
  spectrum with an effective dimension of ~60), so two *different* people's faces have cosine
  similarity around 0 with a realistic tail up to ~0.25 instead of the vanishing spread that
  isotropic 512-d vectors would give;
- each album a person appears in shifts their centre a little (lighting, age, camera), so the same
  person's clusters in two albums are similar (~0.85 between centroids) but not identical;
- a face is ``normalize(album_centre + s * noise)`` with isotropic ``noise`` of unit expected norm
  and ``s`` growing as quality falls, which puts *same*-person face pairs at cosine ≈ 0.5-0.8;
- strangers are one-off faces of people who appear nowhere else (truth ``-1``).

Nothing here does I/O or logs; every function is a pure function of its arguments and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceloop.arrays import l2_normalize

# Per-face noise scale s = _S_BEST + _S_SLOPE * (1 - quality): quality 1 -> s 0.55 (pair cosine
# ~0.77), quality 0.3 -> s 0.9 (pair cosine ~0.55).
_S_BEST = 0.55
_S_SLOPE = 0.5
# Album shift of a person's centre; cosine between two album centres of one person ~0.9.
_ALBUM_SHIFT = 0.3
# Effective dimension of the centre distribution: std of cosine between two centres ~1/sqrt(60).
_CENTRE_DEFF = 60.0


@dataclass(frozen=True)
class SyntheticFaces:
    """Faces of a synthetic collection. Rows line up across all arrays."""

    emb: np.ndarray  # (n, dim) float32, unit rows
    identity: np.ndarray  # (n,) int64 true person, -1 for a stranger seen once
    album: np.ndarray  # (n,) int64 album index
    quality: np.ndarray  # (n,) float32 in [0, 1]
    face_ids: list[str]


def _spectrum(dim: int, d_eff: float) -> np.ndarray:
    """Per-axis standard deviations whose variance spectrum has effective dimension ~d_eff."""
    # Exponentially decaying variances lam_i = r**i have d_eff = (1+r)/(1-r) for large dim.
    d_eff = min(d_eff, dim)
    r = (d_eff - 1.0) / (d_eff + 1.0)
    lam = r ** np.arange(dim, dtype=np.float64)
    return np.sqrt(lam).astype(np.float32)


def random_centres(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit identity centres; cosine between two is ~N(0, 0.13) (see module docstring)."""
    z = rng.standard_normal((n, dim), dtype=np.float32) * _spectrum(dim, _CENTRE_DEFF)
    return l2_normalize(z)


def shift_centres(
    centres: np.ndarray, rng: np.random.Generator, scale: float = _ALBUM_SHIFT
) -> np.ndarray:
    """Each centre moved by isotropic noise of norm ~``scale`` and renormalised."""
    d = centres.shape[1]
    noise = rng.standard_normal(centres.shape, dtype=np.float32) / np.sqrt(d)
    return l2_normalize(centres + scale * noise)


def sample_faces(centre: np.ndarray, quality: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One unit face per entry of ``quality`` around ``centre``; lower quality, more noise."""
    d = centre.shape[0]
    s = (_S_BEST + _S_SLOPE * (1.0 - np.asarray(quality, dtype=np.float32)))[:, None]
    noise = rng.standard_normal((len(quality), d), dtype=np.float32) / np.sqrt(d)
    return l2_normalize(centre[None, :] + s * noise)


def _quality(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.3, 1.0, n).astype(np.float32)


def make_faces(
    n_identities: int,
    n_albums: int,
    *,
    albums_per_identity: tuple[int, int] = (1, 3),
    faces_per_appearance: tuple[int, int] = (3, 8),
    strangers_per_album: int = 1,
    dim: int = 512,
    seed: int = 0,
) -> SyntheticFaces:
    """A collection of albums. Each identity appears in a random ``albums_per_identity`` (inclusive
    range, capped at ``n_albums``) albums with ``faces_per_appearance`` faces each; every album
    also holds ``strangers_per_album`` one-off faces. Rows are sorted by album. Face ids are
    ``f<album>-<row>`` (unique, deterministic)."""
    rng = np.random.default_rng(seed)
    centres = random_centres(n_identities + n_albums * strangers_per_album, dim, rng)
    embs, ids, albums, quals = [], [], [], []
    for i in range(n_identities):
        k = int(rng.integers(albums_per_identity[0], albums_per_identity[1] + 1))
        for a in rng.choice(n_albums, size=min(k, n_albums), replace=False):
            m = int(rng.integers(faces_per_appearance[0], faces_per_appearance[1] + 1))
            q = _quality(m, rng)
            ca = shift_centres(centres[i : i + 1], rng)[0]
            embs.append(sample_faces(ca, q, rng))
            ids.append(np.full(m, i, np.int64))
            albums.append(np.full(m, a, np.int64))
            quals.append(q)
    s = n_identities
    for a in range(n_albums):
        for _ in range(strangers_per_album):
            q = _quality(1, rng)
            embs.append(sample_faces(centres[s], q, rng))
            ids.append(np.full(1, -1, np.int64))
            albums.append(np.full(1, a, np.int64))
            quals.append(q)
            s += 1
    if not embs:
        return SyntheticFaces(
            np.zeros((0, dim), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
            [],
        )
    emb = np.concatenate(embs)
    identity = np.concatenate(ids)
    album = np.concatenate(albums)
    quality = np.concatenate(quals)
    order = np.argsort(album, kind="stable")
    album = album[order]
    face_ids = [f"f{a}-{r}" for r, a in enumerate(album.tolist())]
    return SyntheticFaces(emb[order], identity[order], album, quality[order], face_ids)


@dataclass(frozen=True)
class SyntheticCentroids:
    """Per-album cluster centroids as the per-album clustering would produce them."""

    centroids: np.ndarray  # (m, dim) float32 unit rows
    counts: np.ndarray  # (m,) faces behind each centroid
    identity: np.ndarray  # (m,) true person
    keys: list[str]  # "a<album>/c<cluster>"


def make_centroids(
    n_faces: int,
    *,
    faces_per_appearance: tuple[int, int] = (2, 4),
    albums_per_identity: tuple[int, int] = (1, 4),
    dim: int = 512,
    seed: int = 0,
) -> SyntheticCentroids:
    """Centroids of about ``n_faces`` faces grouped into per-album clusters, drawn directly.

    The mean of k faces ``normalize(c + s_i n_i)`` points along ``c * sum(w_i) + sqrt(sum(w_i^2
    s_i^2)) n`` with ``w_i = 1/sqrt(1+s_i^2)``, so each centroid is sampled from that
    distribution without materialising its faces (10^6 faces x 512-d would need 2 GB)."""
    rng = np.random.default_rng(seed)
    mean_k = sum(faces_per_appearance) / 2
    mean_a = sum(albums_per_identity) / 2
    n_ident = max(1, round(n_faces / (mean_k * mean_a)))
    apps = rng.integers(albums_per_identity[0], albums_per_identity[1] + 1, n_ident)
    identity = np.repeat(np.arange(n_ident, dtype=np.int64), apps)
    m = len(identity)
    counts = rng.integers(faces_per_appearance[0], faces_per_appearance[1] + 1, m)
    out = np.empty((m, dim), np.float32)
    chunk = 65536
    for lo in range(0, n_ident, chunk):
        hi = min(n_ident, lo + chunk)
        c = random_centres(hi - lo, dim, rng)
        rows = np.nonzero((identity >= lo) & (identity < hi))[0]
        ca = shift_centres(c[identity[rows] - lo], rng)
        # Per-face noise scales, summarised per centroid.
        sum_w = np.zeros(len(rows), np.float32)
        sum_ws2 = np.zeros(len(rows), np.float32)
        for j in range(faces_per_appearance[1]):
            active = counts[rows] > j
            s = _S_BEST + _S_SLOPE * (1.0 - _quality(len(rows), rng))
            w = 1.0 / np.sqrt(1.0 + s * s)
            sum_w += np.where(active, w, 0.0)
            sum_ws2 += np.where(active, (w * s) ** 2, 0.0)
        noise = rng.standard_normal((len(rows), dim), dtype=np.float32) / np.sqrt(dim)
        out[rows] = l2_normalize(ca * sum_w[:, None] + np.sqrt(sum_ws2)[:, None] * noise)
    # Shuffle so identity is not recoverable from row order.
    perm = rng.permutation(m)
    keys = [f"a{i}/c0" for i in range(m)]
    return SyntheticCentroids(out[perm], counts[perm].astype(np.int64), identity[perm], keys)


def pair_scores(
    pred: np.ndarray, truth: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """Pairwise precision and recall of a partition ``pred`` against ``truth``.

    With ``weights`` (faces per item) pairs are counted over faces, an item of weight w standing
    for w faces. Items with truth ``-1`` are each their own class. Precision is 1.0 when no pair is
    predicted, recall 1.0 when no true pair exists."""
    pred = np.asarray(pred, np.int64)
    truth = np.asarray(truth, np.int64).copy()
    w = np.ones(len(pred), np.int64) if weights is None else np.asarray(weights, np.int64)
    strangers = truth < 0
    truth[strangers] = truth.max(initial=0) + 1 + np.arange(int(strangers.sum()))

    def pairs(labels: np.ndarray) -> float:
        _, inv = np.unique(labels, axis=0, return_inverse=True)
        sizes = np.bincount(inv.ravel(), weights=w).astype(np.float64)
        return float((sizes * (sizes - 1) / 2).sum())

    tp = pairs(np.stack([pred, truth], axis=1))
    pp, tt = pairs(pred[:, None]), pairs(truth[:, None])
    return {"precision": tp / pp if pp else 1.0, "recall": tp / tt if tt else 1.0}


# ---------------------------------------------------------------- synthetic stores (scale bench)


@dataclass(frozen=True)
class AlbumPlan:
    """Which people appear in each album and how many faces each brings (no embeddings yet)."""

    album_people: list[np.ndarray]  # per album: identity ids (int64)
    album_counts: list[np.ndarray]  # per album: faces per appearance
    n_identities: int


def plan_albums(
    n_faces: int,
    *,
    faces_per_album: int = 200,
    faces_per_appearance: tuple[int, int] = (4, 16),
    albums_per_identity: float = 2.0,
    seed: int = 0,
) -> AlbumPlan:
    """Albums of ~``faces_per_album`` faces: each album shows people drawn from a pool sized so
    that a person appears in ~``albums_per_identity`` albums, ``faces_per_appearance`` faces
    each (inclusive range). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    n_albums = max(1, round(n_faces / faces_per_album))
    mean_app = (faces_per_appearance[0] + faces_per_appearance[1]) / 2
    per_album = max(1, round(faces_per_album / mean_app))
    pool = max(per_album, round(n_albums * per_album / albums_per_identity))
    people, counts = [], []
    for _ in range(n_albums):
        ids = np.sort(rng.choice(pool, size=per_album, replace=False)).astype(np.int64)
        m = rng.integers(faces_per_appearance[0], faces_per_appearance[1] + 1, size=per_album)
        people.append(ids)
        counts.append(m.astype(np.int64))
    return AlbumPlan(people, counts, pool)


def album_faces(
    plan: AlbumPlan, centres: np.ndarray, album: int, seed: int, strangers: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, truth identity (-1 for a stranger), quality) of one album's faces, from the
    identity ``centres`` (:func:`random_centres`); deterministic in (seed, album)."""
    rng = np.random.default_rng([seed, album])
    embs, ids, quals = [], [], []
    for person, m in zip(
        plan.album_people[album].tolist(), plan.album_counts[album].tolist(), strict=True
    ):
        q = _quality(m, rng)
        ca = shift_centres(centres[person : person + 1], rng)[0]
        embs.append(sample_faces(ca, q, rng))
        ids.append(np.full(m, person, np.int64))
        quals.append(q)
    d = centres.shape[1]
    for _ in range(strangers):
        q = _quality(1, rng)
        c = random_centres(1, d, rng)[0]
        embs.append(sample_faces(c, q, rng))
        ids.append(np.full(1, -1, np.int64))
        quals.append(q)
    return np.concatenate(embs), np.concatenate(ids), np.concatenate(quals)
