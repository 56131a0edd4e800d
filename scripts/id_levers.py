"""Score-level ID-card levers on the faces a `faceloop calibrate --embeddings DIR` run cached.

    PYTHONPATH=$PWD .venv/bin/python scripts/id_levers.py --labelled LFW --embeddings DIR \
        [--seed 0] [--exclude-bench BENCH ...] [--far 1e-5] [--flip] [--fusion]

Same people, chips and ID pairs as that calibrate run (pass the same --labelled, --seed and
--exclude-bench). For each lever: the ID-pair threshold at FAR ``--far`` read off its own
impostor scores (all pairs; pairs whose faces both reach quality.auto_min_quality; the others),
the impostor count behind it and the genuine share at or above it. How the ID-card ablation in
docs/QUALITY.md was measured.

- plain: the pipeline's embeddings (what calibrate uses).
- ``--flip``: the stored aligned crops re-embedded as they are and as the mean of the crop and its
  mirror image (flip test-time augmentation), both from the same JPEG crops, so the two differ
  only by the flip.
- ``--fusion``: each chip vs the mean of two live photos of one person (subjects with several
  live photos): every pair of a person's live photos, at most ``--pairs-per-person``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from evaluation.benchmark import Truth, scan_labelled
from evaluation.calibrate import (
    Embedded,
    chip_draws,
    gate_mask,
    id_pair_scores,
    tar_at,
    threshold_at_far,
)
from faceloop.arrays import l2_normalize
from faceloop.config import load_settings


def _row(name: str, idp: dict[str, np.ndarray], far: float, cut: float) -> dict:
    gen, imp = idp["genuine"], idp["impostor"]
    gq, iq = idp["genuine_quality"], idp["impostor_quality"]
    out: dict = {"lever": name}
    for part, gm, im in (
        ("all", np.ones(gen.size, bool), np.ones(imp.size, bool)),
        ("high", gq >= cut, iq >= cut),
        ("low", gq < cut, iq < cut),
    ):
        est = threshold_at_far(imp[im], far)
        out[part] = {
            "threshold": round(est.threshold, 4),
            "method": est.method,
            "n_impostor": int(im.sum()),
            "n_genuine": int(gm.sum()),
            "tar": round(tar_at(gen[gm], est.threshold), 4),
            "max_impostor": round(float(imp[im].max()), 4),
        }
    hi = out["high"]["threshold"]
    # The high-quality threshold applied to low-quality impostors: is their tail heavier?
    out["low_far_at_high_threshold"] = (
        float(np.mean(imp[iq < cut] >= hi)) if (iq < cut).any() else 0
    )
    return out


def _reembed(e: Embedded, backend, flip: bool) -> np.ndarray:
    crops = [cv2.imdecode(np.frombuffer(c, np.uint8), cv2.IMREAD_COLOR) for c in e.crops]
    plain = backend.embed(crops)
    if not flip:
        return plain
    mirrored = backend.embed([c[:, ::-1].copy() for c in crops])
    return l2_normalize(plain + mirrored)


def _fused(lives: Embedded, per_person: int, seed: int) -> Embedded:
    """One row per pair of one person's live photos: the normalised mean embedding, quality =
    the poorer of the two."""
    rng = np.random.default_rng(seed)
    by: dict[str, list[int]] = {}
    for i, p in enumerate(lives.persons):
        by.setdefault(p, []).append(i)
    rows, persons, qual = [], [], []
    for p in sorted(by):
        pairs = list(itertools.combinations(by[p], 2))
        if len(pairs) > per_person:
            pairs = [pairs[k] for k in rng.choice(len(pairs), per_person, replace=False)]
        for a, b in pairs:
            rows.append(lives.emb[a] + lives.emb[b])
            persons.append(p)
            qual.append(min(lives.quality[a], lives.quality[b]))
    n = len(rows)
    emb = l2_normalize(np.asarray(rows, np.float32).reshape(n, -1))
    return Embedded(
        emb, persons, [""] * n, np.asarray(qual, np.float32), np.zeros(n, np.float32), [b""] * n
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labelled", required=True)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude-bench", action="append", default=[])
    ap.add_argument("--far", type=float, default=1e-5)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--fusion", action="store_true")
    ap.add_argument("--pairs-per-person", type=int, default=15)
    args = ap.parse_args(argv)

    from evaluation.benchmark import BenchmarkParams

    settings = load_settings(None)
    qs = settings.quality
    cut = qs.auto_min_quality
    people = scan_labelled(args.labelled)
    excluded: set[str] = set()
    for bench in args.exclude_bench:
        excluded |= Truth.load(bench).idcard_people()
    names = sorted(p for p in people if p not in excluded)
    chips_drawn = chip_draws(people, names, BenchmarkParams(seed=args.seed))
    id_src = {p: str(src) for p, src, _ in chips_drawn}
    cache = Path(args.embeddings)
    live, ids = Embedded.load(cache / "live.npz"), Embedded.load(cache / "id.npz")
    not_src = np.array([id_src.get(p) != q for p, q in zip(live.persons, live.paths, strict=True)])
    lives = live.subset(gate_mask(live, "idcard", qs) & not_src)
    chips = ids.subset(gate_mask(ids, "idcard", qs))
    rows = [_row("plain (pipeline embeddings)", id_pair_scores(chips, lives), args.far, cut)]
    if args.flip:
        from tasks.backends import load_backend

        backend = load_backend(settings.models)
        for flip, name in ((False, "stored crops re-embedded"), (True, "stored crops + flip TTA")):
            c2 = replace(chips, emb=_reembed(chips, backend, flip))
            l2 = replace(lives, emb=_reembed(lives, backend, flip))
            rows.append(_row(name, id_pair_scores(c2, l2), args.far, cut))
    if args.fusion:
        fused = _fused(lives, args.pairs_per_person, args.seed)
        rows.append(
            _row(
                "fusion: chip vs mean of 2 live photos", id_pair_scores(chips, fused), args.far, cut
            )
        )
        # The single-photo figures on the same chips (people with >= 2 live photos only).
        keep = set(fused.persons)
        single = lives.subset(np.array([p in keep for p in lives.persons]))
        rows.append(_row("single photo, same people", id_pair_scores(chips, single), args.far, cut))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
