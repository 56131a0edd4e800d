"""Calibration on synthetic score distributions whose thresholds are known analytically."""

import math

import numpy as np
import pytest
import yaml
from scipy.stats import norm

from evaluation.calibrate import (
    Embedded,
    centroid_scores,
    id_pair_scores,
    live_match_scores,
    live_match_threshold,
    pair_scores,
    recommend,
    tar_at,
    threshold_at_far,
    write_calibrated_config,
)
from faceloop.config import DEFAULT_POLICY, load_settings
from faceloop.errors import ConfigError


def test_empirical_threshold_on_normal():
    rng = np.random.default_rng(0)
    imp = rng.normal(0.0, 0.1, 2_000_000)
    for far in (1e-3, 1e-4):
        est = threshold_at_far(imp, far)
        assert est.method == "empirical"
        assert est.threshold == pytest.approx(norm.ppf(1 - far, 0, 0.1), abs=0.01)
        assert est.far_measured <= far


def test_exact_small_case():
    # 10 scores, FAR 0.2 -> at most 2 at or above: between 8 and 7 (k = 2, min_tail lowered)
    est = threshold_at_far(np.arange(10, dtype=float), 0.2, min_tail=1)
    assert est.threshold == pytest.approx(7.5)
    assert est.far_measured == pytest.approx(0.2)


def test_tail_extrapolation_on_exponential():
    # Exponential(rate 20): survival exp(-20 t) -> t(far) = ln(1/far) / 20, beyond the data.
    rng = np.random.default_rng(1)
    imp = rng.exponential(1 / 20, 50_000)
    est = threshold_at_far(imp, 1e-6, tail_size=2000)
    assert est.method == "exponential_tail"
    assert est.threshold == pytest.approx(math.log(1e6) / 20, rel=0.08)


def test_tail_errs_high_on_normal():
    rng = np.random.default_rng(2)
    imp = rng.normal(0.0, 0.1, 20_000)
    est = threshold_at_far(imp, 1e-6)
    assert est.threshold >= norm.ppf(1 - 1e-6, 0, 0.1) - 0.01


def test_bad_inputs():
    with pytest.raises(ValueError):
        threshold_at_far(np.zeros(0), 1e-3)
    with pytest.raises(ValueError):
        threshold_at_far(np.zeros(5), 0.0)


def test_tar_at():
    assert tar_at(np.array([0.1, 0.5, 0.6, 0.9]), 0.5) == 0.75
    assert tar_at(np.zeros(0), 0.5) == 0.0


def _clustered(n_people: int, per: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.repeat(centres, per, axis=0) + rng.normal(scale=spread, size=(n_people * per, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), np.repeat(np.arange(n_people), per)


def test_pair_scores_counts():
    emb, lab = _clustered(5, 3, 16, 0.05, 0)
    gen, imp = pair_scores(emb, lab, chunk=4)
    assert gen.size == 5 * 3  # C(3,2) per person
    assert imp.size == 15 * 14 // 2 - 15
    assert gen.min() > imp.max()  # tight clusters in 16-D
    g2, i2 = pair_scores(emb[:6], lab[:6], emb[6:], lab[6:])
    assert g2.size == 0 and i2.size == 6 * 9


def test_recommend_orders_thresholds_and_writes_loadable_config(tmp_path):
    emb, lab = _clustered(300, 4, 64, 0.08, 3)
    gen, imp = pair_scores(emb, lab)
    cents = centroid_scores(emb, lab)
    cal = recommend(gen, imp, gen, imp, cents)
    th = cal.thresholds
    assert th.idcard_review <= th.idcard_accept
    assert th.duplicate <= th.merge and th.outlier <= th.attach
    assert [row["far_target"] for row in cal.far_table] == [1e-3, 1e-4, 1e-5]
    assert cal.far_table[0]["threshold"] <= cal.far_table[-1]["threshold"]
    path = tmp_path / "cal.yaml"
    write_calibrated_config(path, "insightface", cal, "calibrated on synthetic data\nseed 3")
    text = path.read_text()
    assert text.startswith("# calibrated on synthetic data")
    s = load_settings(path)
    assert s.thresholds.idcard_accept == th.idcard_accept
    assert yaml.safe_load(text)["policy"]["insightface"]["merge"] == th.merge
    assert s.models.recognizer is None  # the backend's own, whatever the default recognizer
    # A built-in recognizer's calibration is keyed by its name; repair keeps its default.
    write_calibrated_config(path, "insightface", cal, "edge", recognizer="edgeface_s_gamma_05")
    e = load_settings(path)
    assert e.thresholds_key == "edgeface_s_gamma_05"
    assert e.thresholds.idcard_accept == th.idcard_accept
    assert e.thresholds.repair == DEFAULT_POLICY["edgeface_s_gamma_05"].repair
    # So do the floors (a user probe: written as 0.0, they switched split repair and leftover
    # pairing off for a calibrated EdgeFace-S).
    assert e.thresholds.repair_floor == DEFAULT_POLICY["edgeface_s_gamma_05"].repair_floor > 0
    assert e.thresholds.pair_floor == DEFAULT_POLICY["edgeface_s_gamma_05"].pair_floor > 0
    assert "pair_floor" not in yaml.safe_load(path.read_text())["policy"]["edgeface_s_gamma_05"]
    # A recognizer file of one's own is named in the file, not written as the backend's own
    # (which would have run ArcFace w600k with thresholds fitted to another model).
    own = tmp_path / "own.onnx"
    write_calibrated_config(path, "insightface", cal, "own", recognizer_file=(str(own), "ab" * 32))
    models = yaml.safe_load(path.read_text())["models"]
    assert models == {
        "backend": "insightface",
        "recognizer": str(own),
        "recognizer_sha256": "ab" * 32,
    }


def _embedded(emb, persons, quality):
    n = len(persons)
    return Embedded(
        emb.astype(np.float32),
        [str(p) for p in persons],
        [f"img{i}.jpg" for i in range(n)],
        np.asarray(quality, np.float32),
        np.full(n, 100.0, np.float32),
        [bytes([i % 256]) * (i % 5) for i in range(n)],  # lengths 0..4: boundaries matter
    )


def test_embedded_round_trips_and_subsets(tmp_path):
    emb, lab = _clustered(4, 3, 8, 0.05, 1)
    e = _embedded(emb, lab, np.linspace(0, 1, 12))
    e.save(tmp_path / "e.npz")
    back = Embedded.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(back.emb, e.emb)
    assert back.persons == e.persons and back.paths == e.paths and back.crops == e.crops
    np.testing.assert_array_equal(back.quality, e.quality)
    sub = e.subset(e.quality > 0.5)
    assert len(sub.persons) == 6 and sub.crops == e.crops[6:]


def test_id_pair_scores_carry_the_poorer_face_quality():
    emb, lab = _clustered(5, 3, 16, 0.05, 2)
    ids = _embedded(emb[::3], lab[::3], np.full(5, 0.8))
    ids.quality[0] = 0.05
    lives = _embedded(emb, lab, np.full(15, 0.5))
    p = id_pair_scores(ids, lives, chunk=2)
    assert p["genuine"].size == 5 * 3 and p["impostor"].size == 5 * 12
    assert p["genuine_quality"].size == p["genuine"].size
    assert p["impostor_quality"].size == p["impostor"].size
    # Chip 0 (quality 0.05) pairs carry 0.05, every other pair the live face's 0.5.
    assert np.sum(p["impostor_quality"] == np.float32(0.05)) == 12
    assert np.all(p["impostor_quality"][p["impostor_quality"] != np.float32(0.05)] == 0.5)


def test_quality_split_gives_low_quality_pairs_their_own_stricter_threshold():
    """Low-quality impostors spread wider: their FAR threshold is higher, and each half keeps
    its FAR at the target."""
    rng = np.random.default_rng(5)
    hi, lo = rng.normal(0.0, 0.08, 200_000), rng.normal(0.0, 0.12, 50_000)
    imp = np.concatenate([hi, lo]).astype(np.float32)
    iq = np.concatenate([np.full(hi.size, 0.5), np.full(lo.size, 0.05)]).astype(np.float32)
    gen = rng.normal(0.6, 0.1, 1000).astype(np.float32)
    gq = np.where(np.arange(1000) % 10 == 0, 0.05, 0.5).astype(np.float32)
    emb, lab = _clustered(50, 4, 128, 0.1, 4)
    fg, fi = pair_scores(emb, lab)
    cents = centroid_scores(emb, lab)
    cal = recommend(fg, fi, gen, imp, cents, id_far=1e-3, id_quality=(gq, iq, 0.15))
    th, ev = cal.thresholds, cal.evidence
    assert th.idcard_accept_low_quality > th.idcard_accept
    assert th.idcard_accept == pytest.approx(norm.isf(1e-3) * 0.08, abs=0.01)
    assert th.idcard_accept_low_quality == pytest.approx(norm.isf(1e-3) * 0.12, abs=0.015)
    assert (
        np.mean(hi >= th.idcard_accept) <= 1.2e-3
        and np.mean(lo >= th.idcard_accept_low_quality) <= 1.2e-3
    )
    assert ev["idcard_accept"]["n_impostor"] == hi.size
    # The whole rule (each pair at its own threshold) passes at most id_far of all impostors.
    passed = np.sum(hi >= th.idcard_accept) + np.sum(lo >= th.idcard_accept_low_quality)
    assert passed <= 1e-3 * imp.size
    assert ev["idcard_accept_low_quality"]["n_genuine"] == 100
    # Without the split both come from all pairs.
    plain = recommend(fg, fi, gen, imp, cents, id_far=1e-3).thresholds
    assert plain.idcard_accept == plain.idcard_accept_low_quality


def test_live_match_triplets_and_threshold():
    """Triplets count every (anchor, impostor live face) combination; only impostors in the
    review band get a score; the threshold keeps the impostor share within the budget."""
    emb, lab = _clustered(40, 4, 32, 0.25, 6)
    ids = _embedded(emb[::4], lab[::4], np.full(40, 0.9))
    lives = _embedded(emb, lab, np.full(160, 0.9))
    lives.quality[1] = 0.01  # a poor live face: neither an anchor nor in the band
    sim = ids.emb @ lives.emb.T
    accept, review = float(np.quantile(sim[lab[::4, None] == lab[None, :]], 0.3)), 0.0
    lm = live_match_scores(ids, lives, accept, review, 0.15)
    same = lab[::4, None] == lab[None, :]
    good = lives.quality[None, :] >= 0.15
    anchors = (same & good & (sim >= accept)).sum(1)
    in_band = (~same & good & (sim >= review) & (sim < accept)).sum(1)
    assert lm["n_impostor_triplets"] == int((anchors * (~same).sum(1)).sum())
    assert lm["impostor"].size == int((anchors * in_band).sum())
    assert lm["genuine"].size > 0
    t, ev = live_match_threshold(lm, 1e-3)
    assert t is not None and ev["n_impostor_in_band"] == lm["impostor"].size
    assert np.sum(lm["impostor"] >= t) <= 1e-3 * lm["n_impostor_triplets"] + 1e-9
    assert ev["genuine_won_back"] == pytest.approx(np.mean(lm["genuine"] >= t))
    assert live_match_threshold(lm, 0.0)[0] is None  # no budget left: the rule stays off


def test_small_sets_get_a_threshold_for_every_pair_or_a_clear_refusal():
    """On a small labelled set `calibrate` failed with "no impostor scores" when no ID pair fell
    below the quality cut, and with 10 people wrote merge 1.0 and idcard_accept 1.0 (estimates
    extrapolated past cosine 1), which pass no one, without a word."""
    rng = np.random.default_rng(5)
    imp = rng.normal(0.0, 0.08, 20_000).astype(np.float32)
    gen = rng.normal(0.6, 0.1, 500).astype(np.float32)
    emb, lab = _clustered(50, 4, 128, 0.1, 4)
    fg, fi = pair_scores(emb, lab)
    cents = centroid_scores(emb, lab)
    good = np.full(imp.size, 0.5, np.float32)  # every pair above the quality cut
    cal = recommend(
        fg, fi, gen, imp, cents, id_far=1e-3, id_quality=(np.full(500, 0.5), good, 0.15)
    )
    assert cal.thresholds.idcard_accept == cal.thresholds.idcard_accept_low_quality < 1.0
    few, few_lab = _clustered(4, 2, 32, 0.1, 4)  # 4 people: a few dozen impostor pairs
    with pytest.raises(ConfigError, match="too few pairs of different people to estimate merge"):
        recommend(fg, fi, gen, imp, centroid_scores(few, few_lab))


def test_thresholds_read_off_a_handful_of_pairs_are_refused():
    """`calibrate` on three people wrote idcard_accept -0.098 (an exponential tail fitted to two
    impostor pairs), below its own review floor: a file the config then refused."""
    rng = np.random.default_rng(6)
    emb, lab = _clustered(50, 4, 128, 0.1, 4)
    fg, fi = pair_scores(emb, lab)
    cents = centroid_scores(emb, lab)
    gen = rng.normal(0.6, 0.1, 8).astype(np.float32)
    imp = rng.normal(0.0, 0.08, 48).astype(np.float32)
    q = (np.full(8, 0.5, np.float32), np.r_[np.full(46, 0.5), [0.05, 0.05]].astype(np.float32))
    with pytest.raises(ConfigError, match=r"idcard_accept \(FAR 0.0001 over 48 pairs"):
        recommend(fg, fi, gen, imp, cents, id_quality=(*q, 0.15))
    # A few low-quality pairs beside many good ones: one threshold for all, not one read off two.
    imp = rng.normal(0.0, 0.08, 20_000).astype(np.float32)
    iq = np.r_[np.full(imp.size - 2, 0.5), [0.05, 0.05]].astype(np.float32)
    cal = recommend(fg, fi, gen, imp, cents, id_far=1e-3, id_quality=(q[0], iq, 0.15))
    th = cal.thresholds
    assert th.idcard_accept == th.idcard_accept_low_quality
    assert cal.evidence["idcard_accept"]["n_impostor"] == imp.size


def test_an_extrapolated_threshold_never_passes_more_pairs_than_its_far_allows():
    """An exponential tail fitted lighter than the scores' put idcard_accept where 3 of 25,240
    impostor pairs passed it, for a FAR that allowed 1 (measured 1.19e-4 against 7.9e-5)."""
    s = np.r_[np.zeros(25_237), [0.9, 0.91, 0.92]]  # a heavy tail the fit does not see
    est = threshold_at_far(s, 7.9e-5)
    assert np.sum(s >= est.threshold) <= math.floor(7.9e-5 * s.size)
    assert est.method == "exponential_tail_capped_by_scores"
    assert threshold_at_far(s, 7.9e-5).far_measured <= 7.9e-5


def test_too_few_id_pairs_for_the_far_do_not_get_the_low_quality_threshold():
    """Fewer ID impostor pairs than 1 / id_far: no pair of the FAR budget was left for the good
    pairs, and idcard_accept fell back to a threshold read off the few low-quality pairs
    (0.926, accepting 0 of 34 genuine pairs, exit 0, no warning)."""
    rng = np.random.default_rng(7)
    emb, lab = _clustered(50, 4, 128, 0.1, 4)
    fg, fi = pair_scores(emb, lab)
    cents = centroid_scores(emb, lab)
    hi, lo = rng.normal(0.0, 0.08, 9_000), rng.normal(0.0, 0.16, 900)
    imp = np.r_[hi, lo].astype(np.float32)
    iq = np.r_[np.full(hi.size, 0.5), np.full(lo.size, 0.05)].astype(np.float32)
    gen = rng.normal(0.6, 0.1, 300).astype(np.float32)
    gq = np.full(300, 0.5, np.float32)
    cal = recommend(fg, fi, gen, imp, cents, id_far=1e-4, id_quality=(gq, iq, 0.15))
    th = cal.thresholds
    assert th.idcard_accept < th.idcard_accept_low_quality
    assert cal.evidence["idcard_accept"]["tar"] > 0.9
    assert cal.evidence["idcard_accept"]["n_impostor"] == hi.size
