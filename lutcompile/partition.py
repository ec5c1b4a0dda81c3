"""How the D input dimensions are split among the C codebooks."""
from __future__ import annotations

import numpy as np

PARTITIONS = ("contiguous",)


def partition(X: np.ndarray, C: int, method: str = "contiguous") -> list[np.ndarray]:
    """C disjoint groups of input dimensions covering all D; sizes differ by at most one."""
    D = X.shape[1]
    if not 1 <= C <= D:
        raise ValueError(f"codebooks must be between 1 and the input width {D}, got {C}")
    if method == "contiguous":
        return [np.asarray(g, dtype=np.int64) for g in np.array_split(np.arange(D), C)]
    raise ValueError(f"unknown partition '{method}', choose from {', '.join(PARTITIONS)}")
