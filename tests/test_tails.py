"""evaluation/tails.py: tail summaries of genuine / impostor cosines, real vs the generator."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.synthetic import make_faces
from evaluation.tails import compare, format_table, summarize, synthetic_like, tail_stats


def test_summarize_quantiles_count_from_the_top() -> None:
    x = np.arange(100_000, dtype=np.float64)  # 0 .. 99,999
    s = summarize(x)
    assert s["n"] == 100_000
    assert s["max"] == 99_999
    assert s["q0.01"] == 99_000  # 1% of the scores lie at or above it
    assert s["q1e-05"] == 99_999
    assert "q1e-06" not in s  # fewer than one score expected above it
    assert s["mean"] == pytest.approx(49_999.5)


def test_summarize_empty() -> None:
    assert summarize(np.zeros(0)) == {"n": 0.0}


def test_tail_stats_separates_people() -> None:
    f = make_faces(60, 6, albums_per_identity=(1, 2), faces_per_appearance=(3, 6), seed=3)
    keep = f.identity >= 0
    st = tail_stats(f.emb[keep], f.identity[keep])
    assert set(st) == {
        "face_genuine",
        "face_impostor",
        "half_centroid_genuine",
        "centroid_impostor",
    }
    assert st["face_genuine"]["mean"] > 0.45 > st["face_impostor"]["q0.01"]
    # Averaging faces lifts the genuine score, not the impostor one.
    assert st["half_centroid_genuine"]["mean"] > st["face_genuine"]["mean"]
    assert abs(st["centroid_impostor"]["mean"]) < 0.05
    n_people = len(np.unique(f.identity[keep]))
    assert st["centroid_impostor"]["n"] == n_people * (n_people - 1) / 2


def test_synthetic_like_keeps_people_and_counts() -> None:
    labels = np.array(["b", "a", "b", "c", "a", "b"])
    emb = synthetic_like(labels, seed=1, dim=64)
    assert emb.shape == (6, 64)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    # Same person (rows 0, 2, 5 are "b") closer than different people.
    assert min(sim[0, 2], sim[0, 5], sim[2, 5]) > max(sim[0, 1], sim[0, 3], sim[2, 4])
    assert np.array_equal(emb, synthetic_like(labels, seed=1, dim=64))


def test_compare_generator_against_itself_and_table() -> None:
    f = make_faces(80, 8, albums_per_identity=(1, 3), faces_per_appearance=(2, 4), seed=5)
    keep = f.identity >= 0
    res = compare(f.emb[keep], f.identity[keep])
    assert res["people"] == len(np.unique(f.identity[keep]))
    for key in ("face_genuine", "face_impostor", "centroid_impostor"):
        # The same generator on both sides: the same distribution up to sampling noise.
        assert res["real"][key]["mean"] == pytest.approx(res["synthetic"][key]["mean"], abs=0.06)
        assert res["real"][key]["std"] == pytest.approx(res["synthetic"][key]["std"], rel=0.35)
    table = format_table(res)
    assert "| face_impostor | real |" in table and "| centroid_impostor | synthetic |" in table
