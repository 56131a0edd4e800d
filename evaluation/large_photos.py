"""Faces in large photos: what the second detector pass (``models.det_fine_size``) finds.

LFW photos are 250x250 and the hard benchmark's are at most ~750 px wide, so neither shows what
happens to a phone photo (4000x3000) or a web photo of a full-body shot (1600-2400 px): the
detector sees every photo letterboxed to ``models.det_size`` (640), which shrinks a 4000 px
photo 6x, and SCRFD finds faces down to ~25 px at its input. This module measures it:

- each trial takes one photo of a labelled folder (``<dir>/<person>/<img>``), scales it so that
  its face is ``face`` px tall (LFW faces are ~110 px of 250) and pastes it at a random place in
  the upper half of a ``W x H`` canvas whose background is another photo of the folder, blown up
  and blurred (a scene, not a flat colour);
- the face counts as found when a detection's centre lies within half a face of the pasted
  face's centre;
- for every found face, the cosine between its embedding (aligned from the canvas) and the same
  photo's face embedded from the original photo: whether the face found is usable, not just
  boxed.

Both settings run on the same canvases: ``det_fine_size`` 0 (one pass at ``det_size``) and the
configured fine pass. CPU milliseconds per image are the detector's (``time.process_time``).
Counts, rates and cosines only: no image, name or crop is printed or written.

Run: ``python -m evaluation.large_photos --labelled DIR [--trials 30] [--json]`` (~5 minutes on
2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# 1280x960: the largest photo that gets one pass with the default models.det_fine_above.
CANVASES = ((1280, 960), (1600, 1200), (2400, 1800), (4000, 3000))
FACE_PX = (32, 48, 64, 96, 160)
LFW_FACE_OF_250 = 110.0  # an LFW face is ~110 px tall in its 250 px photo


def _canvas(
    photos: list[Path], rng: random.Random, size: tuple[int, int], face_px: int
) -> tuple[np.ndarray, Path, tuple[float, float], float]:
    """(BGR canvas, the pasted photo, its face centre on the canvas, the paste scale)."""
    from PIL import Image, ImageFilter

    w, h = size
    with Image.open(photos[rng.randrange(len(photos))]) as bg_im:
        bg = bg_im.convert("RGB").resize((w, h)).filter(ImageFilter.GaussianBlur(8))
    src_path = photos[rng.randrange(len(photos))]
    with Image.open(src_path) as src_im:
        src = src_im.convert("RGB")
    k = face_px / (LFW_FACE_OF_250 * src.height / 250.0)
    small = src.resize((max(8, round(src.width * k)), max(8, round(src.height * k))))
    x, y = rng.randrange(0, w - small.width), rng.randrange(0, h // 2)
    bg.paste(small, (x, y))
    centre = (x + small.width / 2.0, y + small.height / 2.0)
    return np.asarray(bg)[:, :, ::-1].copy(), src_path, centre, k


def _found(boxes: np.ndarray, centre: tuple[float, float], face_px: float) -> int | None:
    """Index of the detection whose centre is nearest ``centre``, within half a face; None."""
    if len(boxes) == 0:
        return None
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    d = np.hypot(cx - centre[0], cy - centre[1])
    i = int(np.argmin(d))
    return i if d[i] < face_px / 2.0 else None


def measure(
    labelled: Path,
    trials: int = 30,
    seed: int = 0,
    canvases: tuple[tuple[int, int], ...] = CANVASES,
    face_px: tuple[int, ...] = FACE_PX,
) -> list[dict[str, Any]]:
    """One row per (canvas, face size): found share and detector ms per image for one pass and
    for the fine pass, and the median cosine of found faces to their source photo's face."""
    import cv2

    from evaluation.benchmark import central_face_index, scan_labelled
    from faceloop.config import load_settings
    from tasks.align import align_face
    from tasks.backends import load_backend

    models = load_settings(None).models
    fine = load_backend(models)
    one = load_backend(models.model_copy(update={"det_fine_size": 0}))
    photos = [p for paths in scan_labelled(labelled).values() for p in paths]
    if len(photos) < 2:
        raise SystemExit(f"{labelled}: no photos in <dir>/<person>/<img>")
    rng = random.Random(seed)
    ref_cache: dict[Path, np.ndarray | None] = {}

    def reference(p: Path) -> np.ndarray | None:
        """The embedding of the original photo's scored face (the benchmarks' truth rule)."""
        if p not in ref_cache:
            bgr = cv2.imread(str(p))
            if bgr is None:
                ref_cache[p] = None
                return None
            d = fine.detect(bgr)
            i = central_face_index(d.boxes.tolist(), (bgr.shape[1], bgr.shape[0]))
            ref_cache[p] = None if i is None else fine.embed([align_face(bgr, d.landmarks[i])])[0]
        return ref_cache[p]

    rows = []
    for size in canvases:
        for px in face_px:
            hits = {"one pass": 0, "fine pass": 0}
            ms = {"one pass": 0.0, "fine pass": 0.0}
            cos: list[float] = []
            for _ in range(trials):
                bgr, src, centre, _ = _canvas(photos, rng, size, px)
                for name, backend in (("one pass", one), ("fine pass", fine)):
                    t0 = time.process_time()
                    d = backend.detect(bgr)
                    ms[name] += (time.process_time() - t0) * 1000.0
                    i = _found(d.boxes, centre, px)
                    if i is None:
                        continue
                    hits[name] += 1
                    ref = reference(src)
                    if name == "fine pass" and ref is not None:
                        emb = fine.embed([align_face(bgr, d.landmarks[i])])[0]
                        cos.append(float(emb @ ref))
            rows.append(
                {
                    "canvas": f"{size[0]}x{size[1]}",
                    "face_px": px,
                    "trials": trials,
                    "found_one_pass": hits["one pass"] / trials,
                    "found_fine_pass": hits["fine pass"] / trials,
                    "ms_one_pass": ms["one pass"] / trials,
                    "ms_fine_pass": ms["fine pass"] / trials,
                    "cosine_to_source_median": float(np.median(cos)) if cos else None,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.large_photos", description=__doc__)
    ap.add_argument("--labelled", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = measure(args.labelled, args.trials, args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        "| canvas | face px | found: one pass / fine pass | detector ms per image: one / fine "
        "| cosine to the source photo's face (median, fine pass) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        c = r["cosine_to_source_median"]
        print(
            f"| {r['canvas']} | {r['face_px']} | {r['found_one_pass']:.2f} / "
            f"{r['found_fine_pass']:.2f} | {r['ms_one_pass']:.0f} / {r['ms_fine_pass']:.0f} | "
            f"{'-' if c is None else f'{c:.3f}'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
