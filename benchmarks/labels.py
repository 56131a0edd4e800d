"""Measure the memory of the label mapping (class list + index_in) at N classes.

Usage: ``python -m benchmarks.labels 1000000 [rows_per_class]``. Logs peak RSS growth and Arrow
allocations for: building the sorted class list from the identity column, labelling every row
with ``index_in``, and (for comparison) the equivalent Python dict.
"""

from __future__ import annotations

import gc
import logging
import sys
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

from storage.versions import class_index

log = logging.getLogger("benchmarks.labels")


def _rss() -> int:
    return psutil.Process().memory_info().rss


def main(n_classes: int, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    ids = pa.array([f"id-{i:012d}" for i in rng.permutation(n_classes)], pa.string())
    rows = pc.take(ids, pa.array(rng.permutation(np.repeat(np.arange(n_classes), per_class))))
    gc.collect()
    base_rss, base_arrow = _rss(), pa.total_allocated_bytes()
    t0 = time.perf_counter()
    classes = class_index(rows)
    labels = pc.index_in(rows, value_set=classes)
    arrow_mb = (pa.total_allocated_bytes() - base_arrow) / 2**20
    rss_mb = (_rss() - base_rss) / 2**20
    log.info(
        "%d classes, %d rows: arrow class list + labels %.1f MiB held, RSS +%.1f MiB, %.2f s",
        len(classes),
        len(rows),
        arrow_mb,
        rss_mb,
        time.perf_counter() - t0,
    )
    del labels
    gc.collect()
    base_rss = _rss()
    t0 = time.perf_counter()
    mapping = {s: i for i, s in enumerate(sorted(classes.to_pylist()))}
    log.info(
        "python dict of the same classes: RSS +%.1f MiB, %.2f s",
        (_rss() - base_rss) / 2**20,
        time.perf_counter() - t0,
    )
    del mapping


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000,
        int(sys.argv[2]) if len(sys.argv) > 2 else 3,
    )
