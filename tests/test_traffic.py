"""benchmarks.traffic: the dispatch-level counting rules, whole-model traces of every implementation and mode, the
roofline PREDICTION, the CLI and the report section."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from benchmarks import report, traffic
from benchmarks.traffic import DispatchTrace, Traffic, tensor_bytes
from dit_fast.models.config import DiTConfig, gflops

# Tiny but complete: 16 tokens, 2 blocks, 2 heads of 32, odd class count.
TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=7)


def _trace(fn, *inputs: torch.Tensor) -> list[traffic.Kernel]:
    with torch.no_grad(), DispatchTrace(inputs=inputs) as trace:
        fn(*inputs)
    return trace.kernels


def test_bytes_count_broadcast_dims_once():
    shift = torch.randn(2, 8)
    assert tensor_bytes(shift[:, None].expand(2, 5, 8)) == 2 * 8 * 4
    assert tensor_bytes(torch.randn(3, 4, dtype=torch.bfloat16).t()) == 3 * 4 * 2


def test_rules_views_free_elementwise_bytes_gemm_flops():
    x, w = torch.randn(6, 10), torch.randn(10, 3)

    def fn(x: torch.Tensor, w: torch.Tensor) -> None:
        v = x.view(3, 20).t().reshape(6, 10)  # views only (the reshape of the transpose copies: one clone)
        y = x * 2.0 + 1.0  # two elementwise kernels
        y.mm(w)  # one GEMM
        del v

    kernels = _trace(fn, x, w)
    by_op = [k.op for k in kernels]
    assert by_op == ["aten.clone.default", "aten.mul.Tensor", "aten.add.Tensor", "aten.mm.default"], by_op
    clone, mul, add, mm = kernels
    assert clone.bytes == mul.bytes == add.bytes == 2 * 60 * 4  # read 60 floats, write 60
    assert mm.kind == "gemm" and mm.flops == 2 * 6 * 10 * 3 and mm.bytes == (60 + 30 + 18) * 4
    assert {k.kind for k in (clone, mul, add)} == {"other"}


def test_in_place_and_write_only_ops():
    x, y = torch.randn(8), torch.randn(8)

    def fn(x: torch.Tensor, y: torch.Tensor) -> None:
        z = torch.empty(8)  # allocation: free
        z.copy_(x)  # write-only target: read x, write z
        z.add_(y)  # read z and y, write z
        z.zero_()

    copy, add, zero = _trace(fn, x, y)
    assert (copy.bytes, add.bytes, zero.bytes) == (2 * 32, 3 * 32, 32)


def test_weight_casts_are_casts_of_state_not_of_activations():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)

    def fn(x: torch.Tensor) -> None:
        layer.weight.to(torch.bfloat16)  # state that existed before the forward: a weight cast
        h = x.to(torch.bfloat16)  # the input: not a weight cast
        (h * 2).float()  # an activation made in the forward: not a weight cast
        layer.weight.float()  # same dtype: no kernel at all

    kinds = [(k.op, k.kind) for k in _trace(fn, x)]
    assert kinds == [("aten._to_copy.default", "weight_cast"), ("aten._to_copy.default", "other"),
                     ("aten.mul.Tensor", "other"), ("aten._to_copy.default", "other")]


def test_attention_is_one_gemm_launch_with_both_matmuls():
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    (kernel,) = _trace(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), q, k, v)
    assert kernel.kind == "gemm" and kernel.flops == 2 * (2 * 3 * 16) * 16 * (8 + 8)
    assert kernel.bytes >= 4 * q.numel() * 4  # q, k, v, out (and the log-sum-exp where the kernel returns it)


@pytest.fixture(scope="module")
def tiny_traces() -> dict[tuple[str, str], Traffic]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        impls = traffic.IMPLS if traffic_triton_available() else ("reference", "dit_fast-torch")
        results = traffic.measure(TINY, 2, torch.device("cpu"), impls=impls)
    return {(tr.impl, tr.mode): tr for tr in results}


def traffic_triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_every_impl_and_mode_does_the_papers_gemm_work(tiny_traces):
    """The traced GEMM flops are exactly 2 x dit_fast.gflops (linears, the patch conv/GEMM, both attention matmuls)."""
    assert {mode for _, mode in tiny_traces} == set(traffic.MODES)
    expected = 2 * gflops(TINY) * 1e9 * 2
    for key, tr in tiny_traces.items():
        assert tr.gemm_flops == pytest.approx(expected, rel=1e-12), key
        assert all(k.bytes > 0 for k in tr.kernels), key


def test_weight_casts_per_mode(tiny_traces):
    linears = 2 + 5 * TINY.depth + 2  # timestep MLP, per block adaLN/qkv/proj/fc1/fc2, final adaLN + linear
    ref = {mode: tiny_traces[("reference", mode)] for mode in traffic.MODES}
    assert ref["fp32"].weight_cast_launches == ref["bf16"].weight_cast_launches == 0
    assert ref["autocast"].weight_cast_launches == 2 * (linears + 1)  # + the patch conv; weight and bias each
    assert ref["autocast"].weight_cast_bytes > 0
    assert ref["autocast"].launches > ref["fp32"].launches


@pytest.mark.skipif(not traffic_triton_available(), reason="the Triton kernels need triton (interpreter on CPU)")
def test_triton_impl_runs_the_fused_ops_and_launches_fewer_kernels(tiny_traces):
    for mode in traffic.MODES:
        fast, ref = tiny_traces[("dit_fast-triton", mode)], tiny_traces[("reference", mode)]
        ops = Counter(k.op for k in fast.kernels)
        assert ops["dit_fast.gated_residual_modulated_layer_norm.default"] == 2 * TINY.depth, (mode, ops)
        assert ops["dit_fast.patchify.default"] == ops["dit_fast.unpatchify.default"] == 1
        assert fast.launches < ref.launches, mode


def test_roofline_prediction_sums_per_kernel_maxima():
    kernels = [traffic.Kernel("a", "other", 1000, 0, torch.float32),
               traffic.Kernel("b", "gemm", 100, 10**6, torch.bfloat16)]
    tr = Traffic("x", "fp32", 1, kernels)
    roof = tr.roofline(bandwidth_gbs=1.0, peak_tflops={torch.bfloat16: 1e-6})  # 1 GB/s, 1 MFLOP/s
    assert roof["memory_bound_s"] == pytest.approx(1100 / 1e9)
    assert roof["non_gemm_memory_bound_s"] == pytest.approx(1000 / 1e9)
    assert roof["compute_bound_s"] == pytest.approx(1.0)
    assert roof["roofline_prediction_s"] == pytest.approx(1000 / 1e9 + 1.0)
    assert tr.roofline(1.0, {})["roofline_prediction_s"] is None  # no peak for the GEMM's dtype: no prediction


@dataclass(frozen=True)
class FakeSpec:
    name: str
    peak_tflops: dict
    bandwidth_gbs: float


def test_results_dict_ratios_and_report_section(tiny_traces):
    traces = [tiny_traces[("reference", "fp32")], tiny_traces[("dit_fast-torch", "fp32")]]
    spec = FakeSpec("TestGPU", {torch.float32: 50.0, torch.bfloat16: 900.0}, 4000.0)
    result = traffic.results_dict("tiny", torch.device("cpu"), "auto", traces, [spec])
    ref_row, fast_row = result["rows"]
    assert ref_row["non_gemm_vs_reference"] == 1.0 and ref_row["launches_vs_reference"] == 1.0
    assert fast_row["launches_vs_reference"] == fast_row["launches"] / ref_row["launches"]
    assert len(result["roofline"]) == 2 and result["roofline"][0]["gpu"] == "TestGPU"
    text = "\n".join(report.traffic_section(json.loads(json.dumps(result))))
    assert "| reference | fp32 |" in text and "| dit_fast-torch | fp32 |" in text
    assert "PREDICTION" in text and "TestGPU (4,000 GB/s)" in text


def test_cli_writes_json_and_report_merges_it(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    rc = traffic.main(["--config", "DiT-S/8", "--batch", "1", "--impls", "reference,dit_fast-torch", "--modes",
                       "fp32,autocast", "--gpu", "none", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Traffic and launches per forward (DiT-S/8, batch 1)" in printed
    data = json.loads(out.read_text())["traffic"]
    assert [(r["impl"], r["mode"]) for r in data["rows"]] == [
        ("reference", "fp32"), ("reference", "autocast"), ("dit_fast-torch", "fp32"), ("dit_fast-torch", "autocast")]
    assert data["roofline"] == []
    assert report.main([str(out), "--markdown", str(tmp_path / "t.md")]) == 0
    assert "| dit_fast-torch | autocast |" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):
        traffic.main(["--impls", "nope"])



def test_gathers_read_only_the_rows_they_fetch():
    table, labels = torch.randn(1000, 16), torch.tensor([3, 999])
    (kernel,) = _trace(lambda table, labels: torch.nn.functional.embedding(labels, table), table, labels)
    assert kernel.bytes == 2 * 8 + 2 * (2 * 16 * 4)  # the labels, two rows read, two rows written


def test_gpu_specs_come_from_dit_fast_hardware():
    from dit_fast.utils import hardware

    cpu = torch.device("cpu")
    specs = traffic.gpu_specs("auto", cpu)  # no CUDA device: the H100 and the H200
    assert [s.name for s in specs] == [hardware.gpu_spec("H100").name, hardware.gpu_spec("H200").name]
    assert specs[1].bandwidth_gbs > specs[0].bandwidth_gbs
    assert traffic.gpu_specs("none", cpu) == []
    with pytest.raises(ValueError, match="no peak numbers"):
        traffic.gpu_specs("H100,NoSuchGPU", cpu)
    assert traffic.matmul_peaks(specs[0])[torch.bfloat16] == specs[0].peak_tflops[torch.bfloat16]
