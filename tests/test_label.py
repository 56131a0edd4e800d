"""tasks/label.relabel: the album gates that decide before any clustering."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from faceloop.config import Settings
from faceloop.schema import FACES_SCHEMA
from tasks.label import relabel


def _unit(seed: int, base: np.ndarray | None = None) -> list[float]:
    """A unit vector; with ``base`` a face of that person: cosine ~0.93 to it (~0.86 to another
    such face), as two captures of one person are. A copy of one capture is closer than 0.975
    (tasks/label.ID_COPY_COSINE): a live face that close to the ID face is the ID picture."""
    v = np.random.default_rng(seed).normal(size=512)
    v = v if base is None else base + 0.4 * v / np.linalg.norm(v) * np.linalg.norm(base)
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


def test_album_gates_and_faces_never_embedded() -> None:
    person = np.random.default_rng(0).normal(size=512)
    rows = [
        {"face_id": f"p{i}", "embedding": _unit(10 + i, person), "quality": 0.9, "face_px": 80.0}
        for i in range(4)
    ]
    rows += [
        {"face_id": "small", "embedding": None, "quality": 0.9, "face_px": 8.0},
        {"face_id": "blurry", "embedding": None, "quality": 0.01, "face_px": 80.0},
        # Good enough by today's gates but not embedded when detected (gates were stricter then).
        {"face_id": "gated-then", "embedding": None, "quality": 0.9, "face_px": 80.0},
    ]
    for r in rows:
        r.update(source_kind="album", source_group="a1", status="new", reason=None, role="album")
    table = pa.Table.from_pylist(
        rows, schema=FACES_SCHEMA.remove(FACES_SCHEMA.get_field_index("aligned_jpeg"))
    )
    decisions, _ = relabel(Settings(), table, {("album", "a1")})
    code = {f: d.reason.split(":")[0] for f, d in decisions.items()}
    assert all(d.code == c for d, c in zip(decisions.values(), code.values(), strict=True))
    assert code["small"] == "too_small" and code["blurry"] == "low_quality"
    assert code["gated-then"] == "not_embedded" and decisions["gated-then"].status == "rejected"
    people = {decisions[f"p{i}"].identity_id for i in range(4)}
    assert len(people) == 1 and None not in people  # the zero vectors did not join or split them


def _idcard_rows(subject: str, faces: list[tuple[str, str, str, list[float], float]]) -> list[dict]:
    """Face rows of one ID-card subject: (face id, role, file name, embedding, box side)."""
    return [
        {
            "face_id": f,
            "source_kind": "idcard",
            "source_group": subject,
            "role": role,
            "image_uri": f"/in/idcards/{subject}/{name}",
            "image_sha256": f"sha-{subject}-{name}",
            "bbox": [0.0, 0.0, side, side],
            "det_score": 0.9,
            "embedding": emb,
            "quality": 0.9,
            "face_px": side,
            "status": "new",
            "reason": None,
        }
        for f, role, name, emb, side in faces
    ]


def test_a_subject_with_two_id_photos_goes_to_review() -> None:
    """id.jpg and id.png in one subject folder: the faces used to be pooled, and the holder on
    the smaller photo was rejected as the larger one's "ghost portrait" while the live photo
    was accepted against the other. Now every main face of the subject is in review, naming
    both files; a real ghost portrait on an ID photo stays rejected, and a subject with one
    ID photo is decided as before."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=512), rng.normal(size=512)
    rows = _idcard_rows(
        "S",
        [
            ("S-id-a", "id", "id.jpg", _unit(1, a), 200.0),
            ("S-id-ghost", "id", "id.jpg", _unit(2, a), 60.0),
            ("S-id-b", "id", "id.png", _unit(3, b), 120.0),
            ("S-live", "live", "live1.jpg", _unit(4, a), 150.0),
        ],
    )
    rows += _idcard_rows(
        "T",
        [
            ("T-id", "id", "id.jpg", _unit(5, b), 200.0),
            ("T-live", "live", "live1.jpg", _unit(6, b), 150.0),
        ],
    )
    table = pa.Table.from_pylist(
        rows, schema=FACES_SCHEMA.remove(FACES_SCHEMA.get_field_index("aligned_jpeg"))
    )
    decisions, _ = relabel(Settings(), table, {("idcard", "S"), ("idcard", "T")})
    for f in ("S-id-a", "S-id-b", "S-live"):
        d = decisions[f]
        assert (d.status, d.code, d.identity_id) == ("review", "idcard_several_id_photos", "S"), d
        assert d.detail.startswith("2 ID photos (id.jpg, id.png); a subject has one: settle it")
        assert "deleting a file keeps its faces" in d.detail  # deleting one changed nothing
    assert decisions["S-id-ghost"].code == "idcard_secondary_face_in_id_photo"
    assert decisions["S-id-ghost"].status == "rejected"
    assert {decisions[f].status for f in ("T-id", "T-live")} == {"auto"}
    # Annotators get the subject's ID/live pairs, with the reason on the task.
    from faceloop.vocab import TaskKind, task_kind_for_code

    assert task_kind_for_code("idcard_several_id_photos") == TaskKind.IDCARD_PAIR


def test_a_live_photo_that_is_the_id_photo_confirms_nothing() -> None:
    """A live photo with the ID photo's bytes, or a re-encoded copy of it (pHash close, the same
    face), is no live capture: its faces are rejected, the subject is decided on its other live
    photos, and an ID face left without one goes to review saying why (it used to be "no live
    photo has a face" for the bytes, and auto-accepted at cosine ~0.99 for a copy)."""
    from faceloop.vocab import LIVE_IS_ID_PHOTO, task_kind_for_code
    from tasks.label import live_copies_of_id

    def img(subject: str, name: str, role: str, sha: str, phash: int | None) -> dict:
        return {
            "image_uri": f"/in/idcards/{subject}/{name}",
            "image_sha256": sha,
            "phash": phash,
            "source_kind": "idcard",
            "source_group": subject,
            "role": role,
            "status": "ok",
        }

    rows = [
        img("S", "id.jpg", "id", "sha-S-id", 0),
        img("S", "live1.jpg", "live", "sha-S-id", 0),  # the same bytes (a duplicate_content row)
        img("T", "id.jpg", "id", "sha-T-id", 0b1011),
        img("T", "live1.jpg", "live", "sha-T-live1", 0b0000),  # 3 bits, the same face: a copy
        img("T", "live2.jpg", "live", "sha-T-live2", (1 << 40) - 1),  # far: a capture
        img("U", "id.jpg", "id", "sha-U-id", 0),
        img("U", "live1.jpg", "live", "sha-U-live1", 0b1),  # close, but another face
    ]
    asked: list[tuple[str, str, bool]] = []

    def same_capture(a: dict, b: dict, main_only: bool = False) -> bool:
        asked.append((a["image_uri"], b["image_uri"], main_only))
        return a["source_group"] == "T"

    copies = live_copies_of_id(rows, {"S", "T", "U"}, same_capture)
    assert copies == {
        "S": {"sha-S-id": "live1.jpg has the ID photo's bytes"},
        "T": {
            "sha-T-live1": "live1.jpg is a copy of the ID photo (pHash 3 bits apart, the same face)"
        },
    }
    assert all(main_only for *_, main_only in asked)
    assert live_copies_of_id(rows, {"U"}, same_capture) == {}
    assert live_copies_of_id(rows, {"T"}) == {}  # without the faces, only the bytes count

    rng = np.random.default_rng(3)
    t, s = rng.normal(size=512), rng.normal(size=512)
    faces = _idcard_rows(
        "T",
        [
            ("T-id", "id", "id.jpg", _unit(1, t), 200.0),
            ("T-copy", "live", "live1.jpg", _unit(2, t), 180.0),
            ("T-live", "live", "live2.jpg", _unit(3, t), 150.0),
        ],
    )
    faces += _idcard_rows("S", [("S-id", "id", "id.jpg", _unit(4, s), 200.0)])
    table = pa.Table.from_pylist(
        faces, schema=FACES_SCHEMA.remove(FACES_SCHEMA.get_field_index("aligned_jpeg"))
    )
    copies = {
        "T": {"sha-T-live1.jpg": "live1.jpg is a copy"},
        "S": {"sha-S-id.jpg": "live1.jpg has the ID photo's bytes"},
    }
    decisions, _ = relabel(
        Settings(), table, {("idcard", "S"), ("idcard", "T")}, live_copies=copies
    )
    d = decisions["T-copy"]
    assert (d.status, d.code, d.detail, d.identity_id) == (
        "rejected",
        LIVE_IS_ID_PHOTO,
        "live1.jpg is a copy",
        None,
    )
    assert decisions["T-live"].status == "auto" and decisions["T-id"].status == "auto"
    d = decisions["S-id"]
    assert (d.status, d.code, d.identity_id) == ("review", LIVE_IS_ID_PHOTO, "S")
    assert d.detail == "live1.jpg has the ID photo's bytes: no live capture to compare"
    assert task_kind_for_code(LIVE_IS_ID_PHOTO) is None  # no live face to pair it with: not pushed
    # Without the copies, the copy's face is the subject's largest live face and accepted.
    before, _ = relabel(Settings(), table, {("idcard", "S"), ("idcard", "T")})
    assert before["T-copy"].status == "auto" and before["S-id"].code == "idcard_no_live_face"


def test_an_id_photo_written_over_with_a_new_one_gives_way_to_it() -> None:
    """A probe overwrote id.jpg with a new ID photo: the old bytes' faces stayed (a source is
    not the record) and the subject was stuck in review as "2 ID photos (id.jpg); a subject
    has one: keep one" with one file in its folder. The replaced photo's faces are rejected now
    and the subject is verified with its ID photo of today."""
    from tasks.label import replaced_id_photos

    def img(name: str, sha: str, run: str, role: str = "id") -> dict:
        return {
            "image_uri": f"/in/idcards/S/{name}",
            "image_sha256": sha,
            "source_kind": "idcard",
            "source_group": "S",
            "role": role,
            "status": "ok",
            "run_id": run,
        }

    history = [
        img("id.jpg", "sha-S-id.jpg", "r1"),
        img("live1.jpg", "sha-S-live1.jpg", "r1", "live"),
        img("id.jpg", "sha-S-new", "r2"),  # the same path, other bytes
        img("moved.jpg", "sha-T", "r1"),  # bytes still current elsewhere: not replaced
        img("moved2.jpg", "sha-T", "r2"),
    ]
    assert replaced_id_photos(history) == {"sha-S-id.jpg"}
    rng = np.random.default_rng(3)
    person = rng.normal(size=512)
    rows = _idcard_rows(
        "S",
        [
            ("S-id-old", "id", "id.jpg", _unit(1, person), 200.0),
            ("S-live", "live", "live1.jpg", _unit(2, person), 150.0),
        ],
    )
    new = _idcard_rows("S", [("S-id-new", "id", "id.jpg", _unit(3, person), 200.0)])
    new[0]["image_sha256"] = "sha-S-new"
    table = pa.Table.from_pylist(
        rows + new, schema=FACES_SCHEMA.remove(FACES_SCHEMA.get_field_index("aligned_jpeg"))
    )
    stuck, _ = relabel(Settings(), table, {("idcard", "S")})
    assert stuck["S-live"].code == "idcard_several_id_photos"
    decisions, _ = relabel(
        Settings(), table, {("idcard", "S")}, replaced_ids=replaced_id_photos(history)
    )
    assert decisions["S-id-old"].status == "rejected"
    assert decisions["S-id-old"].code == "idcard_id_photo_replaced"
    assert (decisions["S-id-new"].status, decisions["S-live"].status) == ("auto", "auto")


def _id_store(tmp_path, photos: dict[str, list[tuple[str, str, list[float]]]]):
    """A store whose ID-card subjects hold ``photos``: subject -> (file, role, embedding) of one
    face each, recorded by run r1 and labelled by it."""
    from storage.objectstore import open_store
    from storage.tables import append_images, write_group
    from tasks.label import label_run

    settings = Settings(store=str(tmp_path / "store"))
    st = open_store(settings.store)
    images = []
    for subject, faces in photos.items():
        rows = _idcard_rows(
            subject, [(f"{subject}-{n}", role, n, e, 150.0) for n, role, e in faces]
        )
        for r in rows:
            r["run_id"] = "r1"
        write_group(st, "idcard", subject, pa.Table.from_pylist(rows))
        images += [
            {k: r[k] for k in ("image_uri", "image_sha256", "source_kind", "source_group", "role")}
            | {"status": "ok", "n_faces": 1, "run_id": "r1"}
            for r in rows
        ]
    append_images(st, "r1", pa.Table.from_pylist(images))
    label_run(settings, st, "r1", None, [], relabel_all=True, use_ray=False)
    return settings, st


def _moved(src: str, dst: str, role: str, run: str) -> dict:
    """The images-table row discovery writes for an ID-card photo moved from ``src``."""
    subject = dst.split("/")[-2]
    sha = "sha-" + "-".join(src.split("/")[-2:])
    return {
        "image_uri": dst,
        "image_sha256": sha,
        "source_kind": "idcard",
        "source_group": subject,
        "role": role,
        "status": "ok",
        "reason": f"same bytes as {src}, no longer listed",
        "reason_code": "moved",
        "n_faces": 1,
        "run_id": run,
    }


def _id_faces(st) -> dict[str, dict]:
    from storage.tables import read_faces

    cols = ["face_id", "source_group", "image_uri", "role", "status", "identity_id", "reason"]
    return {f["face_id"]: f for f in read_faces(st, columns=cols).to_pylist()}


def test_a_live_photo_refiled_under_another_subject_is_verified_there(tmp_path) -> None:
    """A KYC operator moved a misfiled live capture from subject A's folder to B's. Its face
    kept the decision made under A (source group A, never compared with B's ID photo), and B
    stayed "no live face" with the capture in its folder. The face follows the photo now."""
    from tasks.label import label_run

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=512), rng.normal(size=512)
    settings, st = _id_store(
        tmp_path,
        {
            "A": [
                ("id.jpg", "id", _unit(1, a)),
                ("live1.jpg", "live", _unit(2, a)),
                ("live2.jpg", "live", _unit(3, b)),  # misfiled: B's capture
            ],
            "B": [("id.jpg", "id", _unit(4, b))],
        },
    )
    before = _id_faces(st)
    assert before["A-live2.jpg"]["status"] != "auto"
    assert before["B-id.jpg"]["status"] == "review"  # no live face to compare
    row = _moved("/in/idcards/A/live2.jpg", "/in/idcards/B/live2.jpg", "live", "r2")
    label_run(settings, st, "r2", None, [row], use_ray=False)
    after = _id_faces(st)
    assert len(after) == len(before)
    moved = after["A-live2.jpg"]
    assert (moved["source_group"], moved["image_uri"]) == ("B", "/in/idcards/B/live2.jpg")
    assert (moved["status"], moved["identity_id"]) == ("auto", "B"), moved
    assert (after["B-id.jpg"]["status"], after["B-id.jpg"]["identity_id"]) == ("auto", "B")
    assert {f: after[f]["status"] for f in ("A-id.jpg", "A-live1.jpg")} == {
        "A-id.jpg": "auto",
        "A-live1.jpg": "auto",
    }


def test_a_renamed_subject_folder_keeps_its_decisions_under_its_new_name(tmp_path) -> None:
    """Subject folder A renamed to A2: every photo moved. The faces stayed in subject A, so a
    live photo added to A2 read "no face in the ID photo". They move with the folder now, a
    person's decision on them included (the same ID photo judged them), under the new name."""
    import pyarrow.compute as pc

    from storage.tables import read_faces, write_group
    from tasks.label import label_run

    rng = np.random.default_rng(6)
    a = rng.normal(size=512)
    settings, st = _id_store(
        tmp_path,
        {"A": [("id.jpg", "id", _unit(1, a)), ("live1.jpg", "live", _unit(2, a))]},
    )
    # An annotator confirmed the live face.
    t = read_faces(st, groups=[("idcard", "A")])
    human = pc.equal(t.column("face_id"), "A-live1.jpg")
    t = t.set_column(
        t.schema.get_field_index("status"),
        "status",
        pc.if_else(human, "human", t.column("status")),
    )
    write_group(st, "idcard", "A", t)
    rows = [
        _moved(f"/in/idcards/A/{n}", f"/in/idcards/A2/{n}", role, "r2")
        for n, role in (("id.jpg", "id"), ("live1.jpg", "live"))
    ]
    label_run(settings, st, "r2", None, rows, use_ray=False)
    after = _id_faces(st)
    assert {f["source_group"] for f in after.values()} == {"A2"}
    assert after["A-id.jpg"]["status"] == "auto"
    assert after["A-live1.jpg"]["status"] == "human"
    assert {f["identity_id"] for f in after.values()} == {"A2"}
    # The folder it left holds no faces file (it was left as an empty one).
    from storage.tables import faces_files

    assert faces_files(st, groups=[("idcard", "A")]) == []
    assert faces_files(st, groups=[("idcard", "A2")])


def test_a_person_decision_does_not_follow_a_live_photo_to_another_id_photo(tmp_path) -> None:
    """A confirmed live face compared with A's ID photo says nothing about B's: moved alone
    into B, it is verified again there."""
    import pyarrow.compute as pc

    from storage.tables import read_faces, write_group
    from tasks.label import label_run

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=512), rng.normal(size=512)
    settings, st = _id_store(
        tmp_path,
        {
            "A": [("id.jpg", "id", _unit(1, a)), ("live1.jpg", "live", _unit(2, a))],
            "B": [("id.jpg", "id", _unit(4, b))],
        },
    )
    t = read_faces(st, groups=[("idcard", "A")])
    t = t.set_column(
        t.schema.get_field_index("status"),
        "status",
        pc.if_else(pc.equal(t.column("face_id"), "A-live1.jpg"), "human", t.column("status")),
    )
    write_group(st, "idcard", "A", t)
    row = _moved("/in/idcards/A/live1.jpg", "/in/idcards/B/live1.jpg", "live", "r2")
    label_run(settings, st, "r2", None, [row], use_ray=False)
    moved = _id_faces(st)["A-live1.jpg"]
    assert moved["source_group"] == "B"
    assert moved["status"] not in ("human", "auto"), moved


def test_an_id_photo_restored_after_an_edit_is_the_subject_s_again(tmp_path) -> None:
    """id.jpg overwritten with another photo, then restored: discovery took the restored file
    for "already seen" (the path and bytes were recorded), so the edit stayed the subject's ID
    photo and the real one stayed rejected as replaced. Its ``restored`` row decides the
    subject again with the photo it holds."""
    from storage.tables import append_images, read_faces, write_group
    from tasks.label import label_run

    rng = np.random.default_rng(8)
    a = rng.normal(size=512)
    settings, st = _id_store(
        tmp_path, {"A": [("id.jpg", "id", _unit(1, a)), ("live1.jpg", "live", _unit(2, a))]}
    )
    edit = _idcard_rows("A", [("A-edit", "id", "id.jpg", _unit(3, a), 150.0)])[0]
    edit |= {"image_sha256": "sha-edit", "run_id": "r2"}
    stored = read_faces(st)
    write_group(
        st,
        "idcard",
        "A",
        pa.Table.from_pylist([*stored.to_pylist(), edit], schema=stored.schema),
    )
    keys = ("image_uri", "image_sha256", "source_kind", "source_group", "role")
    append_images(
        st,
        "r2",
        pa.Table.from_pylist([{k: edit[k] for k in keys} | {"status": "ok", "run_id": "r2"}]),
    )
    label_run(settings, st, "r2-label", None, [], relabel_all=True, use_ray=False)
    assert _id_faces(st)["A-id.jpg"]["reason"].startswith("idcard_id_photo_replaced")
    restored = {
        "image_uri": "/in/idcards/A/id.jpg",
        "image_sha256": "sha-A-id.jpg",
        "source_kind": "idcard",
        "source_group": "A",
        "role": "id",
        "status": "ok",
        "reason": "bytes this path held before it held others",
        "reason_code": "restored",
        "n_faces": 1,
        "run_id": "r3",
    }
    res = label_run(settings, st, "r3", None, [restored], use_ray=False)
    after = _id_faces(st)
    assert after["A-id.jpg"]["status"] == "auto"
    assert after["A-edit"]["reason"].startswith("idcard_id_photo_replaced")
    assert (res.new_images, res.moved) == (0, 1)


def _confirm(st, subject: str, *face_ids: str) -> None:
    """An annotator's "same person" answer on ``face_ids`` of ``subject`` (an ID pair)."""
    import pyarrow.compute as pc

    from storage.tables import read_faces, write_group

    t = read_faces(st, groups=[("idcard", subject)])
    hit = pc.is_in(t.column("face_id"), pa.array(list(face_ids)))
    for col, value in (("status", "human"), ("reason", "human_same_person: ID and live match")):
        i = t.schema.get_field_index(col)
        t = t.set_column(i, col, pc.if_else(hit, value, t.column(col)))
    write_group(st, "idcard", subject, t)


def test_a_person_decision_lapses_when_its_subject_s_id_photo_changes(tmp_path) -> None:
    """A KYC probe split subject S (id.jpg and live1 moved to a new folder T) and swapped two
    subjects' id.jpg. Annotators had confirmed the live photos against the ID photos their
    subjects had then; those answers stayed (S's live2 confirmed with no ID photo left, the
    same person in two dataset classes; a swapped subject's live photo confirmed against
    another person's ID). An answer now stands only while its subject's ID photo is the one
    it was given against."""
    from tasks.label import label_run

    rng = np.random.default_rng(9)
    a, b = rng.normal(size=512), rng.normal(size=512)
    settings, st = _id_store(
        tmp_path,
        {
            "S": [("id.jpg", "id", _unit(1, a))]
            + [(f"live{k}.jpg", "live", _unit(1 + k, a)) for k in (1, 2)],
            "B": [("id.jpg", "id", _unit(5, b)), ("live1.jpg", "live", _unit(6, b))],
        },
    )
    _confirm(st, "S", "S-live1.jpg", "S-live2.jpg")
    _confirm(st, "B", "B-live1.jpg")
    rows = [
        _moved(f"/in/idcards/S/{n}", f"/in/idcards/T/{n}", role, "r2")
        for n, role in (("id.jpg", "id"), ("live1.jpg", "live"))
    ]
    res = label_run(settings, st, "r2", None, rows, use_ray=False)
    assert (res.refiled_faces, res.lapsed_answers) == (2, 1)
    after = _id_faces(st)
    assert (after["S-live1.jpg"]["source_group"], after["S-live1.jpg"]["status"]) == (
        "T",
        "human",
    )
    assert after["S-live1.jpg"]["identity_id"] == "T"
    left = after["S-live2.jpg"]
    assert left["source_group"] == "S" and left["status"] == "quarantined", left
    assert left["reason"].startswith("idcard_no_id_photo"), left

    # T's and B's ID photos swap names.
    swap = [
        _moved("/in/idcards/S/id.jpg", "/in/idcards/B/id.jpg", "id", "r3"),
        _moved("/in/idcards/B/id.jpg", "/in/idcards/T/id.jpg", "id", "r3"),
    ]
    label_run(settings, st, "r3", None, swap, use_ray=False)
    after = _id_faces(st)
    assert (after["S-id.jpg"]["source_group"], after["B-id.jpg"]["source_group"]) == ("B", "T")
    for live in ("S-live1.jpg", "B-live1.jpg"):
        assert after[live]["status"] not in ("human", "auto"), after[live]


def test_a_full_relabel_moves_faces_a_store_left_with_the_subject_a_photo_left(tmp_path) -> None:
    """A store written before faces followed their ID photo: a live capture moved from A to B
    had its moved row, and its face still in A. A full relabel (a new label state version runs
    one) puts it where its photo is."""
    from storage.tables import append_images
    from tasks.label import label_run

    rng = np.random.default_rng(11)
    a, b = rng.normal(size=512), rng.normal(size=512)
    settings, st = _id_store(
        tmp_path,
        {
            "A": [("id.jpg", "id", _unit(1, a)), ("live2.jpg", "live", _unit(3, b))],
            "B": [("id.jpg", "id", _unit(4, b))],
        },
    )
    row = _moved("/in/idcards/A/live2.jpg", "/in/idcards/B/live2.jpg", "live", "r2")
    append_images(st, "r2", pa.Table.from_pylist([row]))  # recorded, faces not moved
    assert _id_faces(st)["A-live2.jpg"]["source_group"] == "A"
    label_run(settings, st, "r3", None, [], use_ray=False)
    assert _id_faces(st)["A-live2.jpg"]["source_group"] == "A"  # an incremental run: no move
    label_run(settings, st, "r4", None, [], relabel_all=True, use_ray=False)
    moved = _id_faces(st)["A-live2.jpg"]
    assert (moved["source_group"], moved["status"], moved["identity_id"]) == ("B", "auto", "B")


def test_an_id_photo_and_a_live_photo_swapped_in_their_folder_swap_roles(tmp_path) -> None:
    """An operator fixed misnamed files: subject S's id.jpg held a live capture and live1.jpg
    the ID photo, and they swapped them. Both were "moved" and their faces kept their old roles
    (the capture judged as the ID photo): S stayed out of training where a store built from
    the same files accepted it. The faces take the roles of their new places, and S is
    verified again."""
    from tasks.label import label_run

    rng = np.random.default_rng(8)
    a, b = rng.normal(size=512), rng.normal(size=512)
    settings, st = _id_store(
        tmp_path,
        {
            "S": [
                ("id.jpg", "id", _unit(1, b)),  # a live capture of someone else, misnamed
                ("live1.jpg", "live", _unit(2, a)),  # S's ID photo, misnamed
                ("live2.jpg", "live", _unit(3, a)),  # S's live capture
            ]
        },
    )
    before = _id_faces(st)
    assert before["S-live2.jpg"]["status"] != "auto"
    rows = [
        _moved("/in/idcards/S/live1.jpg", "/in/idcards/S/id.jpg", "id", "r2"),
        _moved("/in/idcards/S/id.jpg", "/in/idcards/S/live1.jpg", "live", "r2"),
    ]
    label_run(settings, st, "r2", None, rows, use_ray=False)
    after = _id_faces(st)
    assert len(after) == len(before)
    assert (after["S-live1.jpg"]["role"], after["S-live1.jpg"]["image_uri"]) == (
        "id",
        "/in/idcards/S/id.jpg",
    )
    assert after["S-id.jpg"]["role"] == "live"
    assert (after["S-live2.jpg"]["status"], after["S-live2.jpg"]["identity_id"]) == ("auto", "S")
    assert after["S-live1.jpg"]["status"] == "auto"
    assert after["S-id.jpg"]["status"] != "auto"  # someone else's capture


def test_the_id_picture_inside_a_live_photo_is_no_live_capture() -> None:
    """An impostor's live photo with the subject's ID chip pasted in a corner (a held-up card)
    was accepted: the chip's face matched the ID at 0.99. A face that close to the ID face is
    the ID picture: rejected, and the photo's other faces are judged without it; a subject whose
    only live photo is the card on a table goes to review."""
    from faceloop.vocab import LIVE_IS_ID_PHOTO

    rng = np.random.default_rng(7)
    p, impostor, q = rng.normal(size=512), rng.normal(size=512), rng.normal(size=512)
    rows = _idcard_rows(
        "H",
        [
            ("H-id", "id", "id.jpg", _near(p, 1.0), 90.0),
            ("H-holder", "live", "live1.jpg", _unit(2, impostor), 150.0),
            ("H-card", "live", "live1.jpg", _near(p, 0.99), 60.0),
        ],
    )
    rows += _idcard_rows(
        "C",
        [
            ("C-id", "id", "id.jpg", _near(q, 1.0), 90.0),
            ("C-card", "live", "live1.jpg", _near(q, 0.995), 80.0),
        ],
    )
    rows += _idcard_rows(
        "G",  # a genuine subject holding its own card: its own face is the one compared
        [
            ("G-id", "id", "id.jpg", _near(impostor, 1.0), 90.0),
            ("G-self", "live", "live1.jpg", _unit(6, impostor), 150.0),
            ("G-card", "live", "live1.jpg", _near(impostor, 0.99), 50.0),
        ],
    )
    table = pa.Table.from_pylist(
        rows, schema=FACES_SCHEMA.remove(FACES_SCHEMA.get_field_index("aligned_jpeg"))
    )
    d, _ = relabel(Settings(), table, {("idcard", s) for s in "HCG"})
    assert (d["H-card"].status, d["H-card"].code) == ("rejected", LIVE_IS_ID_PHOTO)
    assert "ID picture" in d["H-card"].detail
    assert d["H-holder"].status == "rejected" and d["H-id"].status != "auto"
    assert (d["C-card"].status, d["C-id"].status, d["C-id"].code) == (
        "rejected",
        "review",
        LIVE_IS_ID_PHOTO,
    )
    assert d["C-id"].detail == "live1.jpg holds the ID picture: no live capture to compare"
    assert d["G-self"].status == "auto" and d["G-card"].code == LIVE_IS_ID_PHOTO


def _near(base: np.ndarray, cos: float) -> list[float]:
    """A unit vector at cosine ``cos`` to ``base``."""
    b = np.asarray(base, np.float64) / np.linalg.norm(base)
    o = np.random.default_rng(11).normal(size=b.size)
    o -= (o @ b) * b
    o /= np.linalg.norm(o)
    return (cos * b + np.sqrt(max(0.0, 1 - cos * cos)) * o).astype(np.float32).tolist()
