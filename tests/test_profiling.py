"""benchmarks.profiling: the kernel classifier (CUDA kernel names as the profiler reports them on an H100, and a
recorded CPU profile of a tiny DiT forward), the per-step summary and its Markdown."""

from __future__ import annotations

import pytest
import torch

from benchmarks.profiling import CATEGORIES, classify, profile_summary, render, summarize
from tests.helpers import tiny_dit


@pytest.mark.parametrize(("name", "category"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel",
     "gemm"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(...)", "gemm"),
    ("_scaled_mm", "gemm"),
    ("aten::addmm", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4, false, false, cutlass::bfloat16_t",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_row_fwd_kernel", "row-op"),
    ("_row_bwd_kernel", "row-op"),
    ("_patch_kernel", "row-op"),
    ("triton_per_fused_native_layer_norm_0", "row-op"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)", "row-op"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...>>>", "row-op"),
    ("aten::native_layer_norm", "row-op"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(...)>", "copy"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy"),
    ("aten::copy_", "copy"),
    ("aten::cat", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)>", "elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...FusedAdamMathFunctor...>", "elementwise"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("aten::gelu", "elementwise"),
    ("cudaLaunchKernel", "other"),
])
def test_classify(name, category):
    assert classify(name) == category


def test_summary_shares_and_top_kernels():
    events = [("nvjet_gemm_a", 600.0, 4), ("_row_fwd_kernel", 200.0, 8), ("nvjet_gemm_a", 200.0, 4),
              ("flash_fwd_kernel", 100.0, 2), ("Memcpy DtoD", 50.0, 2), ("triton_poi_fused_add", 50.0, 2)]
    summary = summarize(events, steps=2, top=3)
    assert summary["total_ms"] == pytest.approx(0.6)  # 1200 us over 2 steps
    assert summary["shares"] == pytest.approx({"gemm": 800 / 1200, "attention": 100 / 1200, "row-op": 200 / 1200,
                                               "copy": 50 / 1200, "elementwise": 50 / 1200, "other": 0.0})
    assert [row["name"] for row in summary["top"]] == ["nvjet_gemm_a", "_row_fwd_kernel", "flash_fwd_kernel"]
    assert summary["top"][0] == {"name": "nvjet_gemm_a", "category": "gemm", "ms": pytest.approx(0.4),
                                 "share": pytest.approx(800 / 1200), "calls": 4}


def test_recorded_cpu_profile_of_a_dit_forward():
    """A real profile: every op of a tiny DiT forward lands in a category, GEMMs, attention and LayerNorms among them;
    the Markdown shows the shares next to the case's MFU."""
    model = tiny_dit().eval()
    x = torch.randn(2, model.config.in_channels, *model.config.grid_input)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        summary = profile_summary(lambda: model(x, t, y), torch.device("cpu"), steps=1, top=50)
    assert set(summary["shares"]) == set(CATEGORIES)
    assert sum(summary["shares"].values()) == pytest.approx(1.0)
    categories = {row["category"] for row in summary["top"]}
    assert {"gemm", "attention", "row-op"} <= categories, summary["top"]
    assert summary["shares"]["other"] < 0.05, summary["top"]
    bench = {"name": "test_forward[dit_fast]", "extra_info": {"case": "tiny forward", "impl": "dit_fast",
                                                               "mfu": 0.5, "ceiling_gflops": 700.0,
                                                               "mfu_datasheet": 0.4, "profile": summary}}
    text = render([bench, {"name": "unprofiled", "extra_info": {}}])
    assert "## tiny forward: dit_fast" in text and "MFU 50.0% of the measured matmul ceiling" in text
    assert "40.0% of the datasheet peak" in text and "unprofiled" not in text


def test_pipeline_profile_table_and_amdahl_bounds():
    """``python -m benchmarks.test_bench_pipeline --profile``'s table: shares of the wall time and wall / GEMM time."""
    from benchmarks.test_bench_pipeline import render_profiles

    prof = {"wall_ms": 100.0, "total_ms": 98.0, "shares": {"gemm": 0.8 * 100 / 98, "attention": 0.1 * 100 / 98},
            "top": [{"name": "aten::addmm", "category": "gemm", "ms": 80.0, "share": 0.82, "calls": 7}]}
    table = render_profiles({"diffusers": prof})
    assert "| diffusers | 100.0 | 98.0 | 80.0 | 80.0% | 10.0% | 10.0% | 1.25x | 1.11x |" in table
    assert "| `aten::addmm` | gemm | 80.0 | 82.0% | 7 |" in table
