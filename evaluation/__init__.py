"""Evaluation and calibration: the labelled benchmark (:mod:`evaluation.benchmark`), the
Immich-style anchor (:mod:`evaluation.baseline`), the figures (:mod:`evaluation.metrics`),
threshold calibration (:mod:`evaluation.calibrate`), synthetic embeddings
(:mod:`evaluation.synthetic`) and the HTML run report (:mod:`evaluation.report`)."""
