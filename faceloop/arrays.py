"""Small numeric helpers shared by every room."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# Norms below this count as zero: such a vector is divided by EPS instead and so stays ~zero.
EPS = 1e-12


def l2_normalize(x: ArrayLike) -> np.ndarray:
    """``x`` as float32 with every vector along the last axis scaled to unit L2 norm; zero
    vectors stay zero (the norm is floored at :data:`EPS`)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, EPS)
