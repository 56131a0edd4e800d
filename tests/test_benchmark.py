"""Benchmark builder: layout, truth consistency, determinism under a seed."""

import hashlib
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.benchmark import (
    BenchmarkParams,
    Truth,
    build_benchmark,
    central_face_index,
    scan_labelled,
)
from faceloop.errors import ConfigError


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """60 people with 1..6 small noise images each (the builder never looks at content)."""
    root = tmp_path_factory.mktemp("labelled") / "images"
    rng = np.random.default_rng(1)
    for p in range(60):
        d = root / f"Person_{p:02d}"
        d.mkdir(parents=True)
        for k in range(1 + p % 6):
            arr = rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"Person_{p:02d}_{k + 1:04d}.jpg")
    return root.parent


PARAMS = BenchmarkParams(
    seed=7,
    n_albums=4,
    people_per_album=3,
    strangers_per_album=2,
    n_id_subjects=10,
    impostor_share=0.4,
    max_live=2,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_scan_labelled(labelled):
    people = scan_labelled(labelled)
    assert len(people) == 60
    assert len(people["Person_05"]) == 6


def test_layout_and_truth(labelled, tmp_path):
    truth = build_benchmark(labelled, tmp_path / "b", PARAMS)
    root = tmp_path / "b"
    assert Truth.load(root).images == truth.images
    for rel, rec in truth.images.items():
        assert (root / rel).is_file()
        parts = Path(rel).parts
        if rec["kind"] == "album":
            assert parts[0] == "albums" and len(parts) == 3
        else:
            assert parts[0] == "idcards" and len(parts) == 3
            assert parts[2] == "id.jpg" if rec["kind"] == "id" else parts[2].startswith("live")
    # every ID photo is the simulated chip size
    for rel, rec in truth.images.items():
        if rec["kind"] == "id":
            with Image.open(root / rel) as im:
                assert im.size == PARAMS.id_size and im.format == "JPEG"
    # recurring people appear at least twice; strangers exactly once
    album_people = Counter(r["person"] for r in truth.images.values() if r["kind"] == "album")
    assert sum(1 for c in album_people.values() if c == 1) > 0
    assert sum(1 for c in album_people.values() if c >= 2) > 0
    assert len({r["group"] for r in truth.images.values() if r["kind"] == "album"}) <= 4
    # pairs agree with the images' persons; both kinds occur
    for pair in truth.pairs:
        assert truth.images[pair["id"]]["person"] == pair["id_person"]
        assert truth.images[pair["live"]]["person"] == pair["live_person"]
        assert pair["genuine"] == (pair["id_person"] == pair["live_person"])
    assert {p["genuine"] for p in truth.pairs} == {True, False}
    # ID subjects are not album people (the two sources don't share identities)
    id_people = {p["id_person"] for p in truth.pairs}
    assert not id_people & {p for p, c in album_people.items() if c >= 2}
    # every ID-card image names the photo it was made from; two subjects share one only through
    # an impostor photo (drawn with replacement), never through a subject's own ID or photos
    sources: dict[str, set[str]] = {}
    for rec in truth.images.values():
        if rec["kind"] != "album":
            assert len(rec["source"]) == 16
            sources.setdefault(rec["source"], set()).add(rec["group"])
    genuine_subjects = {p["subject"] for p in truth.pairs if p["genuine"]}
    for groups in sources.values():
        if len(groups) > 1:
            assert not groups & genuine_subjects


def test_some_people_spread_over_albums(labelled, tmp_path):
    truth = build_benchmark(
        labelled,
        tmp_path / "b",
        BenchmarkParams(seed=3, n_albums=4, people_per_album=3, spread_share=1.0, n_id_subjects=5),
    )
    albums = defaultdict(set)
    for rec in truth.images.values():
        if rec["kind"] == "album":
            albums[rec["person"]].add(rec["group"])
    assert any(len(a) > 1 for a in albums.values())


def test_two_albums_with_people_spread_over_three_is_built(labelled, tmp_path):
    """`--albums 2` failed with Python's "Sample larger than population" whenever a person
    drew 3 albums to spread over."""
    for seed in range(8):  # some people draw 3 albums under most seeds
        truth = build_benchmark(
            labelled,
            tmp_path / f"b{seed}",
            BenchmarkParams(
                seed=seed, n_albums=2, people_per_album=3, spread_share=1.0, n_id_subjects=2
            ),
        )
        groups = {rec["group"] for rec in truth.images.values() if rec["kind"] == "album"}
        assert groups == {"album_0000", "album_0001"}


def test_deterministic_and_seed_sensitive(labelled, tmp_path):
    build_benchmark(labelled, tmp_path / "a", PARAMS)
    build_benchmark(labelled, tmp_path / "b", PARAMS)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    build_benchmark(labelled, tmp_path / "c", BenchmarkParams(**{**PARAMS.to_dict(), "seed": 8}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_existing_and_too_small(labelled, tmp_path):
    build_benchmark(labelled, tmp_path / "a", PARAMS)
    with pytest.raises(FileExistsError):
        build_benchmark(labelled, tmp_path / "a", PARAMS)
    with pytest.raises(ConfigError, match="people with >= 2 images"):
        build_benchmark(labelled, tmp_path / "z", BenchmarkParams(n_id_subjects=1000))


def test_central_face_index():
    size = (250, 250)
    boxes = [[0, 0, 40, 40], [80, 70, 170, 180], [200, 200, 250, 250]]
    assert central_face_index(boxes, size) == 1
    assert central_face_index([[0, 0, 40, 40]], size) is None  # only a background face
    # A picture centred in a large photo: a companion one tile beside the subject is within
    # 0.2 of the photo's side but not of the picture's, so it is not taken for the subject.
    beside = [[1100, 730, 1160, 800]]  # 130 px right of the centre of a 1940x1455 photo
    assert central_face_index(beside, [1940, 1455]) == 0
    assert central_face_index(beside, [1940, 1455], frame=[480, 160]) is None
    assert central_face_index([[955, 710, 1000, 760]], [1940, 1455], frame=[480, 160]) == 0
    assert central_face_index([], size) is None


def test_hard_benchmark_same_draws_harder_images(labelled, tmp_path):
    """The hard benchmark holds the plain one's people, albums and ID pairs; its album images
    are remade by the seeded recipe (recorded per image), byte-identically under one seed."""
    from dataclasses import replace

    hard = replace(PARAMS, benchmark="hard")
    plain_t = build_benchmark(labelled, tmp_path / "p", PARAMS)
    hard_t = build_benchmark(labelled, tmp_path / "h", hard)
    build_benchmark(labelled, tmp_path / "h2", hard)
    assert _digest(tmp_path / "h") == _digest(tmp_path / "h2")

    def album_view(t: Truth) -> list[tuple[str, str]]:
        return sorted(
            (Path(r).stem, v["person"]) for r, v in t.images.items() if v["kind"] == "album"
        )

    assert album_view(plain_t) == album_view(hard_t)
    assert plain_t.pairs == hard_t.pairs
    ops = Counter()
    for rel, rec in hard_t.images.items():
        if rec["kind"] != "album":
            continue
        ops.update(o.rstrip("12") for o in rec["ops"])
        with Image.open(tmp_path / "h" / rel) as im:
            assert list(im.size) == rec["size"] and im.format == "JPEG"
            if any(o.startswith("group") for o in rec["ops"]):
                assert im.width == 3 * im.height * 40 // 50  # three 40x50 tiles side by side
    assert sum(ops.values()) > 0  # 20-odd images: several operations drawn
    with pytest.raises(ValueError, match="unknown benchmark"):
        build_benchmark(labelled, tmp_path / "x", replace(PARAMS, benchmark="weird"))


def test_hard_benchmark_large_share_leaves_the_other_images_as_they_were(labelled, tmp_path):
    """--large-share puts a share of the hard album images in large photos (1600-4000 px wide,
    the picture centred, so the scored face stays the central one); every other image is
    byte-identical to the benchmark without it, and so are the people and pairs."""
    from dataclasses import replace

    hard = replace(PARAMS, benchmark="hard")
    base = build_benchmark(labelled, tmp_path / "h", hard)
    big = build_benchmark(labelled, tmp_path / "l", replace(hard, large_share=0.5))
    assert base.pairs == big.pairs
    a, b = _digest(tmp_path / "h"), _digest(tmp_path / "l")
    n_large = 0
    for rel, rec in big.images.items():
        if rec["kind"] != "album":
            continue
        ops = rec["ops"]
        assert ops[: len(base.images[rel]["ops"])] == base.images[rel]["ops"]
        if "large" not in ops:
            assert a[rel] == b[rel]
            continue
        n_large += 1
        w, h = rec["size"]
        assert 1600 <= w <= 4000 + 200 and h == round(w * 3 / 4)
        fw, fh = rec["frame"]  # the picture inside, scaled so that its face is 60-160 px
        assert fw < w and fh < h and fh >= 60 / 0.44 * 0.99
        with Image.open(tmp_path / "l" / rel) as im:
            assert list(im.size) == [w, h]
            grey = np.asarray(im.convert("L"), np.int16)
        # The picture sits in the middle of a flat background: the corners are background.
        assert abs(int(grey[2, 2]) - 90) < 12 and abs(int(grey[-3, -3]) - 90) < 12
    assert n_large > 0


def test_idcard_people_are_everyone_of_the_id_part(labelled, tmp_path):
    """What `faceloop calibrate --exclude-bench` leaves out: ID subjects, impostors and
    background faces, and no album-only person."""
    truth = build_benchmark(labelled, tmp_path / "b", PARAMS)
    got = truth.idcard_people()
    pairs = {p["id_person"] for p in truth.pairs} | {p["live_person"] for p in truth.pairs}
    bg = {r["background"] for r in truth.images.values() if r.get("background")}
    assert got == pairs | bg and pairs <= got
    album_only = {r["person"] for r in truth.images.values() if r["kind"] == "album"} - got
    assert album_only and not album_only & got
    assert Truth.load(tmp_path / "b").idcard_people() == got


def _copy_labelled(labelled: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(labelled / "images", to / "images")
    return to / "images"


def test_scan_leaves_out_hidden_unreadable_and_duplicate_files(labelled, tmp_path, caplog):
    """A researcher's folder: macOS's `._x.jpg`, a hidden `.thumbnails/` person, a file no
    decoder reads, a byte-identical copy and a sub-folder. They made a crash, a fake person
    scored as a failed pair, and copies the pipeline keeps once scored as missed faces."""
    root = _copy_labelled(labelled, tmp_path)
    p5 = root / "Person_05"
    (p5 / "._Person_05_0001.jpg").write_bytes(b"\0\5\26\7")
    (p5 / "broken.jpg").write_bytes(b"not an image")
    (p5 / "dup.jpg").write_bytes((p5 / "Person_05_0001.jpg").read_bytes())
    (p5 / "extra").mkdir()
    (p5 / "extra" / "x.jpg").write_bytes((p5 / "Person_05_0002.jpg").read_bytes())
    hidden = root / ".thumbnails"
    hidden.mkdir()
    (hidden / "t.jpg").write_bytes((p5 / "Person_05_0003.jpg").read_bytes())
    # A photo dropped beside the person folders (whose is it?) and one saved as .tif.
    (root / "loose.jpg").write_bytes((p5 / "Person_05_0004.jpg").read_bytes())
    (p5 / "scan.tif").write_bytes(b"II*\0")
    # A JPEG saved as .jfif, which the refresh reads: left out as "no image extension" once.
    from PIL import Image

    with Image.open(p5 / "Person_05_0001.jpg") as im:
        im.convert("RGB").save(p5 / "cam.jfif", format="JPEG", quality=70)
    with caplog.at_level("WARNING", logger="evaluation.benchmark"):
        people = scan_labelled(tmp_path)
    assert len(people) == 60 and [p.name for p in people["Person_05"]] == [
        *(f"Person_05_{k:04d}.jpg" for k in range(1, 7)),
        "cam.jfif",
    ]
    said = caplog.text
    assert "broken.jpg" in said and "dup.jpg" in said and "Person_05/extra" in said
    assert "beside the person folders" in said and "loose.jpg" in said
    assert "without an image extension" in said and "Person_05/scan.tif" in said


def test_a_bad_image_stops_the_build_naming_it_and_leaves_nothing(labelled, tmp_path):
    root = _copy_labelled(labelled, tmp_path / "src")
    for d in root.iterdir():  # every file cut short past its header: whichever is drawn
        for f in d.iterdir():
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])
    out = tmp_path / "bench"
    with pytest.raises(
        ConfigError, match=r"labelled image .*Person_\d\d_\d{4}\.jpg cannot be read"
    ):
        build_benchmark(root, out, PARAMS)
    assert not out.exists() and not list(tmp_path.glob(".bench.building-*"))


def test_sizes_and_an_empty_impostor_pool_are_config_errors(labelled, tmp_path):
    for bad, flag in (({"n_albums": 0}, "--albums 0"), ({"n_id_subjects": -1}, "--id-subjects -1")):
        with pytest.raises(ConfigError, match=flag):
            build_benchmark(labelled, tmp_path / "x", replace(PARAMS, **bad))
    # Exactly the people with >= 2 images it asks for, none with one: nobody to be an impostor.
    people = {p: imgs for p, imgs in scan_labelled(labelled).items() if len(imgs) >= 2}
    params = replace(PARAMS, impostor_share=1.0)
    n_album_people = round(
        params.n_albums * params.people_per_album / (1 + 1.5 * params.spread_share)
    )
    few = dict(list(people.items())[: n_album_people + params.n_id_subjects])
    with pytest.raises(ConfigError, match="impostor"):
        build_benchmark(labelled, tmp_path / "z", params, people=few)
    # An albums-only benchmark (no ID subjects) is built, with an empty ID-card source.
    truth = build_benchmark(labelled, tmp_path / "a", replace(PARAMS, n_id_subjects=0))
    assert not truth.pairs and (tmp_path / "a" / "idcards").is_dir()
