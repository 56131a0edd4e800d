"""storage/dataset.py: exact partition over ranks x workers, determinism, resume, DataLoader."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.loader import bench_loader
from faceloop.errors import ConfigError, StorageError
from faceloop.schema import SHARD_SCHEMA
from storage.dataset import (
    FaceShardDataset,
    ResumableLoader,
    decode_image,
    load_version,
    partition_indices,
    rank_range,
)

torch.set_num_threads(1)

ImageFn = Callable[[int, int], np.ndarray]  # (global row, label) -> 112x112x3 RGB uint8


def solid_rgb(rgb: tuple[int, int, int]) -> np.ndarray:
    img = np.zeros((112, 112, 3), np.uint8)
    img[:] = rgb
    return img


def write_dataset(
    root: Path,
    name: str,
    shard_rows: Sequence[int],
    labels: Sequence[int],
    image_fn: ImageFn,
    version: int = 1,
    num_classes: int | None = None,
    latest: bool = True,
    pooled: bool = True,
) -> Path:
    """Write a committed dataset version in the DESIGN.md layout (shards, then manifest, then
    ``latest``); row ``i`` over all shards gets ``labels[i]`` and ``image_fn(i, labels[i])``.

    ``pooled`` (format /2, what publish writes): shards in ``datasets/<name>/shards/<sha256>``
    with identity ``id<label:06d>`` and no label, the labels in ``classes.parquet``; else
    format /1: shards in the version directory with the label in them."""
    assert sum(shard_rows) == len(labels)
    vdir = root / "datasets" / name / f"v{version}"
    vdir.mkdir(parents=True)
    (vdir.parent / "shards" if pooled else vdir / "shards").mkdir(exist_ok=True)
    n_classes = num_classes if num_classes is not None else len(set(labels))
    shards, i = [], 0
    for rows in shard_rows:
        jpegs, ids = [], []
        for j in range(i, i + rows):
            ok, buf = cv2.imencode(
                ".jpg", image_fn(j, labels[j])[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]
            )
            assert ok
            jpegs.append(buf.tobytes())
            ids.append(f"f{j:06d}")
        table = pa.table(
            {
                "face_id": ids,
                "identity_id": [f"id{labels[j]:06d}" for j in range(i, i + rows)],
                "label": pa.nulls(rows, pa.int64())
                if pooled
                else pa.array(labels[i : i + rows], pa.int64()),
                "image": pa.array(jpegs, pa.binary()),
                "quality": pa.array([0.9] * rows, pa.float32()),
                "source_kind": ["album"] * rows,
            },
            schema=SHARD_SCHEMA,
        )
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        rel = f"shards/{digest}.parquet" if pooled else f"shards/part-{len(shards):05d}.parquet"
        ((vdir.parent if pooled else vdir) / rel).write_bytes(data)
        shards.append({"file": rel, "rows": rows, "bytes": len(data), "sha256": digest})
        i += rows
    manifest = {
        "format": "faceloop.dataset/2" if pooled else "faceloop.dataset/1",
        "name": name,
        "version": version,
        "num_rows": len(labels),
        "shards": shards,
        "num_classes": n_classes,
    }
    if pooled:
        buf = pa.BufferOutputStream()
        pq.write_table(
            pa.table(
                {
                    "label": pa.array(range(n_classes), pa.int64()),
                    "identity_id": [f"id{k:06d}" for k in range(n_classes)],
                    "count": pa.array(
                        [list(labels).count(k) for k in range(n_classes)], pa.int64()
                    ),
                }
            ),
            buf,
        )
        data = buf.getvalue().to_pybytes()
        (vdir / "classes.parquet").write_bytes(data)
        manifest["classes"] = {
            "file": "classes.parquet",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    if latest:
        (root / "datasets" / name / "latest").write_text(f"v{version}")
    return vdir


def loader_order(parts: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """What DataLoader yields from per-worker streams: batch k of each worker, round-robin,
    skipping workers that are exhausted."""
    batches = [[p[i : i + batch_size] for i in range(0, len(p), batch_size)] for p in parts]
    out = []
    for k in range(max((len(b) for b in batches), default=0)):
        out.extend(b[k] for b in batches if k < len(b))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


SIZES = [[], [1], [3], [5, 0, 2], [7, 7, 7], [10, 1, 4, 20], [2] * 11]


@pytest.mark.parametrize("shard_rows", SIZES, ids=str)
@pytest.mark.parametrize("batch_size,window", [(1, 1), (3, 1), (2, 3)])
def test_every_sample_once_per_epoch(shard_rows: list[int], batch_size: int, window: int) -> None:
    n = sum(shard_rows)
    for world in range(1, 9):
        for num_workers in range(5):
            seen, sizes = [], []
            for rank in range(world):
                parts = [
                    partition_indices(
                        shard_rows,
                        seed=7,
                        epoch=2,
                        rank=rank,
                        world_size=world,
                        worker=w,
                        num_workers=num_workers,
                        batch_size=batch_size,
                        shuffle_window=window,
                    )
                    for w in range(max(num_workers, 1))
                ]
                stream = loader_order(parts, batch_size)
                # The loader's output is the rank's slice of the one epoch order.
                full = partition_indices(
                    shard_rows,
                    seed=7,
                    epoch=2,
                    rank=rank,
                    world_size=world,
                    batch_size=batch_size,
                    shuffle_window=window,
                )
                np.testing.assert_array_equal(stream, full)
                seen.append(stream)
                sizes.append(len(stream))
            allv = np.concatenate(seen) if seen else np.zeros(0)
            assert sorted(allv.tolist()) == list(range(n)), (world, num_workers)
            assert max(sizes) - min(sizes) <= 1


def test_rank_slices_concatenate_to_epoch_order() -> None:
    rows = [10, 1, 4, 20]
    whole = partition_indices(rows, seed=3, epoch=1, rank=0, world_size=1)
    for world in (2, 5, 8):
        parts = [
            partition_indices(rows, seed=3, epoch=1, rank=r, world_size=world) for r in range(world)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_order_is_deterministic_and_changes_with_epoch_and_seed() -> None:
    rows = [50, 30, 20, 40]
    kw = {
        "rank": 1,
        "world_size": 3,
        "worker": 1,
        "num_workers": 2,
        "batch_size": 4,
        "shuffle_window": 2,
    }
    a = partition_indices(rows, seed=5, epoch=0, **kw)
    np.testing.assert_array_equal(a, partition_indices(rows, seed=5, epoch=0, **kw))
    assert not np.array_equal(a, partition_indices(rows, seed=5, epoch=1, **kw))
    assert not np.array_equal(a, partition_indices(rows, seed=6, epoch=0, **kw))
    whole = partition_indices(rows, seed=5, epoch=0, rank=0, world_size=1)
    assert sorted(whole.tolist()) == list(range(140)) and whole.tolist() != list(range(140))
    plain = partition_indices(rows, seed=5, epoch=0, rank=0, world_size=1, shuffle=False)
    assert plain.tolist() == list(range(140))


def test_window_mixes_shards_within_a_block() -> None:
    rows = [20, 20, 20, 20]
    one = partition_indices(rows, seed=1, epoch=0, rank=0, world_size=1, shuffle_window=1)
    two = partition_indices(rows, seed=1, epoch=0, rank=0, world_size=1, shuffle_window=2)
    assert len(set(one[:20] // 20)) == 1  # window 1: the first 20 samples are one shard
    assert len(set(two[:20] // 20)) == 2  # window 2: two shards interleaved


@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (3, 2), (1, 4)])
def test_resume_skips_exactly_the_consumed_prefix(workers_before: int, workers_after: int) -> None:
    rows, bs = [9, 4, 13, 6], 3
    for world in (1, 3):
        for rank in range(world):
            full = loader_order(
                [
                    partition_indices(
                        rows,
                        seed=2,
                        epoch=4,
                        rank=rank,
                        world_size=world,
                        worker=w,
                        num_workers=workers_before,
                        batch_size=bs,
                    )
                    for w in range(max(workers_before, 1))
                ],
                bs,
            )
            start, stop = rank_range(sum(rows), rank, world)
            assert len(full) == stop - start
            for offset in range(len(full) + 1):
                rest = loader_order(
                    [
                        partition_indices(
                            rows,
                            seed=2,
                            epoch=4,
                            rank=rank,
                            world_size=world,
                            worker=w,
                            num_workers=workers_after,
                            batch_size=bs,
                            offset=offset,
                        )
                        for w in range(max(workers_after, 1))
                    ],
                    bs,
                )
                np.testing.assert_array_equal(rest, full[offset:])


def test_bad_partition_arguments_raise() -> None:
    with pytest.raises(ValueError):
        partition_indices([5], seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        partition_indices([5], seed=0, epoch=0, rank=0, world_size=1, offset=6)
    with pytest.raises(ValueError):
        partition_indices([5], seed=0, epoch=0, rank=0, world_size=1, worker=2, num_workers=2)


# --- against real files --------------------------------------------------------------------


def _colour(label: int) -> tuple[int, int, int]:
    return (40 + (label * 37) % 180, 200 - (label * 11) % 150, (label * 53) % 255)


@pytest.fixture(params=["pooled", "format1"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A 3-shard version, as publish writes it (shared pool, labels from classes.parquet) and
    as format /1 stores hold it (labels in the shards): the reader must read both alike."""
    rows = [10, 7, 13]
    write_dataset(
        tmp_path,
        "faces",
        rows,
        list(range(30)),
        lambda i, lab: solid_rgb(_colour(lab)),
        pooled=request.param == "pooled",
    )
    return tmp_path


def test_decode_is_rgb_normalised_like_insightface() -> None:
    ok, buf = cv2.imencode(".png", solid_rgb((200, 50, 10))[:, :, ::-1])
    assert ok
    x = decode_image(buf.tobytes())
    assert x.shape == (3, 112, 112) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 50, 50], (np.array([200, 50, 10]) - 127.5) / 127.5, atol=1e-6)


def test_dataloader_yields_each_sample_once_in_rank_order(store: Path) -> None:
    bs, got = 4, []
    for rank in range(2):
        ds = FaceShardDataset(str(store), "faces", rank=rank, world_size=2, seed=11, batch_size=bs)
        ds.set_epoch(3)
        labels, images = [], []
        for x, y in DataLoader(ds, batch_size=bs, num_workers=2):
            assert x.shape[1:] == (3, 112, 112) and x.dtype == torch.float32
            labels.extend(y.tolist())
            images.append(x)
        # Labels here are the global row ids, so they name the samples.
        expected = partition_indices(
            [10, 7, 13], seed=11, epoch=3, rank=rank, world_size=2, batch_size=bs, shuffle_window=4
        )
        assert labels == expected.tolist()
        centre = torch.cat(images)[:, :, 56, 56].numpy()
        want = (np.array([_colour(lab) for lab in labels]) - 127.5) / 127.5
        np.testing.assert_allclose(centre, want, atol=0.05)  # JPEG is lossy
        got.extend(labels)
    assert sorted(got) == list(range(30))


def test_dataloader_resume_mid_epoch(store: Path) -> None:
    """ResumableLoader counts what a plain DataLoader delivered (its workers' datasets are
    copies the main process cannot see): the caller passes no count."""
    bs = 3
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=4, batch_size=bs)
    ds.set_epoch(1)
    full = [y for _, ys in DataLoader(ds, batch_size=bs, num_workers=2) for y in ys.tolist()]
    seen = []
    loader = ResumableLoader(ds, num_workers=3)
    for _, ys in loader:
        seen.extend(ys.tolist())
        if len(seen) >= 12:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["world_size"], state["rank"], state["seed"]) == (1, 1, 0, 4)
    again = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=4, batch_size=bs)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert len(again) == 30 - 12
    rest = [y for _, ys in DataLoader(again, batch_size=bs, num_workers=0) for y in ys.tolist()]
    assert seen + rest == full
    assert sorted(full) == list(range(30))


def test_uncommitted_version_is_ignored(store: Path) -> None:
    (store / "datasets" / "faces" / "v2" / "shards").mkdir(parents=True)  # no manifest.json
    assert load_version(str(store), "faces").version == 1
    with pytest.raises(ConfigError):
        load_version(str(store), "faces", 2)
    with pytest.raises(ConfigError):
        load_version(str(store), "nothing")


def test_corrupt_shard_is_detected(store: Path) -> None:
    manifest = json.loads((store / "datasets" / "faces" / "v1" / "manifest.json").read_text())
    base = store / "datasets" / "faces"
    shard = (base if manifest["format"].endswith("/2") else base / "v1") / manifest["shards"][1][
        "file"
    ]
    shard.write_bytes(shard.read_bytes() + b"x")
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, shuffle=False)
    with pytest.raises(StorageError, match="sha256"):
        list(ds)


def test_bench_loader_measures_both_paths(store: Path) -> None:
    out = bench_loader(str(store), "faces", batch_size=8)
    assert out["samples"] == 30 and out["shards"] == 3
    for key in (
        "loader_samples_per_s",
        "pyarrow_read_samples_per_s",
        "pyarrow_decode_samples_per_s",
    ):
        assert out[key] > 0


def test_import_needs_no_prefect_or_ray() -> None:
    import subprocess

    code = (
        "import sys, storage.dataset; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'ray')]; "
        "sys.exit(1 if bad else 0)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=False
        ).returncode
        == 0
    )


@pytest.mark.integration
def test_reads_a_version_from_s3(store: Path, s3_root: str) -> None:
    from storage.objectstore import open_store

    remote = open_store(s3_root)
    for path in (store / "datasets").rglob("*"):
        if path.is_file():
            remote.put_file(path.relative_to(store).as_posix(), path)
    bs = 4
    ds = FaceShardDataset(s3_root, "faces", rank=0, world_size=1, seed=2, batch_size=bs)
    labels = [y for _, ys in DataLoader(ds, batch_size=bs, num_workers=2) for y in ys.tolist()]
    assert (
        labels
        == partition_indices(
            [10, 7, 13], seed=2, epoch=0, rank=0, world_size=1, batch_size=bs, shuffle_window=4
        ).tolist()
    )
    assert bench_loader(s3_root, "faces", batch_size=8)["samples"] == 30


def test_reads_what_the_dataset_writer_publishes(tmp_path: Path) -> None:
    from storage.objectstore import open_store
    from storage.versions import DatasetWriter

    ids = [f"person-{i % 5}" for i in range(23)]
    jpegs = [cv2.imencode(".jpg", solid_rgb(_colour(i)))[1].tobytes() for i in range(23)]
    table = pa.table({"face_id": [f"f{i}" for i in range(23)], "identity_id": ids, "image": jpegs})
    with DatasetWriter(
        open_store(str(tmp_path)), "faces", shard_rows=6, identities=sorted(set(ids))
    ) as w:
        w.write(table)
    ds = FaceShardDataset(str(tmp_path), "faces", rank=0, world_size=1, batch_size=4)
    assert ds.num_classes == 5 and len(ds.info.shards) == 4
    got = [(gid, label) for gid, label, _ in ds.iter_ids()]
    assert sorted(g for g, _ in got) == list(range(23))
    # The writer keeps row order across shards, so global id i is input row i.
    assert all(label == sorted(set(ids)).index(ids[gid]) for gid, label in got)
    assert sum(len(y) for _, y in DataLoader(ds, batch_size=4, num_workers=2)) == 23


def test_a_torch_that_fails_to_import_is_not_taken_for_no_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any ImportError on the way to torch made ``FaceShardDataset`` the torch-free reader in
    silence (a broken CUDA torch in a training image: numpy batches, no error). Only a torch
    that is not installed does."""
    import storage.dataset as sd

    def broken() -> type:
        raise ImportError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(sd, "_torch_dataset_class", broken)
    with pytest.raises(ImportError, match="libcudart"):
        _ = sd.FaceShardDataset

    def absent() -> type:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(sd, "_torch_dataset_class", absent)
    assert sd.FaceShardDataset is sd.FaceShardReader
