"""faceloop.memory: Arrow's allocator for faceloop processes."""

from __future__ import annotations

import os

import pyarrow as pa

from faceloop.memory import ENV, configure_arrow_memory


def test_switches_to_an_allocator_that_returns_memory_and_tells_child_processes(
    monkeypatch,
) -> None:
    before = pa.default_memory_pool()
    monkeypatch.setenv(ENV, "")  # recorded, so the variable set below is undone afterwards
    monkeypatch.delenv(ENV)
    try:
        name = configure_arrow_memory()
        assert name in ("jemalloc", "system")
        assert pa.default_memory_pool().backend_name == name
        assert os.environ[ENV] == name  # Ray's processes inherit it
        data = pa.array(list(range(1000)))  # allocations use the new pool
        assert pa.default_memory_pool().bytes_allocated() >= data.nbytes
    finally:
        pa.set_memory_pool(before)


def test_a_pool_the_user_chose_is_kept(monkeypatch) -> None:
    before = pa.default_memory_pool()
    monkeypatch.setenv(ENV, "system")
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        assert configure_arrow_memory() == "system"
        assert pa.default_memory_pool().backend_name == "system"
    finally:
        pa.set_memory_pool(before)
