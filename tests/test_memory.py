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


def _numpy_hugepages() -> bool:
    """Whether numpy now asks for huge pages (its switch returns the setting it replaces)."""
    from faceloop.memory import _hugepage_setter

    setter = _hugepage_setter()
    assert setter is not None, "this numpy has no huge-page switch"
    now = setter(True)
    setter(now)
    return bool(now)


def test_numpy_huge_pages_off_here_and_in_child_processes(monkeypatch) -> None:
    """Fresh huge pages are slow to fault in on a VM whose host reclaims freed guest memory
    (faceloop/memory.py): numpy stops asking for them, and the processes this one starts (Ray's
    workers) are told through numpy's own variable."""
    import subprocess
    import sys

    from faceloop.memory import HUGEPAGE_ENV, configure_numpy_hugepages

    before = _numpy_hugepages()
    monkeypatch.setenv(HUGEPAGE_ENV, "")  # recorded, so the variable set below is undone
    monkeypatch.delenv(HUGEPAGE_ENV)
    try:
        assert configure_numpy_hugepages() is False
        assert os.environ[HUGEPAGE_ENV] == "0"
        assert _numpy_hugepages() is False
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "from numpy._core.multiarray import _set_madvise_hugepage as f; print(f(False))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == "False"  # numpy read the variable when imported
    finally:
        from faceloop.memory import _hugepage_setter

        setter = _hugepage_setter()
        assert setter is not None
        setter(before)


def test_numpy_huge_pages_the_user_asked_for_are_kept(monkeypatch) -> None:
    from faceloop.memory import HUGEPAGE_ENV, _hugepage_setter, configure_numpy_hugepages

    before = _numpy_hugepages()
    setter = _hugepage_setter()
    assert setter is not None
    try:
        monkeypatch.setenv(HUGEPAGE_ENV, "1")
        setter(False)
        assert configure_numpy_hugepages() is True
        assert _numpy_hugepages() is True and os.environ[HUGEPAGE_ENV] == "1"
        monkeypatch.setenv(HUGEPAGE_ENV, "0")
        assert configure_numpy_hugepages() is False and _numpy_hugepages() is False
        monkeypatch.setenv(HUGEPAGE_ENV, "yes")  # not numpy's format: left to numpy
        setter(True)
        assert configure_numpy_hugepages() is True and _numpy_hugepages() is True
    finally:
        setter(before)
