"""dit_fast.utils.hardware: the GPU datasheet table and its lookups."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dit_fast.utils.hardware import GPUS, GPUSpec, gpu_spec, peak_flops


@pytest.mark.parametrize(("device_name", "spec_name"), [
    ("NVIDIA H200", "H200-SXM-141GB"),
    ("NVIDIA H200 NVL", "H200-NVL-141GB"),
    ("NVIDIA H100 80GB HBM3", "H100-SXM5-80GB"),
    ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
    ("NVIDIA A10", "A10"),
    ("H200-SXM-141GB", "H200-SXM-141GB"),
])
def test_device_names_map_to_their_datasheet(device_name, spec_name):
    assert gpu_spec(device_name) is GPUS[spec_name]


def test_unknown_and_cpu_have_no_peak():
    assert gpu_spec("NVIDIA H100 NVL") is None and gpu_spec("Tesla T4") is None
    assert gpu_spec(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops("cpu", torch.float32) is None


def test_dense_datasheet_numbers():
    h200, h100, a100 = GPUS["H200-SXM-141GB"], GPUS["H100-SXM5-80GB"], GPUS["A100-SXM4-80GB"]
    assert h200.peak_tflops[torch.bfloat16] == h100.peak_tflops[torch.bfloat16] == 989.4  # dense, not 1979 sparse
    assert a100.peak_tflops[torch.float16] == 312.0 and a100.tf32_tflops == 156.0
    assert (h200.bandwidth_gbs, h100.bandwidth_gbs, a100.bandwidth_gbs) == (4800.0, 3350.0, 2039.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h200.bandwidth_gbs = 0.0  # type: ignore[misc]
    assert isinstance(h200, GPUSpec)


def test_peak_flops_on_a_named_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert peak_flops(cuda, torch.bfloat16) == pytest.approx(989.4e12)
    assert peak_flops(cuda, torch.float32, tf32=True) == pytest.approx(494.7e12)
    assert peak_flops(cuda, torch.float32, tf32=False) == pytest.approx(66.9e12)
