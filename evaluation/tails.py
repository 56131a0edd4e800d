"""How the synthetic embeddings of the scale bench compare with a real recognizer's, in the tails.

``faceloop bench --scale`` measures merge precision on synthetic stores
(:mod:`evaluation.synthetic`). Whether that figure says anything about real data depends on the
*upper tail* of impostor similarity at the level the merge works on: per-album cluster centroids,
not single faces. This module puts the two side by side on the same face counts:

- **real**: the central face of each image of a labelled folder (folder per person), embedded
  with the pipeline's own code (:func:`evaluation.calibrate.embed_labelled`), people with at
  least two images;
- **synthetic**: as many people with the same number of faces each, drawn by the generator the
  scale bench uses; each face from its own shifted centre (a labelled folder's photos are
  separate events, as a person's albums are in the bench).

For each side: face-level genuine and impostor cosines, the cosine of two disjoint half-centroids
of one person (people with >= 4 faces), and impostor cosines between whole-person centroids;
mean, standard deviation, upper quantiles down to 1e-6 where the pair count allows, and the
maximum. Cosines only: no image, name or crop is printed.

Run: ``python -m evaluation.tails --labelled DIR [--cache FILE.npz] [--json]``. Embedding 6,671
lfw-dev images takes ~10 minutes on 2 cores; ``--cache`` keeps them (an ``Embedded`` npz, which
holds biometric data: keep it out of the repository and delete it after use).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from faceloop.arrays import l2_normalize

TAIL_QUANTILES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def summarize(scores: np.ndarray) -> dict[str, float]:
    """n, mean, std, the 1% quantile from below (``low0.01``, n >= 100), the upper quantiles of
    :data:`TAIL_QUANTILES` that at least one score exceeds in expectation (``q1e-05``: the score
    above which 1e-5 of them lie), and max."""
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(x)
    out: dict[str, float] = {"n": float(n)}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    out["std"] = float(x.std())
    if n >= 100:
        out["low0.01"] = float(x[int(n * 0.01)])  # the lower tail: what a threshold loses
    for q in TAIL_QUANTILES:
        if n * q >= 1:
            out[f"q{q:g}"] = float(x[min(n - 1, int(n * (1 - q)))])
    out["max"] = float(x[-1])
    return out


def tail_stats(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, dict[str, float]]:
    """Face- and centroid-level genuine / impostor summaries of unit embeddings ``emb`` with
    person ``labels`` (every person should have >= 2 faces). Memory: one n x n float32 matrix."""
    emb = l2_normalize(np.asarray(emb, dtype=np.float32))
    labels = np.asarray(labels)
    iu = np.triu_indices(len(emb), 1)
    sim = (emb @ emb.T)[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    out = {"face_genuine": summarize(sim[same]), "face_impostor": summarize(sim[~same])}
    del sim, same
    rng = np.random.default_rng(seed)
    people = np.unique(labels)
    half_a, half_b, whole = [], [], []
    for p in people:
        idx = np.flatnonzero(labels == p)
        whole.append(emb[idx].sum(0))
        if len(idx) >= 4:
            idx = rng.permutation(idx)
            h = len(idx) // 2
            half_a.append(emb[idx[:h]].sum(0))
            half_b.append(emb[idx[h : 2 * h]].sum(0))
    if half_a:
        a, b = l2_normalize(np.stack(half_a)), l2_normalize(np.stack(half_b))
        out["half_centroid_genuine"] = summarize(np.sum(a * b, axis=1))
    c = l2_normalize(np.stack(whole))
    out["centroid_impostor"] = summarize((c @ c.T)[np.triu_indices(len(c), 1)])
    return out


def synthetic_like(labels: np.ndarray, seed: int = 0, dim: int = 512) -> np.ndarray:
    """Synthetic faces with the same people and face counts as ``labels`` (rows in the same
    order): the scale bench's generator, each face around its own shifted centre."""
    from evaluation.synthetic import random_centres, sample_faces, shift_centres

    rng = np.random.default_rng(seed)
    people, inv = np.unique(np.asarray(labels), return_inverse=True)
    centres = random_centres(len(people), dim, rng)
    shifted = shift_centres(centres[inv], rng)
    quality = rng.uniform(0.3, 1.0, len(inv)).astype(np.float32)
    return np.stack([sample_faces(shifted[i], quality[i : i + 1], rng)[0] for i in range(len(inv))])


def compare(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """``{"real": tail_stats(emb), "synthetic": tail_stats(synthetic_like(labels))}``."""
    labels = np.asarray(labels)
    return {
        "people": len(np.unique(labels)),
        "faces": len(labels),
        "real": tail_stats(emb, labels, seed),
        "synthetic": tail_stats(synthetic_like(labels, seed, emb.shape[1]), labels, seed),
    }


def format_table(result: dict[str, Any]) -> str:
    cols = ["n", "mean", "std", "low0.01", *(f"q{q:g}" for q in TAIL_QUANTILES), "max"]
    lines = [
        f"{result['people']} people, {result['faces']} faces",
        "| scores | side | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for key in result["real"]:
        for side in ("real", "synthetic"):
            row = result[side].get(key, {})
            cells = [
                ("" if c not in row else f"{int(row[c]):,}" if c == "n" else f"{row[c]:.4f}")
                for c in cols
            ]
            lines.append(f"| {key} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _embed(labelled: Path, cache: Path | None, config: str | None) -> tuple[np.ndarray, np.ndarray]:
    from evaluation.benchmark import scan_labelled
    from evaluation.calibrate import Embedded, embed_labelled

    if cache is not None and cache.exists():
        e = Embedded.load(cache)
    else:
        from faceloop.config import load_settings
        from tasks.backends import load_backend

        settings = load_settings(config)
        people = scan_labelled(labelled)
        images = [(p, f, "album") for p, paths in people.items() if len(paths) >= 2 for f in paths]
        e = embed_labelled(images, settings, load_backend(settings.models))
        if cache is not None:
            e.save(cache)
    labels = np.asarray(e.persons)
    people, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, people[counts >= 2])
    return e.emb[keep], labels[keep]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.tails", description=__doc__)
    p.add_argument("--labelled", type=Path, required=True, help="folder per person")
    p.add_argument("--cache", type=Path, help="embeddings npz to reuse / write (biometric data)")
    p.add_argument("--config", help="faceloop config (models); default: the package defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    emb, labels = _embed(args.labelled, args.cache, args.config)
    result = compare(emb, labels, args.seed)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
