"""Every seed in the project derives from the global `seed` param through here.

`derive(seed, "image", wnid, 7)` is the same number in every process, on every
machine and in every Python run (sha256, not Python's salted `hash`), so an
image or a data split never depends on batch size, process count or order.
"""
from __future__ import annotations

import hashlib


def derive(seed: int, *parts: object) -> int:
    """A 63-bit seed for the thing named by `parts` under the global `seed`."""
    text = "/".join([str(seed)] + [str(p) for p in parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def ranks(seed: int, indices):
    """A pseudo-random 64-bit number for each of `indices` (numpy integers) under `seed`:
    splitmix64's finaliser of seed + index x its golden-ratio step. Sorting by it draws a random
    subset whose members never depend on the pool's size or order, and no library's random
    stream (whose algorithms may change between versions) is involved."""
    import numpy as np
    x = np.uint64(seed) + np.asarray(indices).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
