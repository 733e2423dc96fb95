"""Which soft-target rows training holds out for its validation loss: a seeded share, decided by sample id.

By id, not by position: the same samples are held out on every attempt, every worker count and after a resume,
and a sample is never trained on in one run and validated on in its rerun.
"""

from __future__ import annotations

import hashlib


def is_held_out(sample_id: str, fraction: float, seed: int = 0) -> bool:
    """True for about `fraction` of sample ids, the same ones for the same seed."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
