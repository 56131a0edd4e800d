"""Build a small, deterministic sample input from face photos that installed packages ship.

Albums are made of augmented copies (crop, flip, light, small rotation, recompression) of the
sample photos, so the same few people recur across photos and albums, as in a real photo
library. ID-card subjects get a tight, small, recompressed "chip photo" crop of one person
(102x126, like a Chinese 2nd-generation ID card) and live photos centred on that person; one
subject is an impostor (live photos of someone else). The samples hold one photo of most people,
so subjects S001 and S002's live photos are crops of the very photo their chip was cut from: the
ID picture itself, which the label stage sends to review (``idcard_live_rephotographed``) when
its pixel test finds it (`make demo`: 3 of the 4; one of S001's, shrunk and turned, scores 0.71
against 0.75 and is accepted); S004's live photo is another photo of its person (Yao Ming among
the players), a genuine capture. A
``broken`` album holds one file of each kind of bad input, and one file breaks the layout.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from faceloop.errors import ConfigError
from faceloop.samples import sample_photos

log = logging.getLogger(__name__)

ID_CHIP_SIZE = (102, 126)  # width, height of a 2nd-generation ID card chip photo


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def w(self) -> float:
        return self.x2 - self.x1

    @property
    def h(self) -> float:
        return self.y2 - self.y1

    @property
    def cx(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def cy(self) -> float:
        return (self.y1 + self.y2) / 2


def _save_jpeg(img: Image.Image, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, format="JPEG", quality=quality)


def augment(img: Image.Image, rng: np.random.Generator, *, max_crop: float = 0.08) -> Image.Image:
    """A plausible different shot of the same scene: crop, flip, light, slight rotation."""
    w, h = img.size
    dx0, dx1, dy0, dy1 = (rng.uniform(0, max_crop, 4) * np.array([w, w, h, h])).astype(int)
    out = img.crop((dx0, dy0, w - dx1, h - dy1))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = out.rotate(
        float(rng.uniform(-6, 6)),
        resample=Image.Resampling.BILINEAR,
        expand=False,
        fillcolor=(128, 128, 128),
    )
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.75, 1.25)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.8, 1.2)))
    scale = float(rng.uniform(0.8, 1.1))
    out = out.resize(
        (max(32, int(out.width * scale)), max(32, int(out.height * scale))),
        Image.Resampling.BILINEAR,
    )
    return out


def crop_around(img: Image.Image, box: Box, margin: float) -> Image.Image:
    """Crop ``margin`` face-sizes around ``box`` (clamped to the image)."""
    m = margin * max(box.w, box.h)
    return img.crop(
        (
            int(max(0, box.x1 - m)),
            int(max(0, box.y1 - m)),
            int(min(img.width, box.x2 + m)),
            int(min(img.height, box.y2 + m)),
        )
    )


def chip_photo(img: Image.Image, box: Box, quality: int = 70) -> Image.Image:
    """A tight, small, recompressed ID chip photo of the face in ``box``."""
    cw, ch = ID_CHIP_SIZE
    # Chip photos show head and a little shoulder: a box ~1.3x the face, at the chip's aspect.
    bw = box.w * 1.35
    bh = bw * ch / cw
    cx, cy = box.cx, box.cy + 0.05 * box.h
    crop = img.crop((int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2)))
    crop = crop.resize(ID_CHIP_SIZE, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    crop.convert("RGB").save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def face_boxes(img: Image.Image, detect: Callable[[np.ndarray], Any]) -> list[Box]:
    """Boxes of faces in ``img`` (RGB PIL) from ``detect(bgr) -> object with .boxes``, left to "
    "right."""
    bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])
    boxes = [Box(*map(float, b[:4])) for b in detect(bgr).boxes]
    return sorted(boxes, key=lambda b: b.cx)


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file of each kind of bad input; returns file name -> expected reason code."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_bytes.jpg").write_bytes(b"")
    # Big enough that the cut falls in the scan data, not the header: a real truncated download.
    good = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) * 2 // 3])
    (folder / "not_an_image.jpg").write_bytes(b"this is a text file, not a photo\n" * 20)
    # A tiny file whose header claims 100 Mpx: decoding it would take ~300 MB.
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png", format="PNG", optimize=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(
        folder / "noise_no_face.png"
    )
    (folder / "notes.txt").write_text("not an image extension\n")
    return {
        "zero_bytes.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "not_an_image.jpg": "not_an_image",
        "bomb.png": "decompression_bomb",
        "noise_no_face.png": "no_face",
        "notes.txt": "unsupported_extension",
    }


def build_demo_inputs(
    out: Path,
    detect: Callable[[np.ndarray], Any],
    *,
    seed: int = 0,
    copies: int = 5,
    bad_files: bool = True,
) -> dict:
    """Write ``out/albums/<album>/*.jpg`` and ``out/idcards/<subject>/{id,live*}.jpg``.

    ``detect`` is a face backend's ``detect`` (used to find people to centre crops on).
    Returns a description with the truth the builder knows (which person each ID subject is,
    which subjects are impostors, which bad files to expect).
    """
    if copies < 1:
        raise ConfigError(f"copies must be >= 1 (augmented copies per photo), not {copies}")
    rng = np.random.default_rng(seed)
    photos = {
        k: Image.open(p).convert("RGB") for k, p in sample_photos().items() if k != "tom_hanks"
    }
    albums = out / "albums"
    idcards = out / "idcards"
    t1 = photos["t1"]
    t1_faces = face_boxes(t1, detect)
    yao_box = max(face_boxes(photos["yaoming"], detect), key=lambda b: b.w * b.h)

    def album(name: str, sources: list[Image.Image], n: int) -> None:
        for i in range(n):
            for j, src in enumerate(sources):
                _save_jpeg(
                    augment(src, rng),
                    albums / name / f"{name}_{j}_{i:02d}.jpg",
                    quality=int(rng.integers(80, 95)),
                )

    # A family album: the same six people in every shot, and one shot from across the room, out
    # of focus: faces of ~20 px too poor to label (rejected as low_quality, never embedded).
    album("family", [t1], copies)
    far = t1.resize((t1.width // 5, t1.height // 5), Image.Resampling.LANCZOS)
    _save_jpeg(far.filter(ImageFilter.GaussianBlur(2.0)), albums / "family" / "family_far.jpg")
    # A basketball album: Yao Ming portraits and team photos with Yao among the players.
    album("basketball", [photos["yaoming"], photos["players"]], max(2, copies // 2 + 1))
    # A party album: the left half of t1 (three of the family) and an unrelated group photo, so
    # some people recur across albums and must merge into one identity.
    left = crop_around(t1, Box(t1_faces[0].x1, t1_faces[0].y1, t1_faces[2].x2, t1_faces[2].y2), 0.6)
    album("party", [left, photos["gdp"]], max(2, copies // 2 + 1))

    truth: dict = {"idcard_subjects": {}, "bad_files": {}}
    subjects = [("S001", 0, 0), ("S002", 3, 3), ("S003", 1, 4)]  # (subject, id person, live person)
    for subject, id_person, live_person in subjects:
        _save_jpeg(chip_photo(t1, t1_faces[id_person]), idcards / subject / "id.jpg", quality=95)
        for k in range(2):
            live = augment(crop_around(t1, t1_faces[live_person], 1.2), rng, max_crop=0.04)
            _save_jpeg(live, idcards / subject / f"live{k + 1}.jpg")
        # (The same person's live photos cut from the chip's own photo: the ID picture.)
        truth["idcard_subjects"][subject] = {
            "genuine": id_person == live_person,
            "same_picture": id_person == live_person,
        }
    _save_jpeg(chip_photo(photos["yaoming"], yao_box), idcards / "S004" / "id.jpg", quality=95)
    # Another photo of him: a capture, not his chip's picture.
    _save_jpeg(augment(photos["players"], rng, max_crop=0.04), idcards / "S004" / "live1.jpg")
    truth["idcard_subjects"]["S004"] = {"genuine": True, "same_picture": False}

    if bad_files:
        truth["bad_files"] = write_bad_files(albums / "broken")
        (albums / "stray_at_root.jpg").write_bytes(
            (albums / "family" / "family_0_00.jpg").read_bytes()
        )
        truth["bad_files"]["stray_at_root.jpg"] = "wrong_layout"
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    n = sum(1 for p in out.rglob("*") if p.is_file())
    log.info("demo inputs: %d files under %s", n, out)
    return truth
