"""Duplicate claims: one ID or live photo filed under two ID subjects sends every subject involved
to review with ``duplicate_claim: <other subject's pseudonym>``; a photo reused inside one album
stays ``duplicate_content``. Unit tests of the rule, then two runs of the real stages (discover,
detect/embed with the shipped models, label) on the packages' sample photos."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from faceloop.vocab import DUPLICATE_CLAIM, Reason, TaskKind, task_kind_for_code
from tasks.label import claim_reasons, duplicate_claims


def _row(uri: str, group: str, sha: str, phash: int | None, role: str = "live", **kw):
    return {
        "image_uri": uri,
        "image_sha256": sha,
        "source_kind": kw.pop("kind", "idcard"),
        "source_group": group,
        "role": role,
        "status": kw.pop("status", "ok"),
        "reason": kw.pop("reason", None),
        "reason_code": None,
        "run_id": "r1",
        "phash": phash,
    }


def test_identical_and_near_identical_photos_of_two_subjects_are_claims():
    rows = [
        _row("a/live1", "A", "s1", 0b0),
        _row("b/live1", "B", "s1", 0b0, reason="duplicate_content: same bytes as a/live1"),
        _row("c/live1", "C", "s2", 0b111),  # 3 bits from A's: a re-encoded copy
        _row("d/live1", "D", "s3", (1 << 40) - 1),  # 40 bits away: another photo
        _row("d/id", "D", "s4", 0b0, role="id", status="quarantined"),  # never decoded
        _row("e/id", "E", "s5", 0b1, role="id"),  # 1 bit from A's live photo
    ]
    claims = duplicate_claims(rows, focus={"A", "B", "C", "D", "E"})
    assert claims["A"] == {"B": "identical", "C": "near-identical", "E": "near-identical"}
    assert claims["B"]["A"] == "identical"
    assert set(claims["C"]) == {"A", "B", "E"}
    assert "D" not in claims
    # only subjects in focus, and those they share a photo with, are reported
    assert set(duplicate_claims(rows, focus={"C"})) == {"A", "B", "C", "E"}
    assert duplicate_claims(rows, focus={"D"}) == {}


def test_one_subject_and_albums_are_not_claims():
    rows = [
        _row("a/id", "A", "s1", 5, role="id"),
        _row("a/live1", "A", "s1", 5),  # the ID photo reused as a live photo: one subject
        _row("alb/x.jpg", "album_1", "s1", 5, role="album", kind="album"),
        _row("alb/y.jpg", "album_2", "s1", 5, role="album", kind="album"),
        _row("b/live1", "B", "unread:unreadable", None, status="quarantined"),
    ]
    assert duplicate_claims(rows, focus={"A", "B", "album_1"}) == {}


def test_latest_row_of_a_uri_wins():
    rows = [
        _row("b/live1", "B", "s1", 0),
        _row("a/live1", "A", "s1", 0),
        {**_row("b/live1", "B", "s9", (1 << 40) - 1), "run_id": "r2"},  # B's file changed since
    ]
    assert duplicate_claims(rows, focus={"A"}) == {}


def test_a_photo_moved_to_another_subject_is_not_claimed_by_the_place_it_left():
    """Renaming a subject folder (S103 -> S203) sent both names to review as claiming each
    other's photos, and dropped them from the dataset: the old rows stay in the images table,
    and a later ``moved`` row of the same content says they are no longer listed."""
    moved = "moved: same bytes as s103/live1, no longer listed"
    far = (1 << 40) - 1  # the live photo's pHash: far from the ID photo's
    rows = [
        _row("s103/id", "S103", "s1", 0b0, role="id"),
        _row("s103/live1", "S103", "s2", far),
        {**_row("s203/id", "S203", "s1", 0b0, role="id"), "reason_code": "moved"},
        {**_row("s203/live1", "S203", "s2", far, reason=moved), "run_id": "r2"},
    ]
    assert duplicate_claims(rows, focus={"S103", "S203"}) == {}
    # A copy while the original is still listed is a claim, as before.
    copied = [*rows[:2], _row("s9/live1", "S9", "s2", far, reason="duplicate_content: ...")]
    assert duplicate_claims(copied, focus={"S9"}) == {
        "S9": {"S103": "identical"},
        "S103": {"S9": "identical"},
    }
    # Moved back: the place it left now is the other one.
    back = [*rows, {**_row("s103/live1", "S103", "s2", far, reason=moved), "run_id": "r3"}]
    assert duplicate_claims(back, focus={"S103", "S203"}) == {}


def test_near_identical_photos_must_hold_the_same_face():
    # Tight ID chips of different people can hash a few bits apart (a 6-bit pair was found on
    # `faceloop eval --seed 4`): a near-identical pHash is a claim only when ``confirm`` agrees;
    # identical bytes are a claim whatever it says.
    rows = [
        _row("a/id", "A", "s1", 0b0, role="id"),
        _row("b/id", "B", "s2", 0b111111, role="id"),  # 6 bits: another person's chip
        _row("c/live1", "C", "s3", 0b11),  # 2 bits: a re-encoded copy of A's chip
        _row("d/live1", "D", "s1", 0b0),  # A's chip byte for byte
    ]
    asked: list[tuple[str, str]] = []

    def confirm(a: dict, b: dict) -> bool:
        asked.append((a["source_group"], b["source_group"]))
        return "B" not in (a["source_group"], b["source_group"])  # B's chip: another person

    claims = duplicate_claims(rows, focus={"A", "B", "C", "D"}, confirm=confirm)
    assert claims["A"] == {"C": "near-identical", "D": "identical"}
    assert "B" not in claims
    assert ("A", "A") not in asked and ("A", "D") not in asked  # same subject; identical bytes
    # without a check every pHash-near pair is a claim (the rule before)
    assert set(duplicate_claims(rows, focus={"B"})) == {"A", "B", "C", "D"}


def test_hashes_a_little_further_apart_are_claims_only_when_the_faces_match():
    # A chip resized to 0.5x and saved at JPEG 40 can move 7-8 bits: a claim when the faces say
    # so; when they cannot be compared (None), only within PHASH_NEAR_BITS.
    rows = [
        _row("a/id", "A", "s1", 0b0, role="id"),
        _row("b/live1", "B", "s2", 0xFF),  # 8 bits, the faces match: a resized copy
        _row("c/live1", "C", "s3", 0xFF00),  # 8 bits, no face to compare
        _row("d/live1", "D", "s4", 0x3F0000),  # 6 bits, no face to compare
        _row("e/live1", "E", "s5", 0x1FF000000),  # 9 bits: too far whatever the faces say
    ]

    def confirm(a: dict, b: dict) -> bool | None:
        # B's and E's faces match A's; the others have none to compare
        return True if {a["source_group"], b["source_group"]} & {"B", "E"} else None

    claims = duplicate_claims(rows, focus={"A"}, confirm=confirm)
    assert claims["A"] == {"B": "near-identical", "D": "near-identical"}


def test_a_live_photo_with_a_face_pasted_in_is_the_same_capture():
    # A live photo filed again with a stranger's face pasted into a corner moves up to ~20 bits
    # (docs/QUALITY.md): two live photos within PHASH_COPY_BITS (16) whose faces are nearly
    # identical (``same_capture``) are one photo. ID chips stay on the tighter rules, whose
    # near pairs are dense (they all look alike), and so does anything farther apart.
    from faceloop.hashing import PHASH_COPY_BITS

    assert PHASH_COPY_BITS == 16
    rows = [
        _row("a/live1", "A", "s1", 0b0),
        _row("b/live1", "B", "s2", (1 << 14) - 1),  # 14 bits, same capture: pasted copy
        _row("c/id", "C", "s3", (1 << 14) - 1, role="id"),  # 14 bits, but an ID chip
        _row("d/live1", "D", "s4", (1 << 21) - 1),  # 21 bits: too far
        _row("e/live1", "E", "s5", ((1 << 14) - 1) << 20),  # 14 bits, faces not that close
        _row("f/live1", "F", "s6", ((1 << 12) - 1) << 40),  # 12 bits, no face to compare
    ]
    asked: list[str] = []

    def same_capture(a: dict, b: dict, main_only: bool = False) -> bool | None:
        other = b["source_group"] if a["source_group"] == "A" else a["source_group"]
        asked.append(other)
        assert not main_only  # all within PHASH_COPY_BITS, but D: beyond the main-face reach too
        return {"B": True, "C": True, "D": True, "E": False}.get(other)

    def confirm(a: dict, b: dict) -> bool | None:
        return None  # nothing within PHASH_VERIFIED_BITS here

    claims = duplicate_claims(rows, focus={"A"}, confirm=confirm, same_capture=same_capture)
    assert claims == {"A": {"B": "same capture"}, "B": {"A": "same capture"}}
    assert "C" not in asked and "D" not in asked  # a chip; beyond the reach
    # without same_capture (the rule before) none of them is a claim
    assert duplicate_claims(rows, focus={"A"}, confirm=confirm) == {}


def test_claim_faces_confirms_with_the_recognizer(tmp_path):
    from storage.objectstore import open_store
    from storage.tables import write_group
    from tasks.label import ClaimFaces

    rng = np.random.default_rng(0)
    p, q = rng.standard_normal(512), rng.standard_normal(512)  # two people, cosine ~0
    near = p + 0.3 * rng.standard_normal(512)  # the same face after a re-encode: cosine ~0.96
    store = open_store(str(tmp_path / "store"))
    write_group(
        store,
        "idcard",
        "A",
        pa.Table.from_pylist(
            [
                {
                    "face_id": "fa",
                    "image_uri": "a/id",
                    "image_sha256": "s1",
                    "source_kind": "idcard",
                    "source_group": "A",
                    "role": "id",
                    "embedding": p.astype(np.float32).tolist(),
                }
            ]
        ),
    )
    det = pa.table(
        {
            "image_sha256": ["s2", "s3", "s4", "s5"],
            "face_px": pa.array([100.0] * 4, pa.float32()),
            "embedding": pa.array(
                [q.tolist(), near.tolist(), (-p).tolist(), None], pa.list_(pa.float32())
            ),
        }
    )
    check = ClaimFaces(store, det, threshold=0.468)
    stored = _row("a/id", "A", "s1", 0, role="id")
    assert not check(stored, _row("b/id", "B", "s2", 0, role="id"))  # another person
    assert check(stored, _row("c/live1", "C", "s3", 0))  # the same face
    assert not check(_row("c/live1", "C", "s3", 0), _row("d/live1", "D", "s4", 0))
    # a photo whose faces were not embedded, or are nowhere to be found, cannot be checked
    assert check(stored, _row("e/live1", "E", "s5", 0)) is None
    assert check(stored, _row("f/live1", "F", "s6", 0)) is None
    # one capture asks for nearly the same face (COPY_COSINE 0.95): a re-encode's ~0.96 is,
    # another photo of the person (~0.75 in lfw-dev) is not
    assert check.same_capture(stored, _row("c/live1", "C", "s3", 0))
    other_photo = p + 1.2 * rng.standard_normal(512)  # cosine ~0.64
    det2 = pa.table(
        {
            "image_sha256": ["s7"],
            "face_px": pa.array([100.0], pa.float32()),
            "embedding": pa.array([other_photo.tolist()], pa.list_(pa.float32())),
        }
    )
    check2 = ClaimFaces(store, det2, threshold=0.468)
    g = _row("g/live1", "G", "s7", 0)
    assert check2(stored, g) and not check2.same_capture(stored, g)
    assert check.same_capture(stored, _row("e/live1", "E", "s5", 0)) is None


def test_claim_faces_finds_a_moved_photos_faces_under_the_subject_it_left(tmp_path):
    """A live photo moved from subject A's folder to B's this run: its faces are still in A's
    faces file (they follow the photo after the claims are found), so the check found none
    under B and could not tell; a claim beyond the hash reach was then missed until a later,
    unrelated run. It looks where the photo was recorded too."""
    from storage.objectstore import open_store
    from storage.tables import write_group
    from tasks.label import ClaimFaces

    rng = np.random.default_rng(1)
    p = rng.standard_normal(512)
    store = open_store(str(tmp_path / "store"))
    face = {"image_uri": "A/live2", "image_sha256": "s2", "source_kind": "idcard"}
    face |= {"source_group": "A", "role": "live", "face_px": 100.0}
    write_group(
        store,
        "idcard",
        "A",
        pa.Table.from_pylist(
            [face | {"face_id": "f2", "embedding": p.astype(np.float32).tolist()}]
        ),
    )
    det = pa.table(
        {
            "image_sha256": ["s1"],
            "face_px": pa.array([100.0], pa.float32()),
            "embedding": pa.array(
                [(p + 0.2 * rng.standard_normal(512)).tolist()], pa.list_(pa.float32())
            ),
        }
    )
    moved = _row("B/live3", "B", "s2", 0)
    other = _row("A/live1", "A", "s1", 0)
    assert ClaimFaces(store, det, threshold=0.468).same_capture(other, moved) is None
    check = ClaimFaces(store, det, threshold=0.468, recorded_in={"s2": {"A"}})
    assert check.same_capture(other, moved)


def test_reasons_name_the_others_by_pseudonym_and_ask_the_pair_question():
    reasons = claim_reasons({"A": {"C": "near-identical", "B": "identical"}}, lambda s: f"p-{s}")
    assert reasons == {"A": Reason(DUPLICATE_CLAIM, "p-B, p-C")}
    assert reasons["A"].text == "duplicate_claim: p-B, p-C"
    assert task_kind_for_code(DUPLICATE_CLAIM) == TaskKind.IDCARD_PAIR


def test_relabel_sends_claimed_subjects_to_review_and_keeps_bystanders():
    from faceloop.config import load_settings
    from faceloop.schema import FACES_SCHEMA
    from tasks.label import relabel

    rng = np.random.default_rng(0)
    person = rng.standard_normal(512).astype(np.float32)
    person /= np.linalg.norm(person)
    other = rng.standard_normal(512).astype(np.float32)
    other /= np.linalg.norm(other)

    def face(fid, group, role, emb, box, sha):
        return {
            "face_id": fid,
            "image_uri": f"{group}/{role}",
            "image_sha256": sha,
            "source_kind": "idcard",
            "source_group": group,
            "role": role,
            "bbox": box,
            "det_score": 0.9,
            "face_px": 100.0,
            "quality": 0.9,
            "embedding": emb.tolist(),
        }

    def capture(k: int) -> np.ndarray:  # another capture of the person: cosine ~0.9, not 1
        v = person + 0.45 * np.random.default_rng(k).standard_normal(512).astype(np.float32) / 22.6
        return v / np.linalg.norm(v)

    rows = [
        face("a-id", "A", "id", person, [0, 0, 100, 100], "s1"),
        face("a-live", "A", "live", capture(1), [0, 0, 100, 100], "s2"),
        face("a-bystander", "A", "live", other, [0, 0, 30, 30], "s2"),
        face("z-id", "Z", "id", person, [0, 0, 100, 100], "s3"),
        face("z-live", "Z", "live", capture(2), [0, 0, 100, 100], "s4"),
    ]
    table = pa.Table.from_pylist(rows, schema=FACES_SCHEMA)
    settings = load_settings(None, store="/nonexistent")
    affected = {("idcard", "A"), ("idcard", "Z")}
    plain, _ = relabel(settings, table, affected)
    assert plain["a-live"].status == "auto" and plain["z-live"].status == "auto"
    out, _ = relabel(settings, table, affected, claims={"A": Reason(DUPLICATE_CLAIM, "p-B")})
    for fid in ("a-id", "a-live"):
        assert out[fid].status == "review" and out[fid].identity_id == "A"
        assert out[fid].reason == "duplicate_claim: p-B"
    assert out["a-bystander"] == plain["a-bystander"]  # not the claimed person: unchanged
    assert out["z-live"] == plain["z-live"]  # no claim, no change


# --- two runs of the real stages --------------------------------------------------------------


def _reencode(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        small = im.convert("RGB").resize((round(im.width * 0.8), round(im.height * 0.8)))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=40)
    dst.write_bytes(buf.getvalue())


def test_claims_across_runs_through_the_stages(tmp_path, sample_photos, model_root):
    from faceloop.commands.evaluate import _refresh_inline
    from faceloop.config import SourceSpec, load_settings
    from storage.objectstore import open_store
    from storage.secret import pseudonym
    from storage.tables import read_faces, read_images

    inputs, store_dir = tmp_path / "in", tmp_path / "store"
    ids, albums = inputs / "idcards", inputs / "albums"

    def put(rel: str, src: Path) -> None:
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, inputs / rel)

    put("idcards/A/id.jpg", sample_photos["tom_hanks"])
    put("idcards/A/live1.jpg", sample_photos["yaoming"])
    put("albums/X/a.jpg", sample_photos["t1"])
    settings = load_settings(
        None,
        store=str(store_dir),
        sources=[
            SourceSpec(kind="album", uri=str(albums)),
            SourceSpec(kind="idcard", uri=str(ids)),
        ],
        models={"root": str(model_root)},
        review={"enabled": False},
    )
    store = open_store(str(store_dir))

    def faces_by_subject() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in read_faces(
            store, columns=["source_group", "role", "status", "reason"]
        ).to_pylist():
            out.setdefault(r["source_group"], []).append(r)
        return out

    _refresh_inline(settings)
    first = faces_by_subject()
    assert first["A"] and not any(
        (r["reason"] or "").startswith(DUPLICATE_CLAIM) for rs in first.values() for r in rs
    )

    # Second run: B files A's live photo byte for byte, C a re-encoded, resized copy of it; the
    # album gets a second copy of its photo.
    put("idcards/B/id.jpg", sample_photos["gdp"])
    put("idcards/B/live1.jpg", ids / "A" / "live1.jpg")
    put("idcards/C/id.jpg", sample_photos["players"])
    (ids / "C").mkdir(exist_ok=True)
    _reencode(ids / "A" / "live1.jpg", ids / "C" / "live1.jpg")
    put("albums/X/b.jpg", sample_photos["t1"])
    _refresh_inline(settings)

    name = {s: pseudonym(store, "subject", s) for s in "ABC"}
    faces = faces_by_subject()
    # The pseudonym a claim names leads to that subject's photos and faces.
    from faceloop.commands.explain import explain

    shown = explain(store, name["B"])
    assert {r["source_group"] for r in shown["images"]} == {"B"} and shown["faces"]
    # So do the dataset's class name and the identity pseudonym explain prints for its faces
    # (both led nowhere), and its faces are listed by photo, not as "other content this path
    # held".
    from faceloop.commands.explain import render

    for other in (f"subject-{name['B']}", pseudonym(store, "identity", "B")):
        assert {r["source_group"] for r in explain(store, other)["images"]} == {"B"}
    text = render(shown)
    assert "other content this path held" not in text and "faces of id.jpg (" in text
    claimed_a = [r for r in faces["A"] if r["status"] == "review"]
    assert {r["role"] for r in claimed_a} == {"id", "live"}
    for r in claimed_a:
        assert r["reason"] == f"duplicate_claim: {', '.join(sorted([name['B'], name['C']]))}"
    b_id = [r for r in faces["B"] if r["role"] == "id" and r["status"] == "review"]
    assert b_id and all(r["reason"].startswith("duplicate_claim: ") for r in b_id)
    assert name["A"] in b_id[0]["reason"]
    c_live = [r for r in faces["C"] if r["role"] == "live" and r["status"] == "review"]
    assert c_live and name["A"] in c_live[0]["reason"]
    # No raw subject id in any reason; album faces are never claims.
    for subject, rows in faces.items():
        for r in rows:
            assert not any(f" {s}" in (r["reason"] or "") for s in "ABC" if s != subject)
            if subject == "X":
                assert not (r["reason"] or "").startswith(DUPLICATE_CLAIM)
    images = {
        str(Path(r["image_uri"]).relative_to(inputs)): r for r in read_images(store).to_pylist()
    }
    assert images["idcards/B/live1.jpg"]["reason_code"] == "duplicate_content"
    assert images["idcards/B/live1.jpg"]["phash"] == images["idcards/A/live1.jpg"]["phash"]
    assert images["albums/X/b.jpg"]["reason_code"] == "duplicate_content"
    assert images["albums/X/a.jpg"]["phash"] is None  # album photos are not hashed

    # A changed threshold relabels every subject (none got a new file): the claims stay. They
    # were dropped, and both claimants accepted and published.
    changed = settings.model_copy(deep=True)
    key = changed.thresholds_key
    th = changed.policy[key]
    changed.policy[key] = th.model_copy(update={"idcard_review": th.idcard_review + 0.01})
    _refresh_inline(changed)

    def claims() -> dict[str, list[tuple]]:
        return {
            s: sorted((r["role"], r["status"], r["reason"]) for r in rows)
            for s, rows in faces_by_subject().items()
            if s in "ABC"
        }

    relabelled = claims()
    for s in "ABC":
        assert [x for x in relabelled[s] if x[1] == "review"] == sorted(
            (r["role"], r["status"], r["reason"]) for r in faces[s] if r["status"] == "review"
        ), s

    # A is forgotten: the subjects that claimed a photo with A no longer name A's pseudonym
    # (it would show that A was once in the store), neither right away nor after the next
    # refresh, which decides them again: C's and B's claim was with A (and each other).
    from faceloop.cli import main
    from storage import layout
    from storage.recovery import label_work_left

    # C's open claim task (pushed before): it goes, and is asked again once C is decided again.
    c_claim = next(
        r["face_id"]
        for r in read_faces(store, columns=["face_id", "source_group", "reason"]).to_pylist()
        if r["source_group"] == "C" and (r["reason"] or "").startswith(DUPLICATE_CLAIM)
    )
    key = f"idcard_pair:C:x:{c_claim}"
    store.write_parquet(
        f"{layout.REVIEW_TASKS}/20250101T000000-test.parquet",
        pa.Table.from_pylist([{"key": key, "subject": "C", "face_ids": [c_claim]}]),
    )
    assert main(["forget", "--store", str(store_dir), "--subject", "A", "--yes"]) == 0
    assert not store.parquet_files(layout.REVIEW_TASKS)
    assert label_work_left(store), "a refresh with nothing new must decide C again"
    for when in ("after forget", "after the next refresh"):
        rows = [r for s, rs in faces_by_subject().items() for r in rs]
        print(
            when,
            sorted(
                (s, r["role"], r["status"], r["reason"])
                for s, rs in faces_by_subject().items()
                for r in rs
            ),
        )
        assert not any(name["A"] in (r["reason"] or "") for r in rows), when
        _refresh_inline(settings)
    after = faces_by_subject()
    assert "A" not in after
    # B's live photo had A's bytes (forgotten with A); C's is a re-encoded copy of it: no
    # photo is claimed twice any more, and neither subject stays in review for a claim.
    assert not any((r["reason"] or "").startswith(DUPLICATE_CLAIM) for s in "BC" for r in after[s])
    assert not store.exists("state/relabel_subjects.json") and not label_work_left(store)


def test_beyond_the_copy_reach_only_the_main_faces_make_one_capture():
    # Between PHASH_COPY_BITS (16) and PHASH_MAIN_COPY_BITS (20) bits a pasted copy is still
    # one capture when the two photos' main faces are nearly identical; two different people's
    # photos that share a bystander's face (a pasted stranger drawn twice) are not.
    from faceloop.hashing import PHASH_COPY_BITS, PHASH_MAIN_COPY_BITS

    assert (PHASH_COPY_BITS, PHASH_MAIN_COPY_BITS) == (16, 20)
    rows = [
        _row("a/live1", "A", "s1", 0b0),
        _row("b/live1", "B", "s2", (1 << 18) - 1),  # 18 bits: a copy, its main face A's
        _row("c/live1", "C", "s3", ((1 << 19) - 1) << 30),  # 19 bits: only a bystander shared
        _row("d/live1", "D", "s4", ((1 << 12) - 1) << 50),  # 12 bits: any face may match
    ]
    calls: list[tuple[str, bool]] = []

    def same_capture(a: dict, b: dict, main_only: bool = False) -> bool | None:
        other = b["source_group"] if a["source_group"] == "A" else a["source_group"]
        calls.append((other, main_only))
        main = {"B": True, "C": False, "D": False}[other]
        any_face = {"B": True, "C": True, "D": True}[other]
        return main if main_only else any_face

    claims = duplicate_claims(
        rows, focus={"A"}, confirm=lambda a, b: None, same_capture=same_capture
    )
    assert claims == {
        "A": {"B": "same capture", "D": "same capture"},
        "B": {"A": "same capture"},
        "D": {"A": "same capture"},
    }
    assert sorted(calls) == [("B", True), ("C", True), ("D", False)]


def test_claim_faces_main_only_compares_the_largest_faces(tmp_path):
    from storage.objectstore import open_store
    from tasks.label import ClaimFaces

    rng = np.random.default_rng(1)
    p, q, r, bystander = (rng.standard_normal(512) for _ in range(4))
    det = pa.table(
        {
            "image_sha256": ["s1", "s1", "s2", "s2", "s3", "s3"],
            "face_px": pa.array([40.0, 90.0, 95.0, 38.0, 92.0, 41.0], pa.float32()),
            "embedding": pa.array(
                [v.tolist() for v in (bystander, p, p, bystander, q, r)],
                pa.list_(pa.float32()),
            ),
        }
    )
    check = ClaimFaces(open_store(str(tmp_path / "store")), det, threshold=0.468)
    a, b, c = _row("a/live1", "A", "s1", 0), _row("b/live1", "B", "s2", 0), _row("c", "C", "s3", 0)
    assert check.same_capture(a, b) and check.same_capture(a, b, main_only=True)  # main faces p
    # a and c share nothing; a and a photo holding the bystander only as a second face: no
    assert not check.same_capture(a, c, main_only=True)
    assert check.best(a, b, main_only=True) == pytest.approx(1.0)


def test_same_capture_asks_about_the_nearest_photos_only():
    # Each check may read another subject's faces: a photo asks about its COPY_CANDIDATES
    # nearest live photos within PHASH_COPY_BITS, nearest first, whatever the store holds.
    from tasks.label import COPY_CANDIDATES

    rows = [_row("a/live1", "A", "s0", 0b0)]
    for k in range(24):  # 24 subjects' photos, 9 + k % 8 bits away, each a distinct pattern
        n = 9 + k % 8
        rows.append(_row(f"x{k}/live1", f"X{k}", f"s{k + 1}", ((1 << n) - 1) << (k % 40)))
    asked: list[int] = []

    def same_capture(a: dict, b: dict, main_only: bool = False) -> bool:
        asked.append(int(b["phash"]).bit_count())
        return False

    assert (
        duplicate_claims(rows, focus={"A"}, confirm=lambda a, b: None, same_capture=same_capture)
        == {}
    )
    assert len(asked) == COPY_CANDIDATES == 16
    assert asked == sorted(asked) and max(asked) <= 9 + 7


def test_pairs_the_recognizer_told_apart_use_no_same_capture_check():
    # A pair within PHASH_VERIFIED_BITS that ``confirm`` judged to be two people cannot be one
    # capture (its faces are farther apart than a copy's), so it is not asked about and does
    # not use one of the photo's COPY_CANDIDATES checks: a pasted copy behind 16 look-alike
    # chips' owners is still found.
    from faceloop.hashing import PHASH_VERIFIED_BITS
    from tasks.label import COPY_CANDIDATES

    rows = [_row("a/live1", "A", "s0", 0b0)]
    for k in range(COPY_CANDIDATES):  # nearer than the copy, told apart by the recognizer
        n = 1 + k % PHASH_VERIFIED_BITS
        rows.append(_row(f"x{k}/live1", f"X{k}", f"s{k + 1}", ((1 << n) - 1) << (k % 40)))
    rows.append(_row("b/live1", "B", "sb", (1 << 14) - 1))  # the pasted copy, 14 bits away
    asked: list[str] = []

    def same_capture(a: dict, b: dict, main_only: bool = False) -> bool:
        asked.append(b["source_group"])
        return b["source_group"] == "B"

    claims = duplicate_claims(
        rows, focus={"A"}, confirm=lambda a, b: False, same_capture=same_capture
    )
    assert claims == {"A": {"B": "same capture"}, "B": {"A": "same capture"}}
    assert asked == ["B"]


def test_a_claim_clears_when_the_photo_that_made_it_is_restored(
    tmp_path, sample_photos, model_root
):
    """B's id.jpg was overwritten with a copy of A's ID photo: both subjects went to review for
    the claim, as they should. Restoring B's own photo decided B again but not A, whose faces
    stayed in review (out of every dataset) for a claim that no longer held."""
    from faceloop.commands.evaluate import _refresh_inline
    from faceloop.config import SourceSpec, load_settings
    from storage.objectstore import open_store
    from storage.tables import read_faces

    ids = tmp_path / "in" / "idcards"
    for subject, id_photo, live in (("A", "tom_hanks", "yaoming"), ("B", "gdp", "players")):
        (ids / subject).mkdir(parents=True)
        shutil.copyfile(sample_photos[id_photo], ids / subject / "id.jpg")
        shutil.copyfile(sample_photos[live], ids / subject / "live1.jpg")
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[SourceSpec(kind="idcard", uri=str(ids))],
        models={"root": str(model_root)},
        review={"enabled": False},
    )
    store = open_store(settings.store)

    def claimed() -> set[str]:
        return {
            r["source_group"]
            for r in read_faces(store, columns=["source_group", "reason"]).to_pylist()
            if (r["reason"] or "").startswith(DUPLICATE_CLAIM)
        }

    _refresh_inline(settings)
    assert claimed() == set()
    own = (ids / "B" / "id.jpg").read_bytes()
    _reencode(ids / "A" / "id.jpg", ids / "B" / "id.jpg")
    _refresh_inline(settings)
    assert claimed() == {"A", "B"}
    (ids / "B" / "id.jpg").write_bytes(own)
    _refresh_inline(settings)
    assert claimed() == set()
