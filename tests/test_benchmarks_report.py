"""The benchmark suite's plumbing: the report, the parity recording, the options, gpu_check.sh, one tiny real run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import report
from benchmarks.common import BenchSettings, MatmulCeiling, parity_tolerance, record_and_check

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def bench(group: str, name: str, median: float, **extra) -> dict:
    """One benchmark entry shaped like pytest-benchmark's JSON."""
    return {"group": group, "name": name, "fullname": f"benchmarks/x.py::{name}", "params": None, "param": None,
            "extra_info": extra, "stats": {"median": median, "mean": median, "min": median, "max": median,
                                           "rounds": 2}}


def synthetic_run() -> dict:
    common = {"ceiling_gflops": 100.0, "dtype": "fp32", "device": "cpu"}
    scaling = [
        bench("scaling forward", f"test_scaling_forward[{m}-{impl}]", median, impl=impl, case=f"{m} batch 2",
              gflop=gflop, gflops=gflop / median, images=2, model=m, model_gflops=gflop / 4, max_rel_err=err,
              tolerance=1e-4, parity_ok=err <= 1e-4, frac_ceiling=gflop / median / 100.0, **common)
        for m, gflop in (("DiT-S/8", 1.44), ("DiT-S/2", 24.2))
        for impl, median, err in (("reference", 0.4, 0.0), ("dit_fast", 0.2, 3e-7))
    ]
    sampling = [
        bench("sampling ddpm", f"test_sampling[ddpm-{impl}]", median, impl=impl, case="DiT-S/8 batch 2 DDPM-10",
              gflop=28.8, images=2, max_rel_err=err, tolerance=1e-3, parity_ok=err <= 1e-3, **common)
        for impl, median, err in (("reference", 4.0, 0.0), ("reference+compile", 2.0, 1e-7), ("dit_fast", 1.0, 2e-7),
                                  ("diffusers", 8.0, 5e-3))
    ]
    ceiling = bench("matmul ceiling", "test_matmul_ceiling", 0.2, impl="matmul", case="2048x2048x2048 fp32",
                    gflop=17.18, gflops=85.9, max_rel_err=0.0, tolerance=1e-4, parity_ok=True, **common)
    # a case from a file that records nothing but its impl parameter
    bare = bench("model forward", "test_forward[dit_fast-DiT-S/2]", 0.5)
    bare["params"] = {"impl": "dit_fast", "config": "DiT-S/2"}
    # a kernel case timed by do_bench inside the round: its own per-call time and bandwidth, no parity_ok key
    kernel = bench("kernel patchify", "test_kernel[patchify-dit_fast]", 0.3, impl="dit_fast", case="fwd B=32",
                   seconds=1e-4, gbps=500.0, gbytes=0.05, max_rel_err=0.5, tolerance=3e-2)
    return {"machine_info": {"python_version": "3.11.7",
                             "dit_fast": {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "2.x", "triton": "3.x"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": True}, "datetime": "2026-01-01T00:00:00",
            "benchmarks": [*scaling, *sampling, ceiling, bare, kernel]}


def test_rows_speedups_and_fallback_case():
    rows = report.load_rows(synthetic_run())
    by_key = {(r.group, r.case, r.impl): r for r in rows}
    fast = by_key[("sampling ddpm", "DiT-S/8 batch 2 DDPM-10", "dit_fast")]
    assert fast.speedups == {"reference": 4.0, "reference+compile": 2.0, "diffusers": 8.0}
    assert fast.images_per_s == pytest.approx(2.0) and fast.gflops == pytest.approx(28.8)  # derived from the median
    assert by_key[("sampling ddpm", "DiT-S/8 batch 2 DDPM-10", "diffusers")].parity_ok is False
    assert ("model forward", "config=DiT-S/2", "dit_fast") in by_key  # case from the non-impl parameters
    kernel = by_key[("kernel patchify", "fwd B=32", "dit_fast")]
    assert kernel.median_s == 1e-4 and kernel.gbps == 500.0 and kernel.parity_ok is False


def test_markdown_report_tables(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_run()))
    markdown, plot = report.write_report(path)
    text = markdown.read_text()
    assert markdown == tmp_path / "run.md"
    assert "- CPU: Test CPU, 2 cores" in text and "Commit: 0123456789ab (with uncommitted changes)" in text
    for heading in ("## sampling ddpm", "## scaling forward", "## matmul ceiling", "## Summary: DiTFast speed-ups"):
        assert heading in text
    assert "| sampling ddpm | DiT-S/8 batch 2 DDPM-10 | dit_fast | 4.00x | 2.00x | 8.00x |" in text
    assert "| DiT-S/2 batch 2 | dit_fast | 200 ms | 10 | 121.0 | 2.00x | - | 121.0% | 3.0e-07 (<= 1e-04) |" in text
    assert "5.0e-03 (<= 1e-03) **FAIL**" in text and "## Parity failures" in text
    assert "| fwd B=32 | dit_fast | 100 us | - | - | 500.0 |" in text  # GB/s column only in that group
    assert "GEMM ceiling: 100.0 GFLOP/s" in text and "(2048x2048x2048 fp32) timed by pytest-benchmark: 85.9" in text
    if plot is not None:  # matplotlib installed (the dev extra)
        assert plot == tmp_path / "run.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![achieved GFLOP/s against model Gflops](run.png)" in text


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_run()))
    markdown, plot = report.write_report(path)
    assert plot is None and not (tmp_path / "run.png").exists()
    assert "No plot: matplotlib is not installed" in markdown.read_text()


def test_report_cli_merges_runs(tmp_path, capsys):
    run = synthetic_run()
    first, second = dict(run, benchmarks=run["benchmarks"][:4]), dict(run, benchmarks=run["benchmarks"][4:])
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "several JSON files need --merged" in capsys.readouterr().err
    inputs = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert report.main([*inputs, "--merged", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert len(merged["benchmarks"]) == len(run["benchmarks"])
    assert "## sampling ddpm" in (tmp_path / "all.md").read_text()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "bad.json")])
    assert "not a pytest-benchmark JSON run" in capsys.readouterr().err


def stub_benchmark(median: float | None) -> SimpleNamespace:
    stats = None if median is None else SimpleNamespace(stats=SimpleNamespace(median=median))
    return SimpleNamespace(stats=stats, extra_info={})


def test_record_and_check_records_then_fails_over_tolerance():
    settings = BenchSettings.from_options(device="cpu")
    ceiling = MatmulCeiling(gflops=50.0, route="oneDNN", routes={"oneDNN": 50.0}, shapes=((8, 4, 12),),
                            dtype=torch.float32, device="cpu", datasheet_gflops=None)
    oracle = torch.ones(4, 4)
    ok = stub_benchmark(0.5)
    record_and_check(ok, impl="dit_fast", case="c", gflop=10.0, images=2, output=oracle + 2**-20, oracle=oracle,
                     settings=settings, ceiling=ceiling, model="DiT-S/8", steps=3)
    info = ok.extra_info
    assert info["gflops"] == pytest.approx(20.0) and info["images_per_s"] == pytest.approx(4.0)
    assert info["frac_ceiling"] == pytest.approx(0.4) and info["max_rel_err"] == 2**-20
    assert info["parity_ok"] and info["steps"] == 3 and info["model_gflops"] > 0 and "mfu" not in info
    bad = stub_benchmark(None)  # --benchmark-disable: no timing, parity still checked
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        record_and_check(bad, impl="dit_fast", case="c", gflop=10.0, images=2, output=oracle * 1.01, oracle=oracle,
                         settings=settings, ceiling=ceiling)
    assert bad.extra_info["parity_ok"] is False and "gflops" not in bad.extra_info
    assert parity_tolerance(torch.bfloat16, reference_err=0.05) == pytest.approx(0.1)
    assert parity_tolerance(torch.float32, scale=10.0) == pytest.approx(1e-3)


def test_settings_defaults_and_errors():
    s = BenchSettings.from_options(device="cpu")
    assert s.dtype == torch.float32 and (s.ddpm_steps, s.ddim_steps) == (6, 3)
    assert s.sizing("sampling").config == "DiT-S/2" and s.sizing("scaling").config is None
    s = BenchSettings.from_options(device="cpu", config="DiT-XL-2", batch=3, scaling_configs="DiT-S-8, DiT-B/4",
                                   impls="reference,dit_fast")
    assert s.sizing("model").config == "DiT-XL/2" and s.sizing("model").batch == 3
    assert s.scaling_configs == ("DiT-S/8", "DiT-B/4") and not s.wants("diffusers")
    for kwargs, message in (({"config": "DiT-M/2"}, "--dit-config"), ({"dtype": "fp8"}, "--dit-dtype"),
                            ({"impls": "fast"}, "--dit-impls"), ({"batch": 0}, "--dit-batch")):
        with pytest.raises(ValueError, match=message):
            BenchSettings.from_options(device="cpu", **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            BenchSettings.from_options(device="cuda")


def _dry_run_plan(tmp_path, *args: str, **env: str) -> tuple[list[tuple[str, int, str]], str]:
    """gpu_check.sh's dry run: its (step, limit, command) lines and its whole output."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(GPU_CHECK), *args], env=dict(os.environ, OUT=str(out),
                            PYTHON="python-for-test", **env), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert not out.exists()  # a dry run writes nothing
    plan = []
    for line in result.stdout.splitlines():
        match = re.match(r"\[dry-run\] (.+?): timeout (\d+)s (.*)$", line)
        if match:
            plan.append((match[1], int(match[2]), match[3]))
    return plan, result.stdout


def test_gpu_check_dry_run_fits_the_one_shot_in_order(tmp_path):
    """The plan fits a lent GPU machine's one shot (<= 420 s of step limits, set-up included) and runs the levels in
    order; every CUDA test file is in the tests step; every compile is regional."""
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    plan, stdout = _dry_run_plan(tmp_path, "--dry-run")
    steps = [name for name, _, _ in plan]
    total = sum(limit for _, limit, _ in plan)
    assert total <= 420, plan
    assert f"plan total: {total}s" in stdout
    assert steps == ["setup", "env", "tests", "bench forward", "bench train", "bench kernels", "bench sampling", "fp8",
                     "report"]
    assert not any("compile_check" in cmd for _, _, cmd in plan)  # no GPU needed: CI runs it
    commands = dict((name, cmd) for name, _, cmd in plan)
    assert commands["setup"].startswith("bash ") and commands["setup"].endswith(" python-for-test")
    assert all(cmd.startswith("python-for-test ") for name, cmd in commands.items() if name not in ("setup", "report"))
    tests = commands["tests"].split()
    test_files = [word for word in tests if word.startswith("tests/")]
    assert test_files and all(word.endswith(".py") and (ROOT / word).is_file() for word in test_files)
    cuda_files = {str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"^def test_cuda", path.read_text(), re.MULTILINE)}
    assert cuda_files <= set(test_files), cuda_files - set(test_files)
    for level in ("forward", "train", "kernels", "sampling"):
        assert "--dit-device cuda" in commands[f"bench {level}"] and f"{level}.json" in commands[f"bench {level}"]
    assert "test_bench_attention.py" in commands["bench kernels"]
    assert "--json " + str(tmp_path / "out" / "fp8.json") in commands["fp8"]
    # the environment variable spelling of the dry run plans the same steps
    assert [name for name, _, _ in _dry_run_plan(tmp_path, GPU_CHECK_DRY_RUN="1")[0]] == steps
    # a smaller budget caps the later steps, never exceeding it
    small, _ = _dry_run_plan(tmp_path, "--dry-run", GPU_CHECK_BUDGET="100")
    assert sum(limit for _, limit, _ in small) <= 100 and [n for n, _, _ in small][:3] == ["setup", "env", "tests"]
    assert [n for n, _, _ in _dry_run_plan(tmp_path, "--dry-run", GPU_CHECK_SETUP="0")[0]][0] == "env"


def test_tiny_real_run_writes_json_and_report(tmp_path):
    """One real (CPU) benchmark session: options, fixtures, extra_info, and the report written at session end."""
    pytest.importorskip("pytest_benchmark", reason="the benchmark suite runs on pytest-benchmark (the dev extra)")
    json_path = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_scaling.py", "-q", "-p", "no:cacheprovider",
           "--benchmark-only", "--dit-device", "cpu", "--dit-scaling-configs", "DiT-S/8", "--dit-rounds", "1",
           "--dit-impls", "reference", f"--benchmark-json={json_path}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads(json_path.read_text())
    by_impl = {b["extra_info"]["impl"]: b["extra_info"] for b in run["benchmarks"]}
    assert set(by_impl) == {"reference", "matmul"}
    forward = by_impl["reference"]
    for key in ("gflop", "gflops", "max_rel_err", "frac_ceiling", "ceiling_gflops", "images_per_s", "model_gflops"):
        assert key in forward, key
    assert forward["model"] == "DiT-S/8" and forward["max_rel_err"] == 0.0
    assert run["machine_info"]["dit_fast"]["bench_device"] == "cpu"
    assert "## scaling forward" in (tmp_path / "run.md").read_text()
