"""Calibration on synthetic score distributions whose thresholds are known analytically."""

import math

import numpy as np
import pytest
import yaml
from scipy.stats import norm

from evaluation.calibrate import (
    centroid_scores,
    pair_scores,
    recommend,
    tar_at,
    threshold_at_far,
    write_calibrated_config,
)
from faceloop.config import load_settings


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
