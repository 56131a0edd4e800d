"""Benchmark harnesses behind ``faceloop bench``: the refresh against a plain insightface loop
(:mod:`benchmarks.bench`), the reader against a plain pyarrow read (:mod:`benchmarks.loader`),
the cross-album merge at scale (:mod:`benchmarks.merge`) and labelling figures
(:mod:`benchmarks.labels`). They sit above the flows they measure."""
