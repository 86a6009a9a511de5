"""Per-item results as packed bits: what the store keeps of each test item (hit or miss), without scipy, so the
store opens without the statistics' imports."""
from __future__ import annotations

import numpy as np


def pack(bits: np.ndarray) -> bytes:
    return np.packbits(np.asarray(bits, dtype=bool)).tobytes()


def unpack(data: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count).astype(bool)
