"""faceloop loop-eval: split by person, label and train on the train people, compare the base
and the trained recognizer on the test people. End to end on a labelled folder made from face
photos installed packages ship (the ``labelled_people`` fixture: each detected face becomes a
person with a few augmented shots), through the inline engine (the refresh's stages
in-process, no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.benchmark import Truth
from evaluation.loop_eval import FARS, format_table, split_people
from faceloop.cli import main
from faceloop.hashing import sha256_file


def test_split_is_by_person_seeded_and_proportional() -> None:
    people = {f"p{i:03d}": [Path(f"{i}_{k}.jpg") for k in range(1 + i % 3)] for i in range(90)}
    train, test = split_people(people, seed=3, test_share=0.3)
    assert not set(train) & set(test) and set(train) | set(test) == set(people)
    assert len(test) == 27  # 30% of the 60 with >= 2 images + 30% of the 30 with one
    assert sum(len(people[p]) == 1 for p in test) == 9
    assert split_people(people, seed=3, test_share=0.3) == (train, test)
    assert split_people(people, seed=4, test_share=0.3)[1] != test
    with pytest.raises(ValueError):
        split_people(people, seed=0, test_share=1.0)


def test_loop_eval_end_to_end(
    labelled_people: Path, model_root: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  root: {model_root}\n")
    out = tmp_path / "loop"
    args = [
        "loop-eval",
        "--labelled",
        str(labelled_people),
        "--out",
        str(out),
        "--config",
        str(config),
        "--test-share",
        "0.5",
        "--train-albums",
        "2",
        "--test-albums",
        "2",
        "--people-per-album",
        "3",
        "--epochs",
        "20",
        "--lr",
        "1e-2",
        "--engine",
        "inline",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "loop_eval.json").read_text())

    # No test person is in the training benchmark (hence never in the published version).
    train_truth, test_truth = (
        Truth.load(out / "train" / "bench"),
        Truth.load(out / "test" / "bench"),
    )
    train_people = {r["person"] for r in train_truth.images.values()}
    test_people = {r["person"] for r in test_truth.images.values()}
    assert train_people and test_people and not train_people & test_people
    assert report["split"]["test_album_people"] == len(test_people)

    # The trained model was trained on the train store's published version, on top of the base.
    models = report["models"]
    shipped = next((model_root / "insightface").rglob("*.onnx"), None)
    assert shipped is not None
    assert models["base"]["sha256"] == models["trained"]["base_sha256"]
    assert models["trained"]["sha256"] == sha256_file(out / "model" / "recognizer.onnx")
    assert models["trained"]["sha256"] != models["base"]["sha256"]
    ds = report["train"]["dataset"]
    assert ds["version"] == 1 and ds["num_classes"] >= 2
    assert report["train"]["loss_after"] < report["train"]["loss_before"]

    # Both sides scored the same test faces, each embedded by its own model.
    base, trained = report["results"]["base"], report["results"]["trained"]
    for side in (base, trained):
        assert side["faces_embedded_by_model"] is True
        v = side["verification"]
        assert v["genuine_pairs"] > 0 and v["impostor_pairs"] > v["genuine_pairs"]
        for far in FARS:
            assert 0.0 <= v[f"far_{far:g}"]["tar"] <= 1.0
        assert 0.0 <= side["clustering"]["pairwise_precision"] <= 1.0
    assert base["verification"]["faces"] == trained["verification"]["faces"]
    assert base["verification"]["faces"] >= 0.9 * report["split"]["test_album_images"]
    # Shots of one face are far more alike than two people under either model...
    for side in (base, trained):
        assert side["verification"]["genuine_mean"] > side["verification"]["impostor_mean"] + 0.3
    # ... and the trained model really is another embedder on the test faces.
    assert trained["verification"]["genuine_mean"] != base["verification"]["genuine_mean"]
    # The base model labels these easy albums without mixing anyone.
    assert base["clustering"]["pairwise_precision"] == 1.0

    # The table and the phase timings are printed, with the pairs the TARs rest on; a TAR at
    # an extrapolated threshold (this small set's 1e-4) is marked as an estimate.
    assert format_table(report["results"]).splitlines()[0] in printed
    assert "impostor pairs" in printed
    methods = {
        side["verification"][f"far_{far:g}"]["method"] for side in (base, trained) for far in FARS
    }
    assert ("extrapolated from the impostor" in printed) == (methods != {"empirical"})
    for phase in ("label_train_albums", "train_on_top", "label_test_albums", "total"):
        assert report["seconds"][phase] >= 0 and phase in printed
    # Other split parameters on the same work folder are refused, not mixed in.
    assert main([*args[:-2], "--test-share", "0.4", "--engine", "inline"]) == 2
