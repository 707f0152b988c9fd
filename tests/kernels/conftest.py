"""Kernel tests run the Triton kernels on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1``).

The variable is set per test (monkeypatch), after triton may already have been imported elsewhere: the kernels pick the
interpreter per launch, so this works whatever was imported first. Tests that need the variable unset delete it.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every kernel test under the Triton interpreter, with a fixed seed."""
    pytest.importorskip("triton", reason="the kernel tests run the Triton kernels in the Triton interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
