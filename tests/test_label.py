"""tasks/label.relabel: the album gates that decide before any clustering."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from faceloop.config import Settings
from faceloop.schema import FACES_SCHEMA
from tasks.label import relabel


def _unit(seed: int, base: np.ndarray | None = None) -> list[float]:
    v = np.random.default_rng(seed).normal(size=512)
    v = v if base is None else base + 0.15 * v / np.linalg.norm(v) * np.linalg.norm(base)
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


def test_album_gates_and_faces_never_embedded() -> None:
    person = np.random.default_rng(0).normal(size=512)
    rows = [
        {"face_id": f"p{i}", "embedding": _unit(10 + i, person), "quality": 0.9, "face_px": 80.0}
        for i in range(4)
    ]
    rows += [
        {"face_id": "small", "embedding": None, "quality": 0.9, "face_px": 8.0},
        {"face_id": "blurry", "embedding": None, "quality": 0.01, "face_px": 80.0},
        # Good enough by today's gates but not embedded when detected (gates were stricter then).
        {"face_id": "gated-then", "embedding": None, "quality": 0.9, "face_px": 80.0},
    ]
    for r in rows:
        r.update(source_kind="album", source_group="a1", status="new", reason=None, role="album")
    table = pa.Table.from_pylist(
        rows, schema=FACES_SCHEMA.remove(FACES_SCHEMA.get_field_index("aligned_jpeg"))
    )
    decisions, _ = relabel(Settings(), table, {("album", "a1")})
    code = {f: d.reason.split(":")[0] for f, d in decisions.items()}
    assert all(d.code == c for d, c in zip(decisions.values(), code.values(), strict=True))
    assert code["small"] == "too_small" and code["blurry"] == "low_quality"
    assert code["gated-then"] == "not_embedded" and decisions["gated-then"].status == "rejected"
    people = {decisions[f"p{i}"].identity_id for i in range(4)}
    assert len(people) == 1 and None not in people  # the zero vectors did not join or split them
