"""The hard album benchmark: LFW photos turned into in-the-wild-like album photos.

LFW faces are centred, frontal, well lit and alone in the frame; real albums are not. Every
album image of the hard benchmark is made from its LFW source by a seeded recipe (all draws come
from one ``random.Random`` the builder passes in, so the same seed gives byte-identical images):

- **group scene** (share ``group``): the photo is the middle tile of a wider picture; 1-2
  companions sit left and right, each a photo of another member of the same album (album
  members share photos, as in real albums) or of a stranger seen nowhere else. Tiles are scaled
  0.7-1.0 independently, so faces differ in size.
- **small face** (share ``small``, when not a group scene): the photo shrunk to 0.28-0.45 of its
  size (LFW faces ~110 px tall become ~30-50 px) in the middle of a canvas 2.2x the source, a
  full-body-like shot.
- then, each independently: **occlusion** (a dark bar over the eyes, a mask-like patch over the
  mouth and chin, or a hand-like patch over one cheek), **rotation** +-8-25 deg, **skew**
  (horizontal shear 0.1-0.25, a crude pose change), **lighting** (brightness 0.45-1.5,
  contrast 0.5-1.3, sometimes grey), **blur** (Gaussian radius 1.0-2.5), **downscale** (to
  0.3-0.5 and back up), and a **JPEG** recompression at quality 15-40 (otherwise 75-90).

The labelled person stays the face nearest the image centre, so the benchmark's truth rule
(:func:`evaluation.benchmark.central_face_index`) scores it; companions are background faces:
they take part in clustering (as strangers and album members do in real albums) but are not
scored. Each image's truth record lists the operations applied (``ops``), so misses can be
broken down by operation.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


@dataclass(frozen=True)
class HardRecipe:
    """Shares of album images each operation is applied to (see the module docstring)."""

    group: float = 0.30
    small: float = 0.20
    occlusion: float = 0.25
    rotation: float = 0.30
    skew: float = 0.20
    lighting: float = 0.30
    blur: float = 0.25
    downscale: float = 0.25
    low_jpeg: float = 0.40
    # The finished picture placed, centred, in a large photo (1600-4000 px wide, 4:3) with the
    # subject's face 60-160 px tall: a full-body or group shot from a phone. Off by default (the
    # recorded hard figures have none); `faceloop eval --benchmark hard --large-share S`.
    large: float = 0.0


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _occlude(im: Image.Image, rng: random.Random) -> str:
    """Draw one occluder over the centred face of ``im`` (in place); returns its kind."""
    w, h = im.size
    d = ImageDraw.Draw(im)
    kind = rng.choice(("eyes", "mask", "hand"))
    shade = tuple(rng.randint(10, 60) for _ in range(3))
    if kind == "eyes":  # sunglasses-like bar over the eye line
        y = h * rng.uniform(0.38, 0.44)
        d.rectangle((w * 0.30, y, w * 0.70, y + h * rng.uniform(0.06, 0.09)), fill=shade)
    elif kind == "mask":  # lower face covered
        colour = tuple(rng.randint(150, 240) for _ in range(3))
        d.rectangle((w * 0.33, h * rng.uniform(0.55, 0.6), w * 0.67, h * 0.76), fill=colour)
    else:  # one cheek behind a hand / object
        skin = (rng.randint(150, 220), rng.randint(110, 170), rng.randint(90, 140))
        x0 = w * (0.30 if rng.random() < 0.5 else 0.5)
        d.ellipse((x0, h * 0.45, x0 + w * 0.2, h * 0.75), fill=skin)
    return kind


def _enlarge(
    im: Image.Image,
    box: tuple[int, int, int, int],
    rng: random.Random,
    background: tuple[int, int, int],
) -> tuple[Image.Image, list[int]]:
    """``im`` scaled so that the subject's face (~0.44 of its photo's height, ``box``) is 60-160
    px tall, centred in a 4:3 picture 1600-4000 px wide (wider when the scaled ``im`` needs),
    and the scaled ``im``'s [width, height] (the ``frame`` of the truth record)."""
    face = rng.uniform(60, 160)
    k = face / (0.44 * max(1, box[3] - box[1]))
    scaled = im.resize(
        (max(1, round(im.width * k)), max(1, round(im.height * k))), Image.Resampling.BICUBIC
    )
    width = max(round(rng.uniform(1600, 4000)), scaled.width + 32, round(scaled.height * 4 / 3))
    height = round(width * 3 / 4)
    canvas = Image.new("RGB", (width, height), background)
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas, [scaled.width, scaled.height]


def harden(
    src: Path,
    rng: random.Random,
    companions: list[Path],
    recipe: HardRecipe,
    background: tuple[int, int, int] = (90, 90, 90),
    large_rng: random.Random | None = None,
) -> tuple[bytes, list[int], list[str], list[int] | None]:
    """One hard album image made from ``src``: ``(JPEG bytes, [width, height], ops applied,
    frame)``; ``frame`` is the [width, height] of the picture inside a ``large`` photo (centred;
    the scored face is the central one within the picture, not within the whole photo), else
    None.

    ``large_rng`` (default ``rng``) draws the ``large`` operation: a generator of its own keeps
    every other draw, and so every image without it, as it is without the operation.

    ``companions`` are candidate photos for a group scene (the builder passes other album
    members' and strangers' photos); the person of ``src`` stays the most central face."""
    im = _open(src)
    ops: list[str] = []
    w, h = im.size
    box = (0, 0, w, h)  # where the subject's photo sits in the picture
    if companions and rng.random() < recipe.group:
        n = min(len(companions), rng.choice((1, 2, 2)))
        picks = rng.sample(companions, n)
        canvas = Image.new("RGB", (3 * w, h), background)
        canvas.paste(im, (w, 0))
        box = (w, 0, 2 * w, h)
        slots = [0, 2] if n == 2 else [rng.choice((0, 2))]
        for slot, path in zip(slots, picks, strict=False):
            tile = _open(path)
            s = rng.uniform(0.7, 1.0)
            tile = tile.resize((round(tile.width * s), round(tile.height * s)))
            canvas.paste(tile, (slot * w + (w - tile.width) // 2, (h - tile.height) // 2))
        im = canvas
        ops.append(f"group{n}")
    elif rng.random() < recipe.small:
        s = rng.uniform(0.28, 0.45)
        small = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
        cw, ch = round(w * 2.2), round(h * 2.2)
        canvas = Image.new("RGB", (cw, ch), background)
        x0, y0 = (cw - small.width) // 2, (ch - small.height) // 2
        canvas.paste(small, (x0, y0))
        box = (x0, y0, x0 + small.width, y0 + small.height)
        im = canvas
        ops.append("small")
    if rng.random() < recipe.occlusion:  # over the subject's own photo, wherever it sits
        sub = im.crop(box)
        ops.append("occlusion_" + _occlude(sub, rng))
        im.paste(sub, box[:2])
    if rng.random() < recipe.rotation:
        angle = rng.uniform(8, 25) * rng.choice((-1, 1))
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=background)
        ops.append("rotation")
    if rng.random() < recipe.skew:
        k = rng.uniform(0.1, 0.25) * rng.choice((-1, 1))
        cx = im.height / 2
        im = im.transform(
            im.size,
            Image.Transform.AFFINE,
            (1, k, -k * cx, 0, 1, 0),
            resample=Image.Resampling.BILINEAR,
            fillcolor=background,
        )
        ops.append("skew")
    if rng.random() < recipe.lighting:
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.45, 1.5))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.5, 1.3))
        if rng.random() < 0.3:
            im = im.convert("L").convert("RGB")
        ops.append("lighting")
    if rng.random() < recipe.blur:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5)))
        ops.append("blur")
    if rng.random() < recipe.downscale:
        s = rng.uniform(0.3, 0.5)
        size = im.size
        im = im.resize((max(1, round(size[0] * s)), max(1, round(size[1] * s)))).resize(
            size, Image.Resampling.BILINEAR
        )
        ops.append("downscale")
    if rng.random() < recipe.low_jpeg:
        quality = rng.randint(15, 40)
        ops.append("low_jpeg")
    else:
        quality = rng.randint(75, 90)
    # Drawn last and only when asked for (from large_rng, see above).
    lrng = large_rng or rng
    frame = None
    if recipe.large > 0 and lrng.random() < recipe.large:
        im, frame = _enlarge(im, box, lrng, background)
        ops.append("large")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), [im.width, im.height], ops, frame
