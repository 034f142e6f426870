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
