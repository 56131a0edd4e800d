"""Memory settings for faceloop's processes: Arrow's allocator and numpy's huge pages.

pyarrow's default allocator (mimalloc) keeps the pages it frees for its own later use. The
driver's bulk steps decode Parquet with Arrow and then work on the keys with numpy, which
allocates elsewhere, so those pages stay resident for nothing: measured on the 10^6-face bench,
an incremental publish peaked at 426 MiB with mimalloc and at 308-310 MiB with jemalloc or the
system allocator, in the same time. :func:`configure_arrow_memory` switches to jemalloc (it hands
freed pages back to the system after a short decay) or, in a build without it, the system
allocator. An ``ARROW_DEFAULT_MEMORY_POOL`` set by the user is left as it is.

numpy asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) for every array of
4 MiB or more. On a virtual machine whose host takes back the memory its guest has freed (free
page reporting, a balloon: the Firecracker VM these figures come from, kernel command line
``page_reporting.page_reporting_order=11``), a huge page carved from such memory is slow to
fault in: a fresh 85 MiB array took 0.94-1.21 s with huge pages and 0.03 s without, in new
processes started 12 s apart. The label stage's merge and clustering allocate arrays of the
identities' size, so at 10^6 faces its increment took 9.7-11.0 s with huge pages against
6.2-7.4 s without (docs/SCALING.md, forty-first session). Where the memory is already the
guest's, huge pages save a little (the same label stage on freshly touched memory: 5.3-7.3 s
with, 5.8 s without). :func:`configure_numpy_hugepages` turns them off for numpy in this
process and, through ``NUMPY_MADVISE_HUGEPAGE`` (numpy's own switch, read when numpy is
imported), in the processes it starts; a value the user set is kept (1: numpy's default).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

ENV = "ARROW_DEFAULT_MEMORY_POOL"
HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"
# The variables that carry these settings to the processes this one starts (a Ray cluster's
# workers get them through runtime_env: tasks.ray_faces.init_ray).
SETTINGS_ENV = (ENV, HUGEPAGE_ENV)


def configure_memory() -> None:
    """Both settings below, as every faceloop entry point (CLI, flow, bench child) makes them."""
    configure_arrow_memory()
    configure_numpy_hugepages()


def configure_arrow_memory() -> str:
    """Make jemalloc (else the system allocator) Arrow's default pool in this process and in
    the processes it starts (Ray's, through the environment); returns the pool's name."""
    import pyarrow as pa

    if os.environ.get(ENV):
        return str(pa.default_memory_pool().backend_name)
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    os.environ[ENV] = str(pool.backend_name)
    return str(pool.backend_name)


def configure_numpy_hugepages() -> bool:
    """numpy's huge pages off (see the module docstring) in this process and in the processes
    it starts, unless ``NUMPY_MADVISE_HUGEPAGE`` is set (an integer, as numpy reads it: 0 off,
    anything else on); returns whether numpy now asks for them."""
    value = os.environ.get(HUGEPAGE_ENV, "").strip()
    try:
        enable = int(value) != 0 if value else False
    except ValueError:
        return True  # not numpy's format: numpy decides (and says so itself)
    if not value:
        os.environ[HUGEPAGE_ENV] = "0"
    setter = _hugepage_setter()
    if setter is not None:
        setter(enable)
    return enable


def _hugepage_setter() -> Callable[[bool], bool] | None:
    """numpy's runtime switch for huge pages (numpy reads the variable only when imported);
    None where this numpy has none."""
    import importlib

    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2, numpy 1
        try:
            setter = getattr(importlib.import_module(name), "_set_madvise_hugepage", None)
        except ImportError:
            continue
        if setter is not None:
            return cast(Callable[[bool], bool], setter)
    return None
