"""Per-album clustering, cross-album merge and stable ids on synthetic embeddings with known
truth."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.synthetic import (
    make_centroids,
    make_faces,
    pair_scores,
    random_centres,
    sample_faces,
)
from faceloop.arrays import l2_normalize as normalize
from faceloop.config import ClusterSettings, PolicyThresholds
from tasks import cluster
from tasks.cluster import (
    album_centroids,
    assign_identity_ids,
    cluster_album,
    merge_clusters,
    new_identity_id,
)

CS = ClusterSettings()
TH = PolicyThresholds()


def _person(rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
    return sample_faces(centre, rng.uniform(0.5, 1.0, n).astype(np.float32), rng)


# ------------------------------------------------------------------ per-album clustering


def test_synthetic_geometry_is_arcface_like():
    d = make_faces(40, 4, seed=3)
    s = d.emb @ d.emb.T
    known = d.identity >= 0
    same = (d.identity[:, None] == d.identity[None, :]) & known[:, None]
    np.fill_diagonal(same, False)
    diff = d.identity[:, None] != d.identity[None, :]
    assert 0.5 <= np.median(s[same]) <= 0.8
    assert np.percentile(s[same], 5) > 0.45
    assert -0.1 <= np.median(s[diff]) <= 0.1
    assert np.percentile(s[diff], 99) < 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_album_recovers_identities(seed):
    d = make_faces(8, 1, faces_per_appearance=(3, 9), strangers_per_album=3, seed=seed)
    labels = cluster_album(d.emb, d.quality, CS, TH)
    assert labels.shape == (len(d.emb),)
    own = labels.copy()
    own[labels < 0] = labels.max() + 1 + np.arange((labels < 0).sum())
    scores = pair_scores(own, d.identity)
    assert scores["precision"] >= 0.97
    assert scores["recall"] >= 0.9
    # Strangers are seen once: they must not be pulled into anyone's cluster.
    assert (labels[d.identity < 0] < 0).all()
    assert len(set(labels[labels >= 0].tolist())) == 8


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hdbscan_from_distance_matrix_equals_kdtree(seed, monkeypatch):
    """Albums are clustered from an exact distance matrix (faster in 512-d than a KD-tree):
    it must give the labels the KD-tree path gives, or the labels would change with the size
    cap."""
    d = make_faces(12, 2, faces_per_appearance=(2, 10), strangers_per_album=4, seed=seed)
    x = normalize(d.emb)
    fast = cluster._hdbscan(x, CS)
    monkeypatch.setattr(cluster, "PRECOMPUTED_MAX", 0)
    assert np.array_equal(fast, cluster._hdbscan(x, CS))


@pytest.mark.parametrize("n", [20, 1, 2, 129, 300, 513])
def test_euclidean_matrix_matches_cdist(n):
    from scipy.spatial.distance import cdist

    if n == 20:
        x = normalize(make_faces(20, 1, seed=3).emb).astype(np.float64)
    else:  # sizes around and past the in-place tiles and row blocks
        x = normalize(np.random.default_rng(n).standard_normal((n, 64))).astype(np.float64)
    d = cluster.euclidean_matrix(x)
    assert np.array_equal(d, d.T) and not d.diagonal().any()
    assert np.abs(d - cdist(x, x)).max() < 1e-12
    # Bit for bit the plain formula it computes in place (clusters, hence identity ids, must
    # not move when only its buffers change).
    g = x @ x.T
    g = (g + g.T) / 2.0
    sq = np.diag(g).copy()
    plain = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0))
    np.fill_diagonal(plain, 0.0)
    assert np.array_equal(d, plain)


def test_cluster_album_is_deterministic_and_numbered_by_first_appearance():
    d = make_faces(5, 1, seed=7)
    a = cluster_album(d.emb, d.quality, CS, TH)
    b = cluster_album(d.emb.copy(), d.quality.copy(), CS, TH)
    assert np.array_equal(a, b)
    seen = [x for x in dict.fromkeys(a.tolist()) if x >= 0]
    assert seen == list(range(len(seen)))


def test_single_person_album_is_one_cluster():
    rng = np.random.default_rng(4)
    c = random_centres(1, 512, rng)[0]
    e = _person(rng, c, 7)
    labels = cluster_album(e, np.full(7, 0.8, np.float32), CS, TH)
    assert (labels == 0).sum() >= 6


def test_tiny_albums():
    rng = np.random.default_rng(5)
    c = random_centres(2, 512, rng)
    q1 = np.ones(1, np.float32)
    assert cluster_album(np.zeros((0, 512), np.float32), np.zeros(0), CS, TH).shape == (0,)
    assert cluster_album(_person(rng, c[0], 1), q1, CS, TH).tolist() == [-1]
    same = _person(rng, c[0], 2)
    assert cluster_album(same, np.ones(2), CS, TH).tolist() == [0, 0]
    two = np.stack([_person(rng, c[0], 1)[0], _person(rng, c[1], 1)[0]])
    assert cluster_album(two, np.ones(2), CS, TH).tolist() == [-1, -1]
    three = np.concatenate([_person(rng, c[0], 2), _person(rng, c[1], 1)])
    assert cluster_album(three, np.ones(3), CS, TH).tolist() == [0, 0, -1]


def test_all_noise_album():
    rng = np.random.default_rng(6)
    e = np.stack([_person(rng, c, 1)[0] for c in random_centres(9, 512, rng)])
    assert (cluster_album(e, np.ones(9), CS, TH) == -1).all()


def test_a_cluster_needs_one_face_good_enough_to_anchor_it():
    """Poor faces join a cluster a good face anchors; a cluster of poor faces only is noise."""
    rng = np.random.default_rng(12)
    c = random_centres(2, 512, rng)
    x = np.concatenate([_person(rng, c[0], 5), _person(rng, c[1], 4)])
    q = np.array([0.9] + [0.08] * 4 + [0.12] * 4, np.float32)  # A: one good face; B: none
    assert CS.anchor_quality == 0.15
    labels = cluster_album(x, q, CS, TH)
    assert (labels[:5] == labels[0]).all() and labels[0] >= 0
    assert (labels[5:] == -1).all()
    off = cluster_album(x, q, CS.model_copy(update={"anchor_quality": 0.0}), TH)
    assert (off[5:] == off[5]).all() and off[5] >= 0 and off[5] != off[0]


def test_quality_length_mismatch_raises():
    with pytest.raises(ValueError):
        cluster_album(np.ones((3, 8), np.float32), np.ones(2), CS, TH)


def test_mixed_cluster_is_split():
    # Two people handed over as one cluster (what HDBSCAN does when a bridge joins them).
    rng = np.random.default_rng(8)
    c = random_centres(2, 512, rng)
    x = np.concatenate([_person(rng, c[0], 6), _person(rng, c[1], 5)])
    w = np.ones(len(x), np.float32)
    labels = cluster._split_mixed(x, w, np.zeros(len(x), np.int64), TH, 2)
    assert len(set(labels[:6].tolist())) == 1
    assert len(set(labels[6:].tolist())) == 1
    assert labels[0] != labels[6]
    # One person is never split.
    one = _person(rng, c[0], 12)
    assert (
        cluster._split_mixed(one, np.ones(12, np.float32), np.zeros(12, np.int64), TH, 2) == 0
    ).all()


def test_noise_attaches_to_nearest_centroid():
    rng = np.random.default_rng(9)
    c = random_centres(2, 512, rng)
    x = np.concatenate([_person(rng, c[0], 5), _person(rng, c[1], 5), _person(rng, c[0], 1)])
    labels = np.array([0] * 5 + [1] * 5 + [-1])
    out = cluster._attach_noise(x, np.ones(11, np.float32), labels, TH)
    assert out[10] == 0
    stranger = _person(rng, random_centres(1, 512, rng)[0], 1)
    out = cluster._attach_noise(
        np.concatenate([x[:10], stranger]), np.ones(11, np.float32), labels, TH
    )
    assert out[10] == -1


def test_split_repair_joins_mutual_nearest_halves_only():
    # One person handed over as two clusters (a split), beside two other people.
    rng = np.random.default_rng(11)
    c = random_centres(3, 512, rng)
    x = np.concatenate([_person(rng, c[0], 8), _person(rng, c[1], 5), _person(rng, c[2], 5)])
    w = np.ones(len(x), np.float32)
    labels = np.array([0] * 4 + [1] * 4 + [2] * 5 + [3] * 5)
    out = cluster.repair_splits(x, w, labels, 0.40)
    assert len(set(out[:8].tolist())) == 1  # the two halves of person 0 are one again
    assert len({out[0], out[8], out[13]}) == 3  # the other people stay apart
    # At a threshold no pair reaches, nothing changes.
    assert (cluster.repair_splits(x, w, labels, 0.99) == labels).all()


def test_split_repair_in_cluster_album_keeps_people_apart():
    settings = ClusterSettings(repair=0.40)
    for seed in range(3):
        d = make_faces(8, 1, faces_per_appearance=(3, 9), strangers_per_album=3, seed=seed)
        labels = cluster_album(d.emb, d.quality, settings, TH)
        own = labels.copy()
        own[labels < 0] = labels.max() + 1 + np.arange((labels < 0).sum())
        assert pair_scores(own, d.identity)["precision"] >= 0.97


def test_rerank_distances_shape_and_order():
    d = make_faces(5, 1, faces_per_appearance=(4, 6), strangers_per_album=0, seed=4)
    r = cluster.rerank_distances(d.emb, 4)
    assert r.shape == (len(d.emb), len(d.emb))
    assert np.allclose(r, r.T) and np.allclose(np.diag(r), 0.0)
    same = d.identity[:, None] == d.identity[None, :]
    np.fill_diagonal(same, False)
    off = ~np.eye(len(d.emb), dtype=bool)
    assert r[same].mean() < r[off & ~same].mean()
    labels = cluster_album(d.emb, d.quality, ClusterSettings(rerank_k=4), TH)
    assert len(set(labels[labels >= 0].tolist())) == 5


def test_attach_to_identities_needs_threshold_and_margin():
    rng = np.random.default_rng(12)
    c = random_centres(3, 512, rng)
    cents = np.stack([c[0], c[1], 0.8 * c[1] + 0.6 * c[2]])  # identities 1 and 2 look alike
    faces = np.concatenate([_person(rng, c[0], 1), _person(rng, c[1], 1)])
    stranger = _person(rng, random_centres(1, 512, rng)[0], 1)
    out = cluster.attach_to_identities(np.concatenate([faces, stranger]), cents, 0.3, 0.0)
    assert out.tolist()[0] == 0 and out.tolist()[2] == -1
    # A face between two look-alike identities is left alone when the margin asks for more.
    assert cluster.attach_to_identities(faces[1:], cents, 0.3, 0.5).tolist() == [-1]
    assert cluster.attach_to_identities(faces[:0], cents, 0.3, 0.0).shape == (0,)


# ------------------------------------------------------------------ cross-album merge


def _albums_to_centroids(d):
    cents, counts, keys, truth = [], [], [], []
    for a in np.unique(d.album):
        m = d.album == a
        labels = cluster_album(d.emb[m], d.quality[m], CS, TH)
        c, n = album_centroids(d.emb[m], labels, d.quality[m])
        cents.append(c)
        counts.append(n)
        for k in range(len(n)):
            vals, cc = np.unique(d.identity[m][labels == k], return_counts=True)
            truth.append(vals[cc.argmax()])
            keys.append(f"a{a}/c{k}")
    return np.concatenate(cents), np.concatenate(counts), keys, np.array(truth)


def test_merge_joins_one_person_across_albums():
    d = make_faces(30, 8, albums_per_identity=(2, 4), strangers_per_album=2, seed=11)
    cents, counts, keys, truth = _albums_to_centroids(d)
    comp = merge_clusters(cents, counts, keys, TH.merge)
    scores = pair_scores(comp, truth, counts)
    assert scores["precision"] >= 0.99
    assert scores["recall"] >= 0.95
    # Every person seen in several albums ends up mostly in one component.
    assert comp.max() + 1 <= len(np.unique(truth[truth >= 0])) + 3


def _bridge_case():
    rng = np.random.default_rng(12)
    p, q = random_centres(2, 512, rng)
    q = normalize(q - (q @ p) * p)  # orthogonal people: cos(P, Q) = 0
    ps = normalize(p + 0.25 * rng.standard_normal((4, 512)).astype(np.float32) / np.sqrt(512))
    qs = normalize(q + 0.25 * rng.standard_normal((4, 512)).astype(np.float32) / np.sqrt(512))
    bridge = normalize((p + q)[None, :])  # cos ~0.7 to both people, above the merge threshold
    cents = np.concatenate([ps, bridge, qs])
    counts = np.array([5, 5, 5, 5, 3, 5, 5, 5, 5])
    keys = [f"a{i}/c0" for i in range(9)]
    return cents, counts, keys


def test_merge_does_not_chain_two_people_through_a_bridge():
    cents, counts, keys = _bridge_case()
    # The fixture really is a chain: plain single linkage at the threshold joins everything.
    s = cents @ cents.T
    assert (s[4, :4] >= TH.merge).all() and (s[4, 5:] >= TH.merge).all()
    assert s[:4, 5:].max() < TH.merge
    comp = merge_clusters(cents, counts, keys, TH.merge)
    assert len(set(comp[:4].tolist())) == 1
    assert len(set(comp[5:].tolist())) == 1
    assert comp[0] != comp[5]
    assert comp[4] in (comp[0], comp[5])


def test_merge_is_independent_of_input_order():
    data = make_centroids(3000, seed=13)
    comp = merge_clusters(data.centroids, data.counts, data.keys, TH.merge)
    perm = np.random.default_rng(0).permutation(len(data.keys))
    comp_p = merge_clusters(
        data.centroids[perm], data.counts[perm], [data.keys[i] for i in perm], TH.merge
    )
    assert np.array_equal(comp_p, comp[perm])


def test_merge_10k_faces_exact_index():
    data = make_centroids(10_000, seed=14)
    comp = merge_clusters(data.centroids, data.counts, data.keys, TH.merge)
    scores = pair_scores(comp, data.identity, data.counts)
    assert scores["precision"] >= 0.999 and scores["recall"] >= 0.99


def test_merge_ivf_path(monkeypatch):
    monkeypatch.setattr(cluster, "FLAT_MAX", 500)
    data = make_centroids(8_000, seed=15)
    assert cluster.knn_index_kind(len(data.keys)) == "ivf"
    comp = merge_clusters(data.centroids, data.counts, data.keys, TH.merge)
    scores = pair_scores(comp, data.identity, data.counts)
    assert scores["precision"] >= 0.999 and scores["recall"] >= 0.98


def test_merge_degenerate_inputs():
    assert merge_clusters(np.zeros((0, 512), np.float32), [], [], 0.5).shape == (0,)
    one = normalize(np.ones((1, 8)))
    assert merge_clusters(one, [3], ["a"], 0.5).tolist() == [0]
    with pytest.raises(ValueError):
        merge_clusters(normalize(np.ones((2, 8))), [1, 1], ["a", "a"], 0.5)
    with pytest.raises(ValueError):
        merge_clusters(normalize(np.ones((2, 8))), [1], ["a", "b"], 0.5)


# ------------------------------------------------------------------ stable identity ids


def test_new_ids_are_deterministic_and_unique():
    ids = assign_identity_ids([0, 0, 1], [["f3", "f1"], ["f2"], ["f9"]], {})
    assert ids == [new_identity_id(["f1"]), new_identity_id(["f9"])]
    assert ids[0].startswith("id-") and len(ids[0]) == 15
    assert ids == assign_identity_ids([0, 0, 1], [["f3", "f1"], ["f2"], ["f9"]], {})


def test_id_survives_a_face_added_and_an_album_added():
    first = assign_identity_ids([0, 1], [["a1", "a2"], ["b1", "b2"]], {})
    prev = {"a1": first[0], "a2": first[0], "b1": first[1], "b2": first[1]}
    # A new face "a0" (smaller than every old face id) joins identity 0; a new album adds
    # a third person; component order changes too.
    now = assign_identity_ids([1, 0, 2], [["a0", "a1", "a2"], ["b1", "b2"], ["c1", "c2"]], prev)
    assert now[1] == first[0] and now[0] == first[1]
    assert now[2] not in first and len(set(now)) == 3


def test_split_gives_the_old_id_to_the_larger_part():
    prev = {f"f{i}": "id-old" for i in range(10)}
    now = assign_identity_ids(
        [0, 1], [[f"f{i}" for i in range(3)], [f"f{i}" for i in range(3, 10)]], prev
    )
    assert now[1] == "id-old"
    assert now[0] != "id-old" and now[0].startswith("id-")


def test_merge_of_two_identities_keeps_the_majority_id_and_ties_take_the_smaller():
    prev = {"a": "id-b", "b": "id-b", "c": "id-b", "d": "id-a", "e": "id-a"}
    assert assign_identity_ids([0], [["a", "b", "c", "d", "e"]], prev) == ["id-b"]
    prev = {"a": "id-b", "b": "id-a"}
    assert assign_identity_ids([0], [["a", "b"]], prev) == ["id-a"]


def test_new_id_never_reuses_a_previous_id():
    # f1's face moved to a component that cannot keep an old id; the hash of f1 is the id of an
    # identity that still exists elsewhere.
    taken = new_identity_id(["f1"])
    prev = {"g1": taken, "g2": taken}
    ids = assign_identity_ids([0, 1], [["f1"], ["g1", "g2"]], prev)
    assert ids[1] == taken
    assert ids[0] != taken and ids[0].startswith(taken)
    assert len(set(ids)) == 2


def test_assign_rejects_bad_input():
    with pytest.raises(ValueError):
        assign_identity_ids([0, 1], [["a"]], {})
    with pytest.raises(ValueError):
        assign_identity_ids([1], [["a"]], {})  # component 0 has no faces


def test_default_split_repair_keeps_people_apart_in_albums_of_twenty():
    """Albums of ~20 people (the scale bench's synthetic albums): the default split repair
    joins no two people that the clustering without repair kept apart. At 0.40 it did (one
    more mixed cluster, 90 more wrong pairs in these 40 albums): some pair's centroids sit ~3
    standard deviations up the impostor tail when an album holds 20 people."""
    from evaluation.synthetic import album_faces, plan_albums

    plan = plan_albums(8000, faces_per_album=200, seed=0)
    centres = random_centres(plan.n_identities, 512, np.random.default_rng([0, 1]))

    def wrong_pairs(settings: ClusterSettings) -> int:
        total = 0
        for a in range(len(plan.album_people)):
            emb, ids, q = album_faces(plan, centres, a, 0)
            labels = cluster_album(emb, q, settings, TH)
            for lab in set(labels[labels >= 0].tolist()):
                m = ids[labels == lab]
                total += (len(m) ** 2 - sum(int((m == p).sum()) ** 2 for p in set(m.tolist()))) // 2
        return total

    assert CS.repair is None and TH.repair > 0  # None: the recognizer's policy value
    assert wrong_pairs(CS) == wrong_pairs(ClusterSettings(repair=0.0))
    assert wrong_pairs(ClusterSettings(repair=0.40)) > wrong_pairs(CS)  # the case it guards


def test_default_split_repair_keeps_look_alikes_apart_after_a_large_increment():
    """The scale bench's 10^5 store, album 40 after its 1% increment (`benchmarks/scale.py`:
    200 new faces of the album's own people from fresh draws): at 0.45 the split repair joined
    two look-alike people into one cluster (364 wrong pairs; the bench's merge precision fell
    0.99984 -> 0.99734); the default (0.50) keeps them apart, as clustering without repair does.
    Real faces did the same at 0.45 (`faceloop eval --seed 3 --people-per-album 16`: two
    look-alike women joined, docs/QUALITY.md)."""
    from evaluation.synthetic import album_faces, plan_albums

    plan = plan_albums(100_000, faces_per_album=200, seed=0)
    centres = random_centres(plan.n_identities, 512, np.random.default_rng([0, 1]))
    parts = [album_faces(plan, centres, 40, 0)]
    got = 0
    for k in range(10):  # the increment's draws, as benchmarks/scale.add_faces makes them
        if got >= 200:
            break
        parts.append(album_faces(plan, centres, 40, 1000 + k))
        got += len(parts[-1][0])
    emb = np.concatenate([p[0] for p in parts])[: len(parts[0][0]) + 200]
    ids = np.concatenate([p[1] for p in parts])[: len(emb)]
    q = np.concatenate([p[2] for p in parts])[: len(emb)]

    def wrong_pairs(settings: ClusterSettings) -> int:
        labels = cluster_album(emb, q, settings, TH)
        total = 0
        for lab in set(labels[labels >= 0].tolist()):
            m = ids[labels == lab]
            total += (len(m) ** 2 - sum(int((m == p).sum()) ** 2 for p in set(m.tolist()))) // 2
        return total

    assert wrong_pairs(ClusterSettings(repair=0.45)) > 0  # the case it guards
    assert wrong_pairs(CS) == wrong_pairs(ClusterSettings(repair=0.0)) == 0


def test_split_repair_on_face_evidence_needs_a_face_pair_at_the_threshold():
    """Below the repair threshold, two mutual-nearest parts whose centroids reach the floor are
    joined only when some face of one meets some face of the other at the threshold."""

    def at(deg: float) -> np.ndarray:
        r = np.deg2rad(deg)
        return np.array([np.cos(r), np.sin(r), 0.0, 0.0], np.float32)

    other = [np.array([0.0, 0.0, 0.0, 1.0], np.float32)] * 3  # a third person, far away
    labels = np.array([0] * 3 + [1] * 3 + [2] * 3)
    w = np.ones(9, np.float32)
    part_a = [at(-2), at(0), at(2)]
    # Centroids 62 degrees apart (cosine 0.469) in both; the closest faces 58 degrees apart
    # (0.530) in the first, 48 degrees (0.669) in the second.
    no_bridge = np.stack([*part_a, at(60), at(62), at(64), *other])
    bridged = np.stack([*part_a, at(50), at(62), at(74), *other])
    for x in (no_bridge, bridged):
        c = cluster.centroid(x[:3], w[:3]) @ cluster.centroid(x[3:6], w[3:6])
        assert 0.40 < c < 0.559
    joined = [0] * 6 + [2] * 3
    assert (cluster.repair_splits(no_bridge, w, labels, 0.559, 0.40) == labels).all()
    assert cluster.repair_splits(bridged, w, labels, 0.559, 0.40).tolist() == joined
    # Off (floor 0), or a floor above the centroids' cosine: nothing joins.
    assert (cluster.repair_splits(bridged, w, labels, 0.559, 0.0) == labels).all()
    assert (cluster.repair_splits(bridged, w, labels, 0.559, 0.50) == labels).all()


def test_leftover_faces_that_are_each_others_nearest_become_a_pair():
    """After average linkage, two noise faces that are each other's most similar noise face at
    the pair floor form a cluster of two; a third face nearest to one of them does not join,
    and a pair below the floor stays noise."""

    def at(deg: float, axis: int = 0) -> np.ndarray:
        r = np.deg2rad(deg)
        v = np.zeros(6, np.float32)
        v[axis], v[axis + 1] = np.cos(r), np.sin(r)
        return v

    # Faces 0 and 1: 57 degrees apart (cosine 0.545, below attach 0.559); face 2 nearest to
    # face 1 but face 1's nearest is face 0; faces 3 and 4: 70 degrees apart (0.342).
    x = np.stack([at(0), at(57), at(130), at(0, 3), at(70, 3)])
    labels = np.full(5, -1)
    out = cluster._pair_noise(x, labels, 0.50)
    assert out[0] == out[1] >= 0
    assert (out[2:] == -1).all()
    assert (cluster._pair_noise(x, labels, 0.0) == labels).all()  # off
    assert (cluster._pair_noise(x, labels, 0.60) == labels).all()  # above the pair's cosine
    # In cluster_album the pair is made only where clusters of two are allowed.
    th = PolicyThresholds(pair_floor=0.50)
    assert (cluster_album(x, np.ones(5), ClusterSettings(min_cluster_size=3), th) < 0).all()


def _hist_of(cosines: np.ndarray) -> np.ndarray:
    bins = ((cosines + 1.0) * (cluster.IMPOSTOR_BINS / 2)).astype(np.int64)
    return np.bincount(np.clip(bins, 0, cluster.IMPOSTOR_BINS - 1), minlength=cluster.IMPOSTOR_BINS)


def test_within_album_histogram_counts_the_pairs_of_one_album_only():
    """Albums of 3, 2 and 1 clusters give 3 + 1 pairs; cosines land in their bins; clusters of
    different albums are never paired."""
    e = np.eye(4, dtype=np.float32)
    x = np.stack([e[0], e[1], 0.6 * e[0] + 0.8 * e[2], e[0], e[0], e[3]])
    hist = cluster.within_album_histogram(x, ["a", "a", "a", "b", "b", "c"])
    assert hist.sum() == 4
    b = cluster.IMPOSTOR_BINS // 2  # cosine 0
    assert hist[b] == 2  # a: (0, 1), (1, 2)
    assert hist[int(1.6 * b)] == 1  # a: (0, 2) at 0.6
    assert hist[-1] == 1  # b: the same vector twice, cosine 1
    assert cluster.within_album_histogram(x[:1], ["a"]).sum() == 0
    with pytest.raises(ValueError):
        cluster.within_album_histogram(x, ["a"])


def test_upper_quantile_reads_the_tail_of_the_histogram():
    rng = np.random.default_rng(0)
    s = np.clip(rng.normal(0.0, 0.1, 200_000), -1, 1)
    hist = _hist_of(s)
    for share in (0.5, 1e-2, 1e-3):
        assert cluster.upper_quantile(hist, share) == pytest.approx(
            np.quantile(s, 1 - share), abs=2e-3
        )


def test_gallery_threshold_is_the_policy_until_the_store_shows_a_tail_above_it():
    """The merge threshold: the policy's on a small store, without enough impostor pairs, or
    with fpir None; above it once the impostor tail extrapolated to the store's number of
    comparisons passes it. Monotone: higher for more units or a smaller fpir, never lower for
    a wider tail; a recognizer with a narrower impostor tail keeps the policy at that size."""
    rng = np.random.default_rng(1)
    wide = _hist_of(np.clip(rng.normal(0.0, 0.11, 400_000), -1, 1))
    narrow = _hist_of(np.clip(rng.normal(0.0, 0.07, 400_000), -1, 1))
    g = cluster.gallery_merge_threshold
    assert g(0.55, wide, 1_000, 0.01) == 0.55
    assert g(0.55, wide, 100_000, None) == 0.55
    few = (wide > 0).astype(np.int64)  # under 2,000 pairs: too few to read a tail
    assert g(0.55, few, 100_000, 0.01) == 0.55
    big = [g(0.55, wide, n, 0.01) for n in (10_000, 100_000, 1_000_000)]
    assert big[0] <= big[1] < big[2] and big[1] > 0.55
    assert g(0.55, wide, 100_000, 0.001) > big[1]
    assert g(0.55, narrow, 100_000, 0.01) == 0.55
    assert g(0.80, wide, 100_000, 0.01) == 0.80
    # Within the measured range (p >= 1e-3) it is the measured quantile itself.
    assert g(0.0, wide, 11, 0.1) == pytest.approx(cluster.upper_quantile(wide, 0.01), abs=1e-4)
