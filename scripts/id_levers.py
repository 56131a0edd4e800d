"""Score-level ID-card levers on the faces a `faceloop calibrate --embeddings DIR` run cached.

    PYTHONPATH=$PWD .venv/bin/python scripts/id_levers.py --labelled LFW --embeddings DIR \
        [--seed 0] [--exclude-bench BENCH ...] [--far 1e-5] [--flip] [--fusion] \
        [--second opencv|FILE.onnx [--weights 0.4,0.5] [--album-pairs]]

Same people, chips and ID pairs as that calibrate run (pass the same --labelled, --seed and
--exclude-bench). For each lever: the ID-pair threshold at FAR ``--far`` read off its own
impostor scores (all pairs; pairs whose faces both reach quality.idcard_low_quality; the others),
the impostor count behind it and the genuine share at or above it. How the ID-card ablation in
docs/QUALITY.md was measured.

- plain: the pipeline's embeddings (what calibrate uses).
- ``--flip``: the stored aligned crops re-embedded as they are and as the mean of the crop and its
  mirror image (flip test-time augmentation), both from the same JPEG crops, so the two differ
  only by the flip.
- ``--second opencv|FILE.onnx`` (ArcFace's ONNX convention, fed as
  ``training.infer.onnx_embed_fn`` feeds a registered recognizer): a second recognizer on the
  stored crops, alone and fused with the pipeline's by concatenating the two
  unit embeddings scaled by sqrt(w) and sqrt(1 - w) (cosine = w * cos1 + (1 - w) * cos2) for each
  ``--weights`` w; ``--album-pairs`` adds album face and centroid pairs for the same levers.
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


def fuse_embeddings(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Concatenation of two recognizers' unit embeddings scaled by sqrt(w) and sqrt(1 - w): a
    unit vector whose cosine with another such vector is ``w * cos_a + (1 - w) * cos_b``."""
    return np.concatenate(
        [np.sqrt(w) * l2_normalize(a), np.sqrt(1.0 - w) * l2_normalize(b)], axis=1
    ).astype(np.float32)


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


def _album_rows(settings, live: Embedded, second, weights: str) -> list[dict]:
    """Face-pair and centroid-pair thresholds at FAR 1e-4 / 1e-5 and the genuine share above
    them for the pipeline's recognizer (crops re-embedded without flip, as album faces are),
    the second one and their fusions; the genuine 1st / 5th percentiles."""
    from evaluation.calibrate import centroid_scores, pair_scores
    from tasks.backends import load_backend

    album = live.subset(gate_mask(live, "album", settings.quality))
    first = _reembed(album, load_backend(settings.models), False)
    other = _reembed(album, second, False)
    levers = [("pipeline recognizer", first), ("second recognizer", other)]
    levers += [
        (f"fused x {w}", fuse_embeddings(first, other, w))
        for w in (float(x) for x in weights.split(","))
    ]
    out = []
    for name, e in levers:
        gen, imp = pair_scores(e, album.persons)
        row: dict = {
            "lever": f"album faces: {name}",
            "n_genuine": int(gen.size),
            "n_impostor": int(imp.size),
            "genuine_p01": round(float(np.quantile(gen, 0.01)), 4),
            "genuine_p05": round(float(np.quantile(gen, 0.05)), 4),
        }
        cs = centroid_scores(e, album.persons)
        for far in (1e-4, 1e-5):
            t = threshold_at_far(imp, far).threshold
            tc = threshold_at_far(cs["centroid_impostor"], far).threshold
            row[f"face_far_{far:g}"] = {"threshold": round(t, 4), "tar": round(tar_at(gen, t), 4)}
            row[f"centroid_far_{far:g}"] = {
                "threshold": round(tc, 4),
                "tar": round(tar_at(cs["centroid_genuine"], tc), 4),
            }
        out.append(row)
    return out


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
    ap.add_argument(
        "--second",
        help="a second recognizer on the stored crops, alone and fused: opencv (the opencv "
        "backend's SFace) or the path of an ArcFace-convention ONNX file (112x112 RGB, "
        "(x - 127.5) / 127.5)",
    )
    ap.add_argument(
        "--album-pairs",
        action="store_true",
        help="with --second: also album face pairs and centroids (faces the album gate passes)",
    )
    ap.add_argument("--weights", default="0.3,0.4,0.5,0.6,0.7")
    args = ap.parse_args(argv)

    from evaluation.benchmark import BenchmarkParams

    settings = load_settings(None)
    qs = settings.quality
    cut = qs.idcard_low_quality
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
    if args.second:
        from tasks.backends import load_backend

        if args.second == "opencv":
            m2 = settings.models.model_copy(update={"backend": "opencv", "recognizer": None})
            second = load_backend(m2)
        else:  # preprocessed as the pipeline re-embeds with a registered recognizer
            from types import SimpleNamespace

            from training.infer import onnx_embed_fn

            second = SimpleNamespace(embed=onnx_embed_fn(args.second))
        both = {}
        for flip in (False, True):
            c2 = _reembed(chips, second, flip)
            l2 = _reembed(lives, second, flip)
            both[flip] = (c2, l2)
            tag = "flip TTA" if flip else "plain"
            rows.append(
                _row(
                    f"{args.second} recognizer alone, {tag}",
                    id_pair_scores(replace(chips, emb=c2), replace(lives, emb=l2)),
                    args.far,
                    cut,
                )
            )
        for w in (float(x) for x in args.weights.split(",")):
            c2, l2 = both[True]
            rows.append(
                _row(
                    f"fused: pipeline x {w} + {args.second} (flip) x {1 - w:.2f}",
                    id_pair_scores(
                        replace(chips, emb=fuse_embeddings(chips.emb, c2, w)),
                        replace(lives, emb=fuse_embeddings(lives.emb, l2, w)),
                    ),
                    args.far,
                    cut,
                )
            )
        if args.album_pairs:
            rows.extend(_album_rows(settings, live, second, args.weights))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
