"""Threshold calibration: cosine thresholds for target false-accept rates, from genuine and
impostor scores built out of a labelled face set.

Pure part (:func:`threshold_at_far`, :func:`tar_at`, :func:`pair_scores`,
:func:`centroid_scores`, :func:`recommend`) works on arrays; :func:`embed_labelled` turns a
labelled folder into embeddings with the same pipeline code a refresh uses
(:func:`tasks.faces.process_images`), keeping the face nearest the image centre.

How each policy threshold is derived (see :func:`recommend`); FAR = share of impostor scores at
or above the threshold:

- ``idcard_accept``: ID-photo vs live-photo impostors at FAR ``id_far`` (default 1e-4); the ID
  photos are simulated chip crops (:func:`evaluation.benchmark.simulate_id_photo`).
- ``idcard_review``: the same pairs at FAR 1e-2 (below it: rejected without review).
- ``merge``: centroid vs centroid of two face groups (2-4 faces each), impostors at FAR 1e-5:
  every cluster is compared with every other, so the per-pair rate must be far below the share
  of wrong merges we accept.
- ``duplicate``: the same scores at FAR 1e-4 (centroids this close but below ``merge`` are
  flagged for review; with a few hundred identities about 1-3% get a false flag).
- ``attach``: one face vs another person's centroid at FAR 1e-4.
- ``outlier``: one face vs another person's centroid at FAR 1e-2 (an intruder scores below).
- ``cohesion_min``: the outlier threshold plus half the gap to the genuine face-to-centroid
  median; a pure identity's mean similarity sits well above it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from faceloop.config import PolicyThresholds
from faceloop.errors import ConfigError

log = logging.getLogger(__name__)

FAR_TARGETS = (1e-3, 1e-4, 1e-5)
# Fewest impostor scores a policy threshold is read from. An exponential tail fitted to a
# handful of scores says nothing (two ID pairs gave idcard_accept -0.098, below its own review
# floor); with fewer, `recommend` refuses and names the threshold.
MIN_IMPOSTOR_PAIRS = 100


@dataclass(frozen=True)
class ThresholdEstimate:
    """A threshold for one FAR target and how it was obtained."""

    far_target: float
    threshold: float
    method: str  # "empirical" | "exponential_tail"
    n_impostor: int
    far_measured: float  # share of impostors >= threshold (0 when extrapolated past the data)


def threshold_at_far(
    impostor: np.ndarray, far: float, min_tail: int = 5, tail_size: int = 200
) -> ThresholdEstimate:
    """Lowest threshold whose impostor share at or above it is at most ``far``.

    With at least ``min_tail`` impostors above the answer, it is read off the sorted scores
    (midway between the k-th and (k+1)-th highest, k = floor(far * n)). With fewer, an
    exponential tail is fitted to the top ``tail_size`` scores (peaks over threshold) and
    extrapolated; for the light (Gaussian-like) tails of cosine impostor scores this errs high,
    i.e. on the safe side.
    """
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    n = s.size
    if n == 0:
        raise ValueError("no impostor scores")
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    k = math.floor(far * n)
    if k >= min_tail:
        t = (s[k - 1] + s[k]) / 2 if s[k - 1] > s[k] else float(np.nextafter(s[k], np.inf))
        method = "empirical"
    else:
        m = min(tail_size, n)
        u = s[m - 1]
        beta = float(np.mean(s[:m] - u)) or 1e-6
        t = u + beta * math.log(m / (n * far))
        method = "exponential_tail"
        if k < n and t <= s[k]:
            # Never below what the pairs themselves allow: more than floor(far * n) of them
            # would pass it (a fitted tail lighter than the scores': 3 of 25,240 impostor pairs
            # passed an idcard_accept meant for 2 at most).
            t = float(np.nextafter(s[k], np.inf))
            method = "exponential_tail_capped_by_scores"
    return ThresholdEstimate(far, float(t), method, n, float(np.mean(s >= t)))


def tar_at(genuine: np.ndarray, threshold: float) -> float:
    """Share of genuine scores at or above ``threshold``."""
    g = np.asarray(genuine)
    return float(np.mean(g >= threshold)) if g.size else 0.0


def pair_scores(
    emb_a: np.ndarray,
    labels_a: Sequence[Any],
    emb_b: np.ndarray | None = None,
    labels_b: Sequence[Any] | None = None,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosine scores of all pairs. One set: pairs i < j within it; two sets
    (e.g. ID photos vs live photos): every (a, b). Embeddings must be L2-normalised."""
    la = np.asarray(labels_a)
    same_set = emb_b is None
    eb = emb_a if emb_b is None else emb_b
    lb = la if same_set else np.asarray(labels_b)
    gen, imp = [], []
    for start in range(0, len(emb_a), chunk):
        sim = emb_a[start : start + chunk] @ eb.T
        same = la[start : start + chunk, None] == lb[None, :]
        if same_set:
            rows = np.arange(start, start + sim.shape[0])[:, None]
            keep = np.arange(len(lb))[None, :] > rows
        else:
            keep = np.ones_like(same)
        gen.append(sim[keep & same])
        imp.append(sim[keep & ~same])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    return cat(gen), cat(imp)


def id_pair_scores(ids: Embedded, lives: Embedded, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Every chip vs every live face: ``genuine`` / ``impostor`` cosines and, aligned with
    them, ``genuine_quality`` / ``impostor_quality``: the lower quality of the pair's two faces
    (what a quality-aware ID threshold splits on)."""
    lp = np.asarray(lives.persons)
    gen, imp, gq, iq = [], [], [], []
    for start in range(0, len(ids.emb), chunk):
        sl = slice(start, start + chunk)
        sim = ids.emb[sl] @ lives.emb.T
        q = np.minimum(ids.quality[sl, None], lives.quality[None, :])
        same = np.asarray(ids.persons[sl])[:, None] == lp[None, :]
        gen.append(sim[same])
        imp.append(sim[~same])
        gq.append(q[same])
        iq.append(q[~same])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    return {
        "genuine": cat(gen),
        "impostor": cat(imp),
        "genuine_quality": cat(gq),
        "impostor_quality": cat(iq),
    }


def live_match_scores(
    ids: Embedded, lives: Embedded, accept: float, review: float, cut: float
) -> dict[str, Any]:
    """Scores of the several-live-photos rule (tasks/idcard.py ``idcard_live_match``) over
    triplets (chip of A, anchor: a live face of A auto on its own, other: a live face in the
    review band of that chip), pairs of good quality only:

    - ``impostor``: cosine(anchor, other) for impostor others (not A) in the band; out of
      ``n_impostor_triplets`` = every (anchor, impostor live face) combination, since an
      impostor outside the band can never pass;
    - ``genuine``: cosine(anchor, other) for other live faces of A in the band (what the rule
      can win back), ``n_genuine_band`` of them."""
    lp = np.asarray(lives.persons)
    imp: list[np.ndarray] = []
    gen: list[np.ndarray] = []
    n_trip = 0
    for a in range(len(ids.emb)):
        sim = lives.emb @ ids.emb[a]
        good = np.minimum(lives.quality, ids.quality[a]) >= cut
        same = lp == ids.persons[a]
        anchors = same & good & (sim >= accept)
        if not anchors.any():
            continue
        band = good & (sim >= review) & (sim < accept)
        n_trip += int(anchors.sum()) * int((~same).sum())
        anchor_emb = lives.emb[anchors]
        for mask, out in ((band & ~same, imp), (band & same, gen)):
            if mask.any():
                out.append((lives.emb[mask] @ anchor_emb.T).ravel())

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    return {"impostor": cat(imp), "n_impostor_triplets": n_trip, "genuine": cat(gen)}


def live_match_threshold(
    scores: dict[str, Any], far_budget: float
) -> tuple[float | None, dict[str, Any]]:
    """``idcard_live_match``: the lowest cosine at which at most ``far_budget`` of the impostor
    triplets pass (:func:`live_match_scores`), so that the rule adds at most that to the ID
    pairs' FAR; None when there is no budget or no triplet. Returns (threshold, evidence)."""
    n, imp = int(scores["n_impostor_triplets"]), scores["impostor"]
    if far_budget <= 0 or n == 0 or imp.size == 0:
        return None, {"n_impostor_triplets": n, "far_budget": far_budget}
    padded = np.concatenate([imp, np.full(n - imp.size, -1.0, np.float32)])
    est = threshold_at_far(padded, far_budget)
    return est.threshold, {
        **asdict(est),
        "n_impostor_in_band": int(imp.size),
        "far_budget": far_budget,
        "n_genuine_in_band": int(scores["genuine"].size),
        "genuine_won_back": tar_at(scores["genuine"], est.threshold),
    }


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def centroid_scores(
    emb: np.ndarray, labels: Sequence[Any], seed: int = 0, max_people: int = 1500
) -> dict[str, np.ndarray]:
    """Scores involving identity centroids, for people with at least 2 faces:

    - ``face_centroid_genuine``: a face vs the centroid of its person's other faces;
    - ``face_centroid_impostor``: a face vs centroids of other people;
    - ``centroid_genuine``: centroid vs centroid of two disjoint halves of one person (>= 4 faces);
    - ``centroid_impostor``: centroid vs centroid of two different people (groups of 2-4 faces).
    """
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)
    people = [p for p in np.unique(lab) if (lab == p).sum() >= 2]
    rng.shuffle(people)
    people = people[:max_people]
    idx = {p: np.flatnonzero(lab == p) for p in people}
    fc_gen, cc_gen = [], []
    groups = []
    for p in people:
        ii = rng.permutation(idx[p])
        fc_gen.append(float(emb[ii[0]] @ _unit(emb[ii[1:]].mean(0))))
        if len(ii) >= 4:
            h = len(ii) // 2
            cc_gen.append(float(_unit(emb[ii[:h]].mean(0)) @ _unit(emb[ii[h:]].mean(0))))
        groups.append(_unit(emb[ii[: min(len(ii), int(rng.integers(2, 5)))]].mean(0)))
    cents = np.stack(groups) if groups else np.zeros((0, emb.shape[1]), np.float32)
    cc_imp = (cents @ cents.T)[np.triu_indices(len(cents), 1)] if len(cents) > 1 else np.zeros(0)
    # Faces of each person vs every other person's centroid.
    first = np.array([idx[p][0] for p in people], dtype=int)
    fc = emb[first] @ cents.T if len(first) else np.zeros((0, 0))
    fc_imp = fc[~np.eye(len(first), dtype=bool)] if len(first) else np.zeros(0)

    def f32(x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    return {
        "face_centroid_genuine": f32(fc_gen),
        "face_centroid_impostor": f32(fc_imp),
        "centroid_genuine": f32(cc_gen),
        "centroid_impostor": f32(cc_imp),
    }


@dataclass(frozen=True)
class Calibration:
    """Recommended thresholds plus the evidence behind them (JSON-ready via :meth:`to_dict`)."""

    thresholds: PolicyThresholds
    far_table: list[dict[str, Any]]  # face-pair thresholds at FAR_TARGETS with TAR
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds.model_dump(),
            "far_table": self.far_table,
            "evidence": self.evidence,
        }


def _up3(x: float) -> float:
    """ID accept thresholds round up to 3 decimals: never above their FAR. At most 1: a
    target FAR below what the impostors can show extrapolates past the largest cosine, and
    1.0 already passes no two different faces."""
    return min(1.0, math.ceil(round(float(x) * 1000, 6)) / 1000)


def recommend(
    face_gen: np.ndarray,
    face_imp: np.ndarray,
    id_gen: np.ndarray,
    id_imp: np.ndarray,
    cents: dict[str, np.ndarray],
    id_far: float = 1e-4,
    id_quality: tuple[np.ndarray, np.ndarray, float] | None = None,
    live_match: tuple[float | None, dict[str, Any]] | None = None,
) -> Calibration:
    """Derive all policy thresholds (module docstring) and a FAR/TAR table. ``id_quality``:
    (genuine pair quality, impostor pair quality, cut) aligned with ``id_gen`` / ``id_imp``;
    with it ``idcard_accept_low_quality`` is read off the pairs below the cut at ``id_far``, and
    ``idcard_accept`` off the others at what is left of ``id_far`` x all pairs once the
    low-quality impostors passing theirs are counted: the rule that applies each pair's own
    threshold passes at most ``id_far`` of all impostor pairs. Without it both come from all
    pairs."""
    table = []
    for far in FAR_TARGETS:
        est = threshold_at_far(face_imp, far)
        table.append({**asdict(est), "tar": tar_at(face_gen, est.threshold)})
    id_all = threshold_at_far(id_imp, id_far)
    if id_quality is None:
        gen_hi = gen_lo = id_gen
        id_acc = id_low = id_all
    else:
        gq, iq, cut = id_quality
        gen_hi, gen_lo = id_gen[gq >= cut], id_gen[gq < cut]
        imp_hi, imp_lo = id_imp[iq >= cut], id_imp[iq < cut]
        if min(imp_lo.size, imp_hi.size) < MIN_IMPOSTOR_PAIRS:
            # (Nearly) every pair on one side of the cut (a small or uniform set): one threshold
            # for all, read off every pair.
            imp_lo = imp_hi = id_imp
        id_low = threshold_at_far(imp_lo, id_far)
        # One FAR for the whole rule: the good pairs get what the low-quality pairs' threshold
        # (as shipped, rounded up) leaves of id_far x all impostor pairs.
        low_passed = int(np.sum(imp_lo >= _up3(max(id_low.threshold, 0.0))))
        budget = max(math.floor(id_far * id_imp.size) - low_passed, 0) / max(imp_hi.size, 1)
        # No whole pair of the budget left (fewer than 1 / id_far pairs, or the low-quality
        # pairs took it): the good pairs at id_far themselves, read off their tail. Falling back
        # to the low-quality pairs' threshold wrote one that passed no genuine pair.
        id_acc = threshold_at_far(imp_hi, budget if budget > 0 else id_far)
    id_rev = threshold_at_far(id_imp, 1e-2)
    merge = threshold_at_far(cents["centroid_impostor"], 1e-5)
    dup = threshold_at_far(cents["centroid_impostor"], 1e-4)
    attach = threshold_at_far(cents["face_centroid_impostor"], 1e-4)
    outlier = threshold_at_far(cents["face_centroid_impostor"], 1e-2)
    fcg = cents["face_centroid_genuine"]
    median_gen = float(np.median(fcg)) if fcg.size else outlier.threshold
    cohesion = outlier.threshold + max(0.0, median_gen - outlier.threshold) / 2

    def r3(x: float) -> float:
        return min(1.0, round(float(x), 3))  # at most 1, as _up3

    up3 = _up3
    # A threshold the impostor pairs cannot support: read off fewer than MIN_IMPOSTOR_PAIRS
    # scores, or extrapolated past cosine 1 (too few pairs of different people for its FAR: it
    # would be written as 1.0 and pass no one).
    short = {
        name: est
        for name, est in (
            ("merge", merge),
            ("duplicate", dup),
            ("attach", attach),
            ("outlier", outlier),
            ("idcard_accept", id_acc),
            ("idcard_accept_low_quality", id_low),
            ("idcard_review", id_rev),
        )
        if est.threshold >= 1.0 or est.n_impostor < MIN_IMPOSTOR_PAIRS
    }
    if live_match is not None and live_match[0] is not None and live_match[0] >= 1.0:
        # (written as 1.0 it vouched for no one, silently)
        short["idcard_live_match"] = ThresholdEstimate(id_far, float(live_match[0]), "", 0, 0.0)
    if short:
        raise ConfigError(
            "too few pairs of different people to estimate "
            + ", ".join(
                f"{n} (FAR {e.far_target:g} over {e.n_impostor} pairs: {e.threshold:.2f})"
                for n, e in short.items()
            )
            + f" (at least {MIN_IMPOSTOR_PAIRS} pairs each): calibrate on more people (a larger "
            "labelled set, a higher --max-people)"
        )

    th = PolicyThresholds(
        merge=r3(merge.threshold),
        cohesion_min=r3(cohesion),
        outlier=r3(outlier.threshold),
        duplicate=r3(dup.threshold),
        idcard_accept=up3(id_acc.threshold),
        idcard_accept_low_quality=up3(max(id_low.threshold, id_acc.threshold)),
        idcard_review=r3(id_rev.threshold),
        idcard_live_match=None
        if live_match is None or live_match[0] is None
        else up3(live_match[0]),
        attach=r3(attach.threshold),
    )
    if th.idcard_review > th.idcard_accept:  # the config refuses it: say so before writing
        raise ConfigError(
            f"the ID pairs give idcard_review {th.idcard_review} above idcard_accept "
            f"{th.idcard_accept} ({id_imp.size} impostor / {id_gen.size} genuine pairs): "
            "calibrate on more people"
        )
    ev = {
        "counts": {
            "face_genuine": int(face_gen.size),
            "face_impostor": int(face_imp.size),
            "id_genuine": int(id_gen.size),
            "id_impostor": int(id_imp.size),
            **{k: int(v.size) for k, v in cents.items()},
        },
        "idcard_accept": {
            **asdict(id_acc),
            "n_genuine": int(gen_hi.size),
            "tar": tar_at(gen_hi, id_acc.threshold),
        },
        "idcard_accept_low_quality": {
            **asdict(id_low),
            "n_genuine": int(gen_lo.size),
            "tar": tar_at(gen_lo, id_low.threshold),
        },
        "idcard_accept_all_pairs": {
            **asdict(id_all),
            "n_genuine": int(id_gen.size),
            "tar": tar_at(id_gen, id_all.threshold),
        },
        "idcard_live_match": None if live_match is None else live_match[1],
        "idcard_review": {
            **asdict(id_rev),
            "n_genuine": int(id_gen.size),
            "tar": tar_at(id_gen, id_rev.threshold),
        },
        "merge": {**asdict(merge), "tar": tar_at(cents["centroid_genuine"], merge.threshold)},
        "duplicate": {**asdict(dup), "tar": tar_at(cents["centroid_genuine"], dup.threshold)},
        "attach": {**asdict(attach), "tar": tar_at(fcg, attach.threshold)},
        "outlier": {**asdict(outlier), "genuine_flagged": 1 - tar_at(fcg, outlier.threshold)},
        "cohesion_min": {"genuine_face_centroid_median": median_gen},
    }
    return Calibration(th, table, ev)


def write_calibrated_config(
    path: str | Path,
    backend: str,
    cal: Calibration,
    header: str,
    extra: dict[str, Any] | None = None,
    recognizer: str | None = None,
    recognizer_file: tuple[str, str | None] | None = None,
) -> None:
    """Write ``policy: {key: thresholds}`` (plus any ``extra`` top-level settings) as a YAML
    settings file that ``--config`` accepts, with ``header`` (how the numbers were obtained) as
    a comment, plus the evidence. ``recognizer``: the built-in recognizer calibrated (its name
    is the policy key), None for the backend's own (written as ``models.recognizer: null``, so
    the file keeps meaning that recognizer whatever the default is). ``repair``,
    ``repair_floor`` and ``pair_floor`` are not calibrated: the recognizer's defaults stay.
    ``recognizer_file``: (path, sha256) of a recognizer that is neither built in nor the
    backend's own (``models.recognizer`` names it, so that the file keeps meaning the
    recognizer it was calibrated on)."""
    lines = ["# " + ln if ln else "#" for ln in header.strip().splitlines()]
    models: dict[str, Any] = {"backend": backend, "recognizer": recognizer}
    if recognizer is None and recognizer_file is not None:
        models["recognizer"] = recognizer_file[0]
        if recognizer_file[1]:
            models["recognizer_sha256"] = recognizer_file[1]
    body = yaml.safe_dump(
        {
            "models": models,
            **(extra or {}),
            # Only what was measured: the rest (repair, repair_floor, pair_floor) stays the
            # recognizer's default; written as 0.0 they had switched split repair and leftover
            # pairing off for a calibrated EdgeFace-S.
            "policy": {
                recognizer or backend: cal.thresholds.model_dump(
                    exclude_unset=True, exclude={"repair", "repair_floor", "pair_floor"}
                )
            },
        },
        sort_keys=False,
    )
    ev = yaml.safe_dump({"far_table": cal.far_table, "evidence": cal.evidence}, sort_keys=False)
    text = (
        "\n".join(lines)
        + "\n"
        + body
        + "\n# Evidence (not read by faceloop):\n"
        + "\n".join("# " + ln for ln in ev.splitlines())
        + "\n"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


@dataclass
class Embedded:
    """Central faces of labelled images as the pipeline embeds them, with what the levers of a
    calibration need besides the embedding: the face's quality and size (for quality-aware
    thresholds and the album gate) and its aligned crop as stored (for re-embedding levers such
    as flip test-time augmentation). Saved to / loaded from one ``.npz`` (no pickles)."""

    emb: np.ndarray  # (N, D) float32, L2-normalised
    persons: list[str]
    paths: list[str]
    quality: np.ndarray  # (N,) float32
    face_px: np.ndarray  # (N,) float32, shorter bbox side
    crops: list[bytes]  # aligned 112x112 crops, JPEG as the faces table stores them

    def subset(self, mask: np.ndarray) -> Embedded:
        keep = np.flatnonzero(np.asarray(mask, dtype=bool))
        return Embedded(
            self.emb[keep],
            [self.persons[i] for i in keep],
            [self.paths[i] for i in keep],
            self.quality[keep],
            self.face_px[keep],
            [self.crops[i] for i in keep],
        )

    def save(self, path: str | Path) -> None:
        blob = np.frombuffer(b"".join(self.crops), dtype=np.uint8)
        ends = np.cumsum([len(c) for c in self.crops], dtype=np.int64)
        np.savez(
            path,
            emb=self.emb,
            persons=np.asarray(self.persons, dtype=str),
            paths=np.asarray(self.paths, dtype=str),
            quality=self.quality,
            face_px=self.face_px,
            crops=blob,
            crop_ends=ends,
        )

    @classmethod
    def load(cls, path: str | Path) -> Embedded:
        with np.load(path) as z:
            ends = z["crop_ends"].tolist()
            blob = z["crops"].tobytes()
            starts = [0, *ends[:-1]]
            return cls(
                z["emb"].astype(np.float32),
                [str(p) for p in z["persons"]],
                [str(p) for p in z["paths"]],
                z["quality"].astype(np.float32),
                z["face_px"].astype(np.float32),
                [blob[a:b] for a, b in zip(starts, ends, strict=True)],
            )


def embed_labelled(
    images: Sequence[tuple[str, Path, str]], settings: Any, backend: Any, batch: int = 32
) -> Embedded:
    """Embed the central face of each ``(person, path, role)`` with the pipeline's own
    per-image code. ``id`` and ``live`` roles are processed as ID-card photos, others as album
    photos. Every central face gets an embedding, gated or not (``models.embed_gated``): the
    caller applies the gate it calibrates for (:func:`album_gate_mask`). Images where no
    central face was found are skipped (and counted in the log)."""
    from evaluation.benchmark import central_face_index
    from tasks.faces import process_images

    settings = settings.model_copy(deep=True)
    settings.models.embed_gated = True
    embs, persons, paths, qual, pxs, crops = [], [], [], [], [], []
    missed = 0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        rows = [
            {
                "image_uri": str(p),
                "image_sha256": "",
                "source_kind": "idcard" if role in ("id", "live") else "album",
                "source_group": person,
                "role": role,
                "run_id": "calibrate",
            }
            for person, p, role in chunk
        ]
        out = process_images(rows, backend, settings)
        by_uri: dict[str, list[dict]] = {}
        for r in out:
            if r.get("face_index", -1) >= 0:
                by_uri.setdefault(r["image_uri"], []).append(r)
        for person, p, _ in chunk:
            faces = by_uri.get(str(p), [])
            if not faces:
                missed += 1
                continue
            size = (faces[0]["width"], faces[0]["height"])
            k = central_face_index([f["bbox"] for f in faces], size)
            if k is None or faces[k].get("embedding") is None:
                missed += 1
                continue
            f = faces[k]
            embs.append(f["embedding"])
            persons.append(person)
            paths.append(str(p))
            qual.append(f["quality"])
            pxs.append(f["face_px"])
            crops.append(bytes(f["aligned_jpeg"]))
    log.info("embedded %d images, %d without a central face", len(embs), missed)
    return Embedded(
        np.asarray(embs, dtype=np.float32).reshape(len(embs), -1),
        persons,
        paths,
        np.asarray(qual, dtype=np.float32),
        np.asarray(pxs, dtype=np.float32),
        crops,
    )


def chip_draws(
    people: dict[str, list[Path]], names: Sequence[str], params: Any
) -> list[tuple[str, Path, int]]:
    """(person, source image, JPEG quality) of one simulated chip per person of ``names`` with
    at least two images (the others are live photos), drawn from ``params.seed``."""
    import random

    rng = random.Random(params.seed + 1)  # apart from the --max-people shuffle of the seed
    return [
        (p, rng.choice(people[p]), rng.randint(*params.id_quality))
        for p in names
        if len(people[p]) >= 2
    ]


def gate_mask(e: Embedded, source_kind: str, quality_settings: Any) -> np.ndarray:
    """Faces the pipeline's gate (:func:`tasks.quality.gate`) lets through for ``source_kind``:
    album pairs and centroids are calibrated on what album clustering sees (size and quality
    gate), ID pairs on what the ID-card rules see (size gate only)."""
    from tasks.quality import gate

    return np.array(
        [
            gate(source_kind, float(px), float(q), quality_settings) is None
            for px, q in zip(e.face_px, e.quality, strict=True)
        ],
        dtype=bool,
    )
