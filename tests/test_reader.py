"""The reader's lazy torch, batched decode, resumable state and shard cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from faceloop.dataset import (
    FaceShardDataset,
    FaceShardReader,
    ResumableLoader,
    merge_rank_states,
)
from faceloop.errors import ConfigError
from storage.dataset import partition_indices
from tests.test_dataset import solid_rgb, write_dataset

ROWS = [10, 7, 13]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    write_dataset(tmp_path, "faces", ROWS, list(range(30)), lambda i, lab: solid_rgb((lab, 9, 9)))
    return tmp_path


def test_import_is_torch_free_and_the_class_is_an_iterable_dataset(store: Path) -> None:
    code = "import sys, faceloop.dataset, storage.dataset; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1)
    assert isinstance(ds, IterableDataset) and isinstance(ds, FaceShardReader)
    import storage.dataset as impl

    assert impl.FaceShardDataset is FaceShardDataset


def test_batched_equals_per_sample(store: Path) -> None:
    a = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=1, batch_size=4)
    b = FaceShardDataset(
        str(store), "faces", rank=0, world_size=1, seed=1, batch_size=4, batched=True
    )
    xa = [(x, y) for x, y in DataLoader(a, batch_size=4, num_workers=2)]
    xb = list(DataLoader(b, batch_size=None, num_workers=2))
    assert len(b) == len(xb) == 8
    assert torch.equal(torch.cat([x for x, _ in xa]), torch.cat([x for x, _ in xb]))
    assert torch.equal(torch.cat([y for _, y in xa]), torch.cat([y for _, y in xb]))


def test_state_dict_in_process_resumes_exactly(store: Path) -> None:
    """Without workers the dataset counts what it yielded: no count from the caller."""
    ds = FaceShardDataset(str(store), "faces", rank=1, world_size=2, seed=5, batch_size=3)
    ds.set_epoch(2)
    full = [y for _, ys in DataLoader(ds, batch_size=3) for y in ys.tolist()]
    seen = []
    for _, ys in DataLoader(ds, batch_size=3):
        seen += ys.tolist()
        if len(seen) == 6:
            break
    state = ds.state_dict()
    assert {k: state[k] for k in ("epoch", "seed", "world_size", "rank")} == {
        "epoch": 2,
        "seed": 5,
        "world_size": 2,
        "rank": 1,
    }
    again = FaceShardDataset(str(store), "faces", rank=1, world_size=2, seed=5, batch_size=3)
    again.load_state_dict(state)
    rest = [y for _, ys in DataLoader(again, batch_size=3, num_workers=2) for y in ys.tolist()]
    assert seen + rest == full


def test_other_world_size_is_refused_with_a_clear_error(store: Path) -> None:
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=2, seed=5)
    state = ds.state_dict()
    other = FaceShardDataset(str(store), "faces", rank=0, world_size=3, seed=5)
    with pytest.raises(ConfigError, match=r"world_size 2.*merge_rank_states"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="world_size"):
        other.load_state_dict({"epoch": 0, "offset": 3, "seed": 5, "version": 1})  # old format
    with pytest.raises(ConfigError, match="seed"):
        FaceShardDataset(str(store), "faces", rank=0, world_size=2, seed=6).load_state_dict(state)
    worker_state = {**state, "scope": "worker", "num_workers": 2, "worker": 1}
    with pytest.raises(ConfigError, match="StatefulDataLoader"):
        FaceShardDataset(str(store), "faces", rank=0, world_size=2, seed=5).load_state_dict(
            worker_state
        )


@pytest.mark.parametrize("new_world", [1, 2, 4, 5])
def test_merged_states_repartition_every_remaining_sample_once(store: Path, new_world: int) -> None:
    old_world, consumed = 3, [4, 0, 10]  # rank 2 finished its 10
    seen, states = [], []
    for rank in range(old_world):
        ds = FaceShardDataset(str(store), "faces", rank=rank, world_size=old_world, seed=8)
        ds.set_epoch(1)
        loader = ResumableLoader(ds, num_workers=2 if rank == 0 else 0)
        if consumed[rank]:
            for _, ys in loader:
                seen += ys.tolist()
                if loader.state_dict()["yielded"] >= consumed[rank]:
                    break
        states.append(loader.state_dict())
    merged = merge_rank_states(states)
    rest, sizes = [], []
    for rank in range(new_world):
        ds = FaceShardDataset(str(store), "faces", rank=rank, world_size=new_world, seed=8)
        ds.load_state_dict(merged)
        got = [y for _, ys in DataLoader(ds, batch_size=2, num_workers=2) for y in ys.tolist()]
        assert len(got) == len(ds)
        # a second resume of the re-partitioned job works the same way
        ds.load_state_dict(merged)
        assert ds.state_dict()["spans"] is not None
        rest += got
        sizes.append(len(got))
    assert sorted(seen + rest) == list(range(30))
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="every rank"):
        merge_rank_states(states[:2])


def test_stateful_dataloader_protocol(store: Path) -> None:
    # torchdata is a dev dependency (pyproject.toml): missing, this test fails, never skips.
    from torchdata import stateful_dataloader as sdl

    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=2)
    full = [y for _, ys in DataLoader(ds, batch_size=2, num_workers=2) for y in ys.tolist()]
    loader = sdl.StatefulDataLoader(ds, batch_size=2, num_workers=2)
    seen = []
    for _, ys in loader:
        seen += ys.tolist()
        if len(seen) == 10:
            break
    state = loader.state_dict()
    ds2 = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=2)
    again = sdl.StatefulDataLoader(ds2, batch_size=2, num_workers=2)
    again.load_state_dict(state)
    rest = [y for _, ys in again for y in ys.tolist()]
    assert seen + rest == full


def _upload(store: Path, s3_root: str) -> Any:
    """The local store's datasets copied to ``s3_root``; its ObjectStore."""
    from storage.objectstore import open_store

    remote = open_store(s3_root)
    for path in (store / "datasets").rglob("*"):
        if path.is_file():
            remote.put_file(path.relative_to(store).as_posix(), path)
    return remote


@pytest.mark.integration
def test_second_epoch_over_s3_makes_no_gets(store: Path, s3_root: str, tmp_path: Path) -> None:
    from storage.dataset import _store

    _upload(store, s3_root)
    gets: list[str] = []
    client = _store(s3_root.rstrip("/"))._client
    hook = lambda params, **kw: gets.append(params["Key"])  # noqa: E731
    client.meta.events.register("before-parameter-build.s3.GetObject", hook)
    try:
        cache = tmp_path / "cache"
        ds = FaceShardDataset(s3_root, "faces", rank=0, world_size=1, batch_size=4, cache_dir=cache)
        gets.clear()
        ds.set_epoch(0)
        first = [y for _, ys in DataLoader(ds, batch_size=4) for y in ys.tolist()]
        assert sum(".parquet" in k for k in gets) == 3
        assert len(list(cache.glob("*.parquet"))) == 3
        gets.clear()
        ds.set_epoch(1)
        second = [y for _, ys in DataLoader(ds, batch_size=4) for y in ys.tolist()]
        assert gets == [] and sorted(first) == sorted(second) == list(range(30))
        # a bound smaller than the shards keeps the cache under it
        small = FaceShardDataset(
            s3_root,
            "faces",
            rank=0,
            world_size=1,
            cache_dir=tmp_path / "small",
            cache_limit_bytes=max(s.bytes for s in ds.info.shards) + 1,
        )
        assert sum(1 for _ in small.iter_ids()) == 30
        assert len(list((tmp_path / "small").glob("*.parquet"))) == 1
    finally:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", hook)


@pytest.mark.integration
def test_a_shard_changed_on_s3_after_its_first_read_is_not_trusted(
    store: Path, s3_root: str, tmp_path: Path
) -> None:
    """A remote shard's check was remembered by its key alone, so an object changed between two
    reads of one process was read unchecked, and cached under the manifest's sha256."""
    from faceloop.errors import StorageError

    remote = _upload(store, s3_root)
    cache = tmp_path / "cache"
    for kw in ({"cache_limit_bytes": 0}, {"cache_dir": cache}):
        ds = FaceShardDataset(s3_root, "faces", rank=0, world_size=1, **kw)  # type: ignore[arg-type]
        assert sum(1 for _ in ds.iter_ids()) == 30
    shard = ds.info.shards[0]
    rel = ds.info.shard_path(shard)
    data = bytearray(remote.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    remote.write_bytes(rel, bytes(data))
    for p in cache.glob("*.parquet"):
        p.unlink()
    for kw in ({"cache_limit_bytes": 0}, {"cache_dir": cache}):
        ds = FaceShardDataset(s3_root, "faces", rank=0, world_size=1, **kw)  # type: ignore[arg-type]
        with pytest.raises(StorageError, match="sha256 does not match"):
            sum(1 for _ in ds.iter_ids())
    assert not (cache / f"{shard.sha256}.parquet").exists()


def test_partition_with_spans_matches_the_plain_slice() -> None:
    whole = partition_indices(ROWS, seed=2, epoch=1, rank=0, world_size=1)
    part = partition_indices(
        ROWS, seed=2, epoch=1, rank=0, world_size=1, spans=[(3, 9), (20, 25)], batch_size=2
    )
    np.testing.assert_array_equal(part, np.concatenate([whole[3:9], whole[20:25]]))


@pytest.mark.parametrize("workers", [0, 2])
def test_drop_last_gives_every_rank_the_same_number_of_batches(store: Path, workers: int) -> None:
    """30 samples on 4 ranks: by default ranks read 8, 8, 7, 7 (every sample once), and under
    DistributedDataParallel the ranks with a batch more wait at their last step for ever. With
    drop_last every rank reads 7, no sample twice, and other samples sit out each epoch."""
    world, left_out = 4, []
    for epoch in (0, 1):
        labels, batches = [], []
        for rank in range(world):
            ds = FaceShardDataset(
                str(store),
                "faces",
                rank=rank,
                world_size=world,
                seed=3,
                batch_size=3,
                drop_last=True,
            )
            ds.set_epoch(epoch)
            got = list(DataLoader(ds, batch_size=3, num_workers=workers))
            ys = [y for _, b in got for y in b.tolist()]
            assert len(ys) == len(ds) == 30 // world
            batches.append(len(got))
            labels += ys
        assert len(set(batches)) == 1
        assert len(labels) == len(set(labels)) == 28
        left_out.append(set(range(30)) - set(labels))
    assert left_out[0] != left_out[1]
    sizes = [len(FaceShardDataset(str(store), "faces", rank=r, world_size=world)) for r in range(4)]
    assert sorted(sizes) == [7, 7, 8, 8]

    # Its resume states say so: another drop_last is refused, and a merged state splits the
    # samples no rank had read equally again.
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=world, drop_last=True)
    state = ds.state_dict()
    assert state["drop_last"] is True
    with pytest.raises(ConfigError, match="drop_last"):
        FaceShardDataset(str(store), "faces", rank=0, world_size=world).load_state_dict(state)
    states = [
        FaceShardDataset(str(store), "faces", rank=r, world_size=world, drop_last=True).state_dict()
        for r in range(world)
    ]
    merged = merge_rank_states(states)
    new = [
        FaceShardDataset(str(store), "faces", rank=r, world_size=3, drop_last=True)
        for r in range(3)
    ]
    for ds in new:
        ds.load_state_dict(merged)
    assert [len(ds) for ds in new] == [28 // 3] * 3


def test_persistent_workers_are_refused_at_the_second_epoch(store: Path) -> None:
    """With persistent_workers=True the workers keep their copy of the dataset: set_epoch()
    never reaches them and every epoch repeated the first one's order, silently. The second
    epoch now stops with the reason; plain workers see each epoch's order."""
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=2)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    ds.set_epoch(0)
    assert sorted(y for _, ys in loader for y in ys.tolist()) == list(range(30))
    ds.set_epoch(1)
    with pytest.raises(Exception, match="persistent_workers=True"):
        list(loader)
    del loader
    plain = DataLoader(ds, batch_size=4, num_workers=2)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        orders.append([y for _, ys in plain for y in ys.tolist()])
    assert orders[0] != orders[1] and sorted(orders[1]) == list(range(30))


def _labels(loader) -> list[int]:
    return [y for _, ys in loader for y in ys.tolist()]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_checkpoint_at_an_epoch_boundary_resumes_that_epoch(store: Path, workers: int) -> None:
    """ResumableLoader.state_dict() right after set_epoch(e + 1) paired the new epoch with the
    previous epoch's delivered count: the resume read nothing of epoch e + 1."""
    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=4)
    loader = ResumableLoader(ds, num_workers=workers)
    ds.set_epoch(0)
    _labels(loader)
    ds.set_epoch(1)
    state = loader.state_dict()
    assert (state["epoch"], state["offset"], state["yielded"]) == (1, 0, 0)
    again = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=4)
    resumed = ResumableLoader(again, num_workers=workers)
    resumed.load_state_dict(state)
    assert sorted(_labels(resumed)) == list(range(30))


def test_the_readme_loop_resumes_where_it_stopped(store: Path) -> None:
    """The README's loop calls set_epoch(epoch) at the top of every epoch; after
    load_state_dict that call threw the loaded position away and the epoch's first samples
    were read twice. The same epoch's set_epoch now keeps it (an explicit offset still seeks)."""

    def make() -> tuple[FaceShardDataset, ResumableLoader]:
        ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=1, batch_size=4)
        return ds, ResumableLoader(ds, num_workers=2)

    ds, loader = make()
    ds.set_epoch(2)
    whole = _labels(loader)
    ds.set_epoch(2)
    seen: list[int] = []
    for _, ys in loader:
        seen += ys.tolist()
        if len(seen) == 12:
            break
    checkpoint = loader.state_dict()
    ds, loader = make()
    loader.load_state_dict(checkpoint)
    for epoch in range(checkpoint["epoch"], 4):
        ds.set_epoch(epoch)  # as the README's loop does
        got = _labels(loader)
        if epoch == 2:
            assert seen + got == whole
        else:
            assert sorted(got) == list(range(30))
    ds.load_state_dict(checkpoint)
    ds.set_epoch(2, offset=0)  # an explicit seek is one
    assert len(ds) == 30


def test_rank_and_world_size_come_together_or_from_torchrun(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rank=3 alone (or torchrun's RANK / WORLD_SIZE before init_process_group) made every rank
    rank 0 of 1: each sample read world_size times per epoch."""
    with pytest.raises(ValueError, match="both rank and world_size"):
        FaceShardDataset(str(store), "faces", rank=3)
    with pytest.raises(ValueError, match="both rank and world_size"):
        FaceShardDataset(str(store), "faces", world_size=4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    parts = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        ds = FaceShardDataset(str(store), "faces")
        assert (ds.rank, ds.world_size) == (r, 3)
        parts += _labels(DataLoader(ds, batch_size=1))
    assert sorted(parts) == list(range(30))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="only one of RANK and WORLD_SIZE"):
        FaceShardDataset(str(store), "faces")


def test_arguments_are_checked_when_the_reader_is_made(store: Path) -> None:
    """'4' as a batch size or a rank failed deep in the partition code; seed -1 or
    shuffle_window 0 only at the first sample (inside a DataLoader worker); 1.7 read v1; a
    pathlib.Path store or version 'latest' / 'v1' failed."""
    root = str(store)
    for kw, err in [
        ({"batch_size": "4"}, TypeError),
        ({"batch_size": 4.0}, TypeError),
        ({"rank": "0", "world_size": 1}, TypeError),
        ({"seed": -1}, ValueError),
        ({"shuffle_window": 0}, ValueError),
        ({"version": 1.7}, ConfigError),
        ({"version": "first"}, ConfigError),
        ({"version": 0}, ConfigError),
    ]:
        with pytest.raises(err):
            FaceShardReader(root, "faces", **kw)
    for version in (None, "latest", "v1", "1", 1):
        assert FaceShardReader(store, "faces", version, rank=0, world_size=1).info.version == 1
    with pytest.raises(TypeError, match="dataset's batch_size"):
        ResumableLoader(FaceShardDataset(root, "faces", rank=0, world_size=1), batch_size=8)
    with pytest.raises(TypeError, match="resume state"):
        FaceShardReader(root, "faces", rank=0, world_size=1).load_state_dict(None)  # type: ignore[arg-type]


def test_a_file_uri_root_is_read_in_place_not_copied_into_the_cache(
    store: Path, tmp_path: Path
) -> None:
    """A ``file://`` root was taken for a remote store: every shard of a local dataset was
    copied into the shard cache (a second copy of every training crop on the same disk)."""
    cache = tmp_path / "cache"
    for uri in (f"file://{store}", f"file://localhost{store}/"):
        ds = FaceShardReader(uri, "faces", rank=0, world_size=1, batch_size=4, cache_dir=cache)
        assert ds.cache is None and ds.info.store_root == str(store)
        assert sorted(y for _, y in ds.iter_samples()) == list(range(30))
    assert not cache.exists()


@pytest.mark.integration
def test_a_damaged_cached_shard_is_read_again_not_trusted(
    store: Path, s3_root: str, tmp_path: Path
) -> None:
    """A cached shard edited in place (same size) gave wrong labels every epoch of every run;
    zeroed bytes failed every later run with 'bad_shard_image'. A reader that verifies hashes
    each cached shard once per process and reads a damaged one from the store again."""
    import storage.dataset as impl

    _upload(store, s3_root)
    uri, cache = s3_root, tmp_path / "cache"

    def labels() -> list[int]:
        ds = FaceShardReader(uri, "faces", rank=0, world_size=1, batch_size=4, cache_dir=cache)
        return [y for _, y in ds.iter_samples()]

    assert sorted(labels()) == list(range(30))
    cached = sorted(cache.glob("*.parquet"))
    assert len(cached) == 3
    one, two = cached[0], cached[1]
    data = one.read_bytes()
    ids = sorted(set(re.findall(rb"id\d{6}", data)))
    assert len(ids) >= 2  # one identity id written over another: same size, other label
    one.write_bytes(data.replace(ids[0], ids[1]))
    two.write_bytes(bytes(200) + two.read_bytes()[200:])
    impl._CACHE_VERIFIED.clear()  # a new process
    assert sorted(labels()) == list(range(30))
    assert all(
        impl.hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in cache.glob("*.parquet")
    )


@pytest.mark.integration
def test_cached_shards_are_the_owners_only_whatever_the_umask(
    store: Path, s3_root: str, tmp_path: Path
) -> None:
    """The cache holds every training crop: with umask 000 its folder was 0777 and its shards
    0666, readable (and writable) by every user of the machine."""
    import os
    import stat

    _upload(store, s3_root)
    cache = tmp_path / "cache"
    old = os.umask(0)
    try:
        ds = FaceShardReader(s3_root, "faces", rank=0, world_size=1, batch_size=4, cache_dir=cache)
        assert len(list(ds.iter_samples())) == 30
    finally:
        os.umask(old)
    files = list(cache.glob("*.parquet"))
    assert files
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_the_folders_made_for_the_shard_cache_are_the_owners_only(tmp_path: Path) -> None:
    """FACELOOP_CACHE_DIR=/x/a/b/shards under umask 000: `a` and `b` came out 0777 (only the
    last folder got 0700), so another user could swap the cache folder for one of theirs."""
    import os
    import stat

    from storage.dataset import ShardCache

    cache = ShardCache(tmp_path / "a" / "b" / "shards", 10_000)
    old = os.umask(0)
    try:
        cache.put("ab" * 32, b"shard bytes")
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "shards"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert cache.get("ab" * 32, len(b"shard bytes")) == b"shard bytes"


def test_a_version_removed_while_it_is_read_names_what_happened(store: Path) -> None:
    import shutil

    from faceloop.errors import StorageError

    ds = FaceShardReader(str(store), "faces", rank=0, world_size=1, prefetch=False)
    shards = store / "datasets" / "faces" / "shards"
    moved = store.parent / f"{store.name}-gone"
    manifest = store / "datasets" / "faces" / "v1" / "manifest.json"
    kept = manifest.read_bytes()
    shutil.move(shards, moved)
    try:
        # The version still committed: its shards deleted by hand, the store is damaged.
        with pytest.raises(StorageError, match="is still committed and lists it"):
            next(iter(ds.iter_samples()))
        # Removed (retention deletes the manifest first, then its files).
        manifest.unlink()
        with pytest.raises(StorageError, match="gone from the store: the version was removed"):
            next(iter(ds.iter_samples()))
    finally:
        shutil.move(moved, shards)
        if not manifest.exists():
            manifest.write_bytes(kept)


def test_a_checkpoint_from_before_a_forget_is_refused(store: Path) -> None:
    """`faceloop forget` rewrites the versions that held the faces in place (same version
    number, fewer rows, labels renumbered): a checkpoint taken before it resumed with no error,
    repeating some samples, skipping others and relabelling what was read (a probe: 10 repeated,
    18 never read, 15 of 24 relabelled). Refused now, rank states and merged ones alike."""
    from storage.objectstore import open_store
    from storage.versions import rewrite_version

    ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=4)
    for n, _ in enumerate(DataLoader(ds, batch_size=4)):
        if n == 2:
            break
    state = ds.state_dict()
    merged = merge_rank_states([state])
    # A published version has a changes file (the synthetic one has none): an empty one.
    import hashlib
    import json

    import pyarrow.parquet as pq

    from storage.versions import CHANGES_SCHEMA

    vdir = store / "datasets" / "faces" / "v1"
    pq.write_table(CHANGES_SCHEMA.empty_table(), vdir / "changes.parquet")
    data = (vdir / "changes.parquet").read_bytes()
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["changes"] = {
        "file": "changes.parquet",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    assert rewrite_version(open_store(str(store)), "faces", 1, lambda f: f == "f000003") == 1
    again = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=4)
    for s in (state, merged):
        with pytest.raises(ConfigError, match="rewritten"):
            again.load_state_dict(s)
    # A checkpoint of the rewritten version resumes as before.
    fresh = again.state_dict()
    FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3).load_state_dict(fresh)


def test_a_store_path_that_does_not_exist_is_named_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no store at .*no such folder"):
        FaceShardDataset(str(tmp_path / "nostore"), "faces", rank=0, world_size=1)
    with pytest.raises(ConfigError, match="no published version"):
        FaceShardDataset(str(tmp_path), "faces", rank=0, world_size=1)


def test_drop_last_with_fewer_samples_than_ranks_is_refused(store: Path) -> None:
    """world_size 200 with drop_last gave every rank 0 samples, silently."""
    with pytest.raises(ConfigError, match="every rank would read none"):
        FaceShardDataset(str(store), "faces", rank=0, world_size=200, drop_last=True)
    ds = FaceShardDataset(str(store), "faces", rank=29, world_size=30, drop_last=True)
    assert ds.num_samples == 1  # 30 samples, 30 ranks: one each


def test_a_checkpoint_of_an_older_version_under_the_same_number_is_refused(store: Path) -> None:
    """Every version deleted by hand, the next publish is v1 again with other samples: a
    checkpoint of the first v1 (same row count) resumed on it. The version's publish time
    tells them apart now."""
    import json

    mpath = store / "datasets" / "faces" / "v1" / "manifest.json"
    kept = mpath.read_bytes()
    m = json.loads(kept)
    try:
        m["created"] = "2030-01-01T00:00:00+00:00"  # what DatasetWriter writes (the fixture not)
        mpath.write_text(json.dumps(m))
        ds = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=4)
        for n, _ in enumerate(DataLoader(ds, batch_size=4)):
            if n == 1:
                break
        state = ds.state_dict()
        assert state["created"] == m["created"]
        merged = merge_rank_states([state])
        m["created"] = "2031-01-01T00:00:00+00:00"
        mpath.write_text(json.dumps(m))
        again = FaceShardDataset(str(store), "faces", rank=0, world_size=1, seed=3, batch_size=4)
        for s in (state, merged):
            with pytest.raises(ConfigError, match="numbered again"):
                again.load_state_dict(s)
        old = {k: v for k, v in state.items() if k != "created"}  # a reader before this field
        again.load_state_dict(old)
    finally:
        mpath.write_bytes(kept)


_RANK_SCRIPT = """
import os, sys, time
import torch.distributed as dist
from faceloop.dataset import FaceShardDataset
store, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
if rank == 0:
    open(os.path.join(store, "rank0-opens"), "w").close()
else:  # rank 1 opens it after v2 was published
    while not os.path.exists(os.path.join(store, "v2-published")):
        time.sleep(0.05)
ds = FaceShardDataset(store, "faces")
print(ds.info.version, flush=True)
dist.destroy_process_group()
"""


def test_ranks_of_one_job_read_one_version_of_latest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ranks resolving 'latest' each on their own read different versions when a publish came
    in between: other samples, other labels, no error. Under a process group rank 0's answer
    is every rank's; without one the ranks are told to pin the version."""
    import socket

    write_dataset(tmp_path, "faces", [4], [0, 0, 1, 1], lambda i, lab: solid_rgb((lab, 9, 9)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(tmp_path), str(r), str(port)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(2)
    ]
    import time

    deadline = time.monotonic() + 60
    while not (tmp_path / "rank0-opens").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # rank 0 has resolved v1 by now (and waits to broadcast it); rank 1 for v2
    write_dataset(
        tmp_path, "faces", [6], [0, 0, 1, 1, 2, 2], lambda i, lab: solid_rgb((lab, 9, 9)), 2
    )
    (tmp_path / "v2-published").touch()
    outs = [p.communicate(timeout=60)[0].split() for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0]
    assert outs == [["1"], ["1"]]
    # Without a process group: each rank resolves it, and is warned.
    with caplog.at_level("WARNING"):
        ds = FaceShardDataset(str(tmp_path), "faces", rank=0, world_size=2)
    assert ds.info.version == 2 and "Pin version=" in caplog.text
