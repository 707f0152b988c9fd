"""One seed from several integers, shared by training (its data order and per-step draws) and sampling (each
sample's noise): ``mix_seed(seed, epoch)``, ``mix_seed(seed, sample_index)``, ..."""

from __future__ import annotations

import numpy as np


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing), so nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)
