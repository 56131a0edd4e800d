"""`faceloop eval` end to end: a benchmark built from a labelled folder the test makes from face
photos installed packages ship (the ``labelled_people`` fixture), the refresh's stages
in-process (inline engine, no servers), scored against the truth beside the anchor, then the
same faces after one review round answered from the truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faceloop.cli import main


def test_eval_scores_the_labels_the_anchor_and_one_review_round(
    labelled_people: Path, model_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  root: {model_root}\nreview:\n  enabled: false\n")
    out = tmp_path / "eval"
    args = [
        "eval",
        "--labelled",
        str(labelled_people),
        "--seed",
        "0",
        "--out",
        str(out),
        "--config",
        str(config),
        "--albums",
        "2",
        "--people-per-album",
        "3",
        "--id-subjects",
        "6",
        "--id-crop",
        "0.55",
        "--engine",
        "inline",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "eval.json").read_text())
    results, review = doc["results"], doc["review_round"]
    assert json.loads((out / "bench" / "truth.json").read_text())["params"]["id_crop"] == 0.55

    # Both labellers scored the same truth faces, and nearly all were found.
    fl, anchor = results["faceloop"], results["baseline"]
    det = fl["detection"]
    assert det["central_face_found"] >= 0.9 * det["truth_images"]
    assert fl["albums"]["faces"] == anchor["albums"]["faces"] > 0
    # Shots of one face: faceloop labels these easy albums without mixing anyone.
    assert fl["albums"]["pairwise_precision"] == 1.0
    assert fl["albums"]["pairwise_recall"] > 0.5
    assert fl["idcards"]["genuine"] + fl["idcards"]["impostor"] > 0
    # Duplicate claims are scored against the photos the subjects were given; the anchor has
    # no such check. Nothing here is claimed that was not given twice.
    claims = fl["claims"]
    assert claims["caught"] + claims["missed"] == claims["subjects_sharing_a_photo"]
    assert claims["false"] == 0
    assert anchor["claims"]["claimed"] == 0
    assert "ID: duplicate claims caught (subjects)" in printed

    # The review round: its tasks by kind add up, and its figures are those of the same faces.
    assert review["tasks"] == sum(review["tasks_by_kind"].values())
    after = review["figures"]
    assert after["albums"]["faces"] == fl["albums"]["faces"]
    assert after["albums"]["pairwise_precision"] >= fl["albums"]["pairwise_precision"] - 1e-9
    assert after["idcards"]["impostors_accepted"] == fl["idcards"]["impostors_accepted"]
    assert after["idcards"]["genuine_accepted"] >= fl["idcards"]["genuine_accepted"]
    # every question asked was answered and settled faces: less is left in review
    if review["tasks"] > review["unanswerable"]:
        assert review["faces_settled"] > 0
    assert after["idcards"]["review_share"] <= fl["idcards"]["review_share"]
    assert after["albums"]["review_share"] <= fl["albums"]["review_share"]
    assert "after one review round answered from the truth" in printed
    assert "faceloop after one review round" in (out / "report.html").read_text()

    # The same --out with another labelled folder printed the first folder's figures (exit 0),
    # and once the folder was moved, figures of 0 (its store names the photos where they were).
    other = tmp_path / "other"
    other.mkdir()
    i = args.index("--labelled") + 1
    assert main([*args[:i], str(other), *args[i + 1 :]]) == 2
    assert "another labelled folder" in capsys.readouterr().err
    moved = tmp_path / "moved"
    out.rename(moved)
    j = args.index("--out") + 1
    assert main([*args[:j], str(moved), *args[j + 1 :]]) == 2
    assert "moved since" in capsys.readouterr().err


def test_eval_refuses_an_id_crop_outside_its_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--labelled", str(tmp_path), "--out", str(out), "--id-crop", "3"]
    assert main(args) == 2
    assert not out.exists()
    assert "faceloop: error: --id-crop 3" in capsys.readouterr().err


def test_eval_checks_its_config_before_building_anything(
    labelled_people: Path, tmp_path: Path
) -> None:
    """A typo in the config was reported after the whole benchmark had been made."""
    config = tmp_path / "config.yaml"
    config.write_text("modles: {}\n")
    out = tmp_path / "eval"
    args = ["eval", "--labelled", str(labelled_people), "--out", str(out), "--config", str(config)]
    args += ["--albums", "2", "--people-per-album", "3", "--id-subjects", "6"]
    assert main(args) == 2
    assert not (out / "bench").exists()
