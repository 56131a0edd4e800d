"""Metric functions against cases computed by hand."""

import math

import pytest

from tasks.metrics import (
    ACCEPT, REJECT, REVIEW, bcubed_prf, f_score, mixed_identities, pairwise_prf, score_albums,
    score_pairs, split_identities,
)


def test_pairwise_hand_case():
    # truth: a a a b b ; pred: 1 1 2 2 2
    # pred pairs: (0,1) (2,3) (2,4) (3,4) = 4; true among them: (0,1) (3,4) = 2
    # true pairs: 3 (a) + 1 (b) = 4
    r = pairwise_prf(list("aaabb"), [1, 1, 2, 2, 2])
    assert r.precision == pytest.approx(0.5)
    assert r.recall == pytest.approx(0.5)
    assert r.f == pytest.approx(0.5)


def test_pairwise_unlabelled_are_singletons():
    # truth a a a ; pred 1 1 None -> one correct pair claimed, 3 true pairs
    r = pairwise_prf(list("aaa"), [1, 1, None])
    assert r.precision == 1.0
    assert r.recall == pytest.approx(1 / 3)
    # two None must not be treated as one cluster
    r = pairwise_prf(list("ab"), [None, None])
    assert r.precision == 1.0  # nothing claimed
    assert r.recall == 1.0  # nothing to find


def test_pairwise_degenerate():
    assert pairwise_prf([], []).f == 1.0
    r = pairwise_prf(list("aa"), [None, None])
    assert (r.precision, r.recall, r.f) == (1.0, 0.0, 0.0)
    r = pairwise_prf(list("ab"), [1, 1])
    assert (r.precision, r.recall, r.f) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        pairwise_prf(["a"], [])


def test_bcubed_hand_case():
    # truth a a a b b ; pred 1 1 2 2 2
    # item precisions: 1,1 (cluster 1 all a); item2: 1/3, item3,4: 2/3 -> (1+1+1/3+2/3+2/3)/5
    # item recalls: a: 2/3,2/3,1/3 ; b: 1,1 -> (2/3+2/3+1/3+1+1)/5
    r = bcubed_prf(list("aaabb"), [1, 1, 2, 2, 2])
    assert r.precision == pytest.approx((1 + 1 + 1 / 3 + 2 / 3 + 2 / 3) / 5)
    assert r.recall == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1) / 5)
    assert r.f == pytest.approx(f_score(r.precision, r.recall))


def test_bcubed_perfect_and_all_singletons():
    r = bcubed_prf(list("aab"), ["x", "x", "y"])
    assert (r.precision, r.recall) == (1.0, 1.0)
    r = bcubed_prf(list("aab"), [None, None, None])
    assert r.precision == 1.0
    assert r.recall == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert bcubed_prf([], []).f == 1.0


def test_split_and_mixed():
    truth = list("aaabbc")
    pred = [1, 1, 2, 2, 2, None]
    assert split_identities(truth, pred) == (1, 2)  # a over ids 1 and 2; c has no labelled face
    assert mixed_identities(truth, pred) == (1, 2)  # id 2 holds a and b
    assert split_identities([], []) == (0, 0)


def test_score_albums_coverage_review():
    truth = list("aabc")  # b, c appear once
    pred = ["x", "x", None, "y"]
    status = ["auto", "auto", "review", "auto"]
    s = score_albums(truth, pred, status)
    assert s.faces == 4
    assert s.coverage == pytest.approx(0.75)
    assert s.coverage_recurring == 1.0  # only a recurs; both its faces labelled
    assert s.review_share == pytest.approx(0.25)
    assert s.pairwise_precision == 1.0 and s.pairwise_recall == 1.0
    assert s.mixed_ids == 0 and s.split_persons == 0
    assert math.isclose(s.to_dict()["coverage"], 0.75)


def test_score_pairs():
    genuine = [True, True, True, True, False, False]
    decision = [ACCEPT, ACCEPT, REVIEW, "no_face", ACCEPT, REJECT]
    s = score_pairs(genuine, decision)
    assert (s.genuine, s.impostor) == (4, 2)
    assert s.tar == pytest.approx(0.5)
    assert s.far == pytest.approx(0.5)
    assert s.genuine_review == pytest.approx(0.25)
    assert s.impostor_review == 0.0
    assert s.review_share == pytest.approx(1 / 6)
    empty = score_pairs([], [])
    assert (empty.tar, empty.far) == (0.0, 0.0)
    with pytest.raises(ValueError):
        score_pairs([True], [])
