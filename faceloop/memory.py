"""Arrow's allocator for faceloop's processes.

pyarrow's default allocator (mimalloc) keeps the pages it frees for its own later use. The
driver's bulk steps decode Parquet with Arrow and then work on the keys with numpy, which
allocates elsewhere, so those pages stay resident for nothing: measured on the 10^6-face bench,
an incremental publish peaked at 426 MiB with mimalloc and at 308-310 MiB with jemalloc or the
system allocator, in the same time. :func:`configure_arrow_memory` switches to jemalloc (it hands
freed pages back to the system after a short decay) or, in a build without it, the system
allocator. An ``ARROW_DEFAULT_MEMORY_POOL`` set by the user is left as it is.
"""

from __future__ import annotations

import os

ENV = "ARROW_DEFAULT_MEMORY_POOL"


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
