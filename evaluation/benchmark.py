"""Seeded benchmark builder: a labelled folder (one sub-folder per person) -> album and
ID-card sources in the layout faceloop ingests, plus a truth file.

Output (``<out>`` is a fresh folder)::

    <out>/albums/album_0007/img_00123.jpg        album source (DESIGN.md layout)
    <out>/idcards/subj_0042/id.jpg               simulated ID-chip photo
    <out>/idcards/subj_0042/live1.jpg            live photo(s): the person, or an impostor
    <out>/truth.json                             see :func:`build_benchmark`

Albums hold a few recurring people each (``people_per_album``); a share of people
(``spread_share``) is spread over 2-3 albums; strangers appear once in the whole benchmark.
ID subjects get an ID photo simulated from one image of the person: a tight centred crop (the
face fills the frame, ``id_crop``) resized to ``id_size`` (102x126, the chip photo of Chinese
2nd-generation ID cards) and recompressed at JPEG quality ``id_quality`` (30-40: as poor as the
chips read off real cards); a share ``impostor_share`` of subjects has live photos of someone
else, and a share ``background_share`` of live photos gets a second face in the background (a
head-and-shoulders crop of another person pasted into a top corner, clear of the claimed face's
eyes, 0.30-0.42 of the image width: sometimes larger than the claimed face).

Truth rule for scoring: a source image shows its person as the face nearest the image centre
(LFW images are centred on the labelled face). ``truth.json`` records each image's size, so
the scorer can match the detection nearest the centre (see :func:`central_face_index`); other
faces in the image (background people) are unknown and are left out of scoring.

Everything depends only on the sorted source listing and ``seed``: the same inputs give
byte-identical outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from faceloop.errors import ConfigError

log = logging.getLogger(__name__)

# The JPEG, PNG, WebP and BMP names of the refresh's default limits.extensions (faceloop/config.py):
# a labelled photo under another is said and left out.
IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp")
TRUTH_FILE = "truth.json"
TRUTH_FORMAT = "faceloop.benchmark/1"


@dataclass(frozen=True)
class BenchmarkParams:
    """What the builder draws. Defaults give ~1,500 album images and 400 ID subjects on LFW."""

    seed: int = 0
    n_albums: int = 40
    people_per_album: int = 8  # recurring people drawn into each album on average
    max_images_per_person: int = 12  # cap, so a few very common people don't dominate pairs
    spread_share: float = 0.3  # recurring people spread over several albums
    strangers_per_album: int = 4  # people seen once in the whole benchmark
    n_id_subjects: int = 400
    impostor_share: float = 0.3
    max_live: int = 2  # live photos per ID subject (1..max_live)
    id_size: tuple[int, int] = (102, 126)  # width, height of the simulated chip photo
    id_quality: tuple[int, int] = (30, 40)  # JPEG quality range of the recompressed ID photo
    id_crop: float = 0.5  # crop width as a share of the source width (LFW: face ~ 0.45): tight
    background_share: float = 0.3  # live photos with a second person's face in the background
    # "plain": album images are the source files; "hard": each is remade by the seeded recipe
    # of evaluation/hard.py (group scenes, small faces, occlusion, pose skew, blur, JPEG, ...).
    benchmark: str = "plain"
    # "hard" only: share of album images placed in a large photo (evaluation/hard.py, `large`).
    large_share: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Truth:
    """Contents of ``truth.json``. ``images``: path relative to the benchmark root -> record
    ``{person, kind: album|id|live, size: [w, h], group}``; ``pairs``: one per live photo,
    ``{subject, id, live, id_person, live_person, genuine}``."""

    params: dict
    images: dict[str, dict] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": TRUTH_FORMAT,
                "params": self.params,
                "images": self.images,
                "pairs": self.pairs,
            },
            indent=1,
            sort_keys=True,
        )

    def idcard_people(self) -> set[str]:
        """Everyone in the ID-card part: ID subjects, impostors and background faces (to keep
        a calibration's people apart from an evaluation's)."""
        out: set[str] = set()
        for rec in self.images.values():
            if rec["kind"] in ("id", "live"):
                out.add(rec["person"])
                if rec.get("background"):
                    out.add(rec["background"])
        return out

    @classmethod
    def load(cls, root: str | Path) -> Truth:
        data = json.loads((Path(root) / TRUTH_FILE).read_text())
        if data.get("format") != TRUTH_FORMAT:
            raise ValueError(f"{root}/{TRUTH_FILE}: not a {TRUTH_FORMAT} file")
        return cls(params=data["params"], images=data["images"], pairs=data["pairs"])


def scan_labelled(root: str | Path) -> dict[str, list[Path]]:
    """Person -> sorted image paths, from ``root/<person>/<image>`` (or ``root/images/...``
    when ``root`` holds an ``images`` folder, as the LFW layout does).

    Names the refresh ignores (``limits.ignore``: hidden ``.*`` files and folders such as
    macOS's ``._x.jpg``, ``Thumbs.db``, ...) are not read; a file whose header no image
    decoder reads is left out with a warning naming it; so is a second copy of the same bytes
    (a duplicate photo would be scored as a photo the pipeline never keeps twice). What is
    left out, sub-folders inside person folders, files beside them and files without an image
    extension included, is said once per kind in a warning."""
    from faceloop.config import InputLimits
    from tasks.discover import ignored

    patterns = InputLimits().ignore
    root = Path(root)
    if (root / "images").is_dir():
        others = [
            p
            for p in root.iterdir()
            if p.is_dir() and p.name != "images" and not ignored(p.name, patterns)
        ]
        if others:
            log.warning(
                "labelled folder %s holds an images/ folder: reading the people in it; its %d "
                "other folders (e.g. %s) are not read",
                root,
                len(others),
                sorted(p.name for p in others)[0],
            )
        root = root / "images"
    if not root.is_dir():
        raise ConfigError(f"labelled folder not found: {root} (layout: <person>/<image>)")
    people: dict[str, list[Path]] = {}
    # Files beside the person folders belong to no one: a photo dropped at the root.
    loose = sorted(
        p.name for p in root.iterdir() if not p.is_dir() and not ignored(p.name, patterns)
    )
    nested: list[str] = []
    other_types: list[str] = []
    unreadable: list[str] = []
    copies: list[str] = []
    seen: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not ignored(p.name, patterns)):
        imgs = []
        for f in sorted(d.iterdir()):
            if ignored(f.name, patterns):
                continue
            if f.is_dir():
                nested.append(f"{d.name}/{f.name}")
                continue
            if f.suffix.lower() not in IMAGE_EXTS:
                other_types.append(f"{d.name}/{f.name}")
                continue
            try:
                data = f.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    im.size  # noqa: B018 - the header is read
            except (OSError, SyntaxError, ValueError) as exc:
                unreadable.append(f"{f} ({type(exc).__name__})")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                copies.append(f"{f} (= {seen[digest]})")
                continue
            seen[digest] = f
            imgs.append(f)
        if imgs:
            people[d.name] = imgs
    for what, items in (
        ("files no image decoder reads", unreadable),
        ("copies of a photo listed before (byte-identical)", copies),
        ("folders inside person folders (layout: <person>/<image>)", nested),
        ("files beside the person folders, in no one's (layout: <person>/<image>)", loose),
        (f"files without an image extension ({', '.join(sorted(IMAGE_EXTS))})", other_types),
    ):
        if items:
            log.warning(
                "labelled folder %s: %d %s left out, e.g. %s", root, len(items), what, items[0]
            )
    return people


def _source_key(src: Path) -> str:
    """Names the photo an ID-card image was made from (its bytes' digest, not its path or
    person): two subjects with the same key were given one photo, a duplicate claim."""
    return hashlib.sha256(src.read_bytes()).hexdigest()[:16]


def simulate_id_photo(src: Path, params: BenchmarkParams, quality: int) -> bytes:
    """A tight, centred, small, recompressed crop of ``src`` as JPEG bytes: what a chip photo
    looks like to the pipeline (head and a little shoulder, ``id_size`` pixels)."""
    with Image.open(src) as opened:
        im = opened.convert("RGB")
        w, h = im.size
        tw, th = params.id_size
        cw = params.id_crop * w
        ch = cw * th / tw
        cx, cy = w / 2, h / 2 + 0.03 * h  # chip photos sit the eyes a little above centre
        box = (round(cx - cw / 2), round(cy - ch / 2), round(cx + cw / 2), round(cy + ch / 2))
        small = im.crop(box).resize((tw, th), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def composite_background(live: Path, other: Path, rng: random.Random) -> bytes:
    """``live`` with a head crop of ``other`` (its central face) pasted into a top corner, as a
    second person in the background, JPEG bytes (quality 90). The paste is 0.30-0.42 of the
    live image's width and stays in the top corner, above the claimed face's eye line (LFW eyes
    sit at ~0.46 of the height), so the claimed face stays nearest the centre (the truth rule)."""
    with Image.open(live) as a, Image.open(other) as b:
        base = a.convert("RGB")
        donor = b.convert("RGB")
    w = base.width
    dw, dh = donor.size
    side = 0.45 * min(dw, dh)
    box = (
        round(dw / 2 - side / 2),
        round(dh / 2 - side / 2),
        round(dw / 2 + side / 2),
        round(dh / 2 + side / 2),
    )
    p = max(8, round(rng.uniform(0.30, 0.42) * w))
    patch = donor.crop(box).resize((p, p), Image.Resampling.BICUBIC)
    x0 = 0 if rng.random() < 0.5 else w - p
    base.paste(patch, (x0, 0))
    buf = io.BytesIO()
    base.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _size(path: Path) -> list[int]:
    with Image.open(path) as im:
        return [im.width, im.height]


def build_benchmark(
    labelled: str | Path,
    out: str | Path,
    params: BenchmarkParams,
    people: dict[str, list[Path]] | None = None,
) -> Truth:
    """Build the album and ID-card sources under ``out`` and write ``out/truth.json``.

    ``people`` (person -> image paths) replaces the scan of ``labelled`` when given: a subset
    of its people, e.g. one side of a train/test split by person.

    People with at least two images are split between ID subjects and recurring album people;
    people with one image (and leftovers) serve as strangers and impostors. Raises
    ``FileExistsError`` when ``out`` already holds a benchmark, ``ConfigError`` when the
    labelled set is too small for ``params``.
    """
    out = Path(out)
    if (out / TRUTH_FILE).exists():
        raise FileExistsError(f"{out} already holds a benchmark; choose a fresh --out")
    if people is None:
        people = scan_labelled(labelled)
    # Built beside ``out`` and renamed into place once complete: a build stopped half-way (a
    # bad image, Ctrl-C) leaves no half benchmark for the next run to mix in.
    final, out = out, out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    try:
        truth = _build(labelled, out, params, people)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():  # a half benchmark an older faceloop left (no truth.json)
        shutil.rmtree(final)
    out.rename(final)
    log.info(
        "benchmark at %s: %d album images in %d albums, %d ID pairs",
        final,
        sum(r["kind"] == "album" for r in truth.images.values()),
        params.n_albums,
        len(truth.pairs),
    )
    return truth


def _build(
    labelled: str | Path, out: Path, params: BenchmarkParams, people: dict[str, list[Path]]
) -> Truth:
    """:func:`build_benchmark`'s work, into ``out``."""
    sizes = {
        "--albums": (params.n_albums, 1),
        "--people-per-album": (params.people_per_album, 1),
        "--id-subjects": (params.n_id_subjects, 0),
    }
    for flag, (value, least) in sizes.items():
        if value < least:
            raise ConfigError(f"{flag} {value}: give {least} or more")
    out.mkdir(parents=True)
    (out / "albums").mkdir()
    (out / "idcards").mkdir()  # --id-subjects 0: an albums-only benchmark
    rng = random.Random(params.seed)
    multi = [p for p, imgs in people.items() if len(imgs) >= 2]
    single = [p for p, imgs in people.items() if len(imgs) == 1]
    rng.shuffle(multi)
    rng.shuffle(single)
    n_recurring = params.n_albums * params.people_per_album
    # Spread people occupy ~2.5 album slots each; fewer distinct people are needed for them.
    n_people = max(1, round(n_recurring / (1 + 1.5 * params.spread_share)))
    n_id = params.n_id_subjects
    if len(multi) < n_people + n_id:
        raise ConfigError(
            f"need {n_people + n_id} people with >= 2 images ({n_people} for "
            f"{params.n_albums} albums of ~{params.people_per_album} people, {n_id} for the ID "
            f"subjects), found {len(multi)} in {labelled}: lower --albums, --people-per-album "
            "or --id-subjects"
        )
    album_people, id_people = multi[:n_people], multi[n_people : n_people + n_id]
    pool_once = single + multi[n_people + n_id :]  # strangers and impostors come from here
    truth = Truth(params=params.to_dict())
    album_names = [f"album_{i:04d}" for i in range(params.n_albums)]
    members: dict[str, list[tuple[str, Path]]] = {a: [] for a in album_names}

    for person in album_people:
        imgs = list(people[person])
        rng.shuffle(imgs)
        imgs = imgs[: params.max_images_per_person]
        k = 1
        if rng.random() < params.spread_share and len(imgs) >= 4:
            k = min(rng.choice((2, 3)), len(imgs) // 2)
        chosen = rng.sample(album_names, min(k, len(album_names)))  # --albums 2: up to 2
        k = len(chosen)
        for j, img in enumerate(imgs):
            members[chosen[j % k]].append((person, img))  # round-robin: >= 2 per album when k>1

    n_strangers = min(params.strangers_per_album * params.n_albums, len(pool_once))
    strangers, pool_once = pool_once[:n_strangers], pool_once[n_strangers:]
    for person in strangers:
        members[rng.choice(album_names)].append((person, rng.choice(people[person])))

    if params.benchmark not in ("plain", "hard"):
        raise ValueError(f"unknown benchmark {params.benchmark!r} (plain or hard)")
    hard = params.benchmark == "hard"
    # The hard recipe draws from its own generator, so the hard benchmark holds exactly the
    # plain one's people, albums and ID pairs; only the album images differ.
    hrng = random.Random(f"hard-{params.seed}")
    lrng = random.Random(f"large-{params.seed}")  # the `large` operation's own draws
    background_people = hrng.sample(sorted(pool_once), min(400, len(pool_once))) if hard else []
    counter = 0
    for album in album_names:
        items = members[album]
        rng.shuffle(items)
        album_people_here = sorted({person for person, _ in items})
        for person, src in items:
            with _reading(src):
                counter = _album_item(
                    out,
                    truth,
                    params,
                    people,
                    album,
                    album_people_here,
                    person,
                    src,
                    counter,
                    hrng,
                    lrng,
                    background_people,
                )

    impostor_pool = pool_once or strangers  # people not used elsewhere, else anyone seen once
    if id_people and not impostor_pool:
        raise ConfigError(
            f"no one is left in {labelled} to be an impostor or a stranger: every person "
            "with >= 2 images is an album person or an ID subject. Add people (one image is "
            "enough) or lower --albums, --people-per-album or --id-subjects"
        )
    # Background faces have their own stream of draws, so the subjects, impostors and live
    # photos are the same draws whatever background_share is.
    bg_rng = random.Random(f"{params.seed}:background")
    bg_pool = sorted(set(strangers) | set(pool_once)) or sorted(people)
    for i, person in enumerate(id_people):
        subject = f"subj_{i:04d}"
        imgs = list(people[person])
        rng.shuffle(imgs)
        id_src, rest = imgs[0], imgs[1:]
        quality = rng.randint(*params.id_quality)
        rel_id = f"idcards/{subject}/id.jpg"
        (out / rel_id).parent.mkdir(parents=True, exist_ok=True)
        with _reading(id_src):
            (out / rel_id).write_bytes(simulate_id_photo(id_src, params, quality))
        truth.images[rel_id] = {
            "person": person,
            "kind": "id",
            "size": list(params.id_size),
            "group": subject,
            "source": _source_key(id_src),
        }
        impostor = rng.random() < params.impostor_share
        n_live = rng.randint(1, params.max_live)
        if impostor:
            other = rng.choice(impostor_pool)
            lives = [(other, p) for p in people[other][:n_live]]
        else:
            lives = [(person, p) for p in rest[:n_live]]
        for j, (live_person, src) in enumerate(lives, start=1):
            rel = f"idcards/{subject}/live{j}{src.suffix.lower()}"
            with _reading(src):
                size = _size(src)
            rec = {
                "person": live_person,
                "kind": "live",
                "size": size,
                "group": subject,
                "source": _source_key(src),
            }
            donor = bg_rng.choice(bg_pool)
            if bg_rng.random() < params.background_share and donor not in (person, live_person):
                rel = f"idcards/{subject}/live{j}.jpg"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                back = bg_rng.choice(people[donor])
                with _reading(src, back):
                    (out / rel).write_bytes(composite_background(src, back, bg_rng))
                rec["background"] = donor
            else:
                _copy(src, out / rel)
            truth.images[rel] = rec
            truth.pairs.append(
                {
                    "subject": subject,
                    "id": rel_id,
                    "live": rel,
                    "id_person": person,
                    "live_person": live_person,
                    "genuine": live_person == person,
                }
            )
    (out / TRUTH_FILE).write_text(truth.to_json())
    return truth


def _album_item(
    out: Path,
    truth: Truth,
    params: BenchmarkParams,
    people: dict[str, list[Path]],
    album: str,
    album_people_here: list[str],
    person: str,
    src: Path,
    counter: int,
    hrng: random.Random,
    lrng: random.Random,
    background_people: list[str],
) -> int:
    """One album image of :func:`_build`: the source as it is, or remade by the hard recipe;
    its truth record. Returns the next image counter."""
    hard = params.benchmark == "hard"
    if not hard:
        rel = f"albums/{album}/img_{counter:05d}{src.suffix.lower()}"
        _copy(src, out / rel)
        record = {"person": person, "kind": "album", "size": _size(src), "group": album}
    else:
        from evaluation.hard import HardRecipe, harden

        others = [p for p in album_people_here if p != person]
        companions = [hrng.choice(people[p]) for p in hrng.sample(others, min(2, len(others)))]
        if background_people:
            companions.append(hrng.choice(people[hrng.choice(background_people)]))
        data, size, ops, frame = harden(
            src, hrng, companions, HardRecipe(large=params.large_share), large_rng=lrng
        )
        rel = f"albums/{album}/img_{counter:05d}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        record = {"person": person, "kind": "album", "size": size, "group": album}
        record["ops"] = ops
        if frame is not None:
            record["frame"] = frame
    counter += 1
    truth.images[rel] = record
    return counter


@contextlib.contextmanager
def _reading(*sources: Path) -> Iterator[None]:
    """A labelled image that cannot be decoded (cut short, corrupt past its header) stops the
    build with a ConfigError naming it, not a bare decoder error."""
    try:
        yield
    except (OSError, SyntaxError, ValueError) as exc:
        names = " or ".join(str(p) for p in sources)
        raise ConfigError(
            f"labelled image {names} cannot be read ({type(exc).__name__}: {exc}): remove or "
            "replace it"
        ) from exc


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def central_face_index(
    bboxes: Sequence[Sequence[float]],
    size: Sequence[int],
    max_offset: float = 0.2,
    frame: Sequence[int] | None = None,
) -> int | None:
    """Index of the box whose centre is nearest the image centre, if that centre lies within
    ``max_offset`` x the shorter image side of it; else ``None`` (the labelled face was missed).
    This is how a benchmark image's truth person is matched to one detection. ``frame``: the
    [width, height] of the picture centred in a larger photo (the hard benchmark's ``large``
    images): the offset is then a share of the picture's shorter side, so that a companion's
    face beside the subject's is not taken for it."""
    w, h = size
    reach = min(frame) if frame else min(w, h)
    best, best_d = None, None
    for i, (x1, y1, x2, y2) in enumerate(bboxes):
        d = ((x1 + x2) / 2 - w / 2) ** 2 + ((y1 + y2) / 2 - h / 2) ** 2
        if best_d is None or d < best_d:
            best, best_d = i, d
    if best is None or best_d is None or best_d**0.5 > max_offset * reach:
        return None
    return best
