"""Session-wide test settings: fp32 means fp32 on CUDA too.

PyTorch lets cuDNN convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``), so the reference DiT's
Conv2d patch embedding rounds its inputs to 10 mantissa bits on an Ampere or newer GPU (~4e-4 relative error), while
DiTFast's patchify + linear path does not: fp32 parity checks at 1e-5 would compare TF32 against fp32. Every test runs
with TF32 off for cuDNN and cuBLAS (restored afterwards, also when a test, e.g. the trainer's ``--tf32``, turns it on);
on the CPU these flags change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dit_fast.utils.hardware import strict_fp32


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN for the duration of each test."""
    with strict_fp32():
        yield
