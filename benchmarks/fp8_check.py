"""bf16 against FP8 (``dit_fast.fp8``, torchao float8 rowwise) on one GPU: ``python -m benchmarks.fp8_check``.

Two measurements per precision, DiTFast with its blocks compiled (torchao's FP8 casts need ``torch.compile`` to fuse):
an inference forward of DiT-XL/2 at batch 64, and the real ``Trainer.train_step`` (autocast bf16 over fp32 master
weights, AdamW, EMA) at batch 32. Each records the median time, images/s, MFU against the run's measured bf16 matmul
ceiling and against the datasheet, and its error against fp32: the forward's output against the fp32 reference's,
the first training step's parameter gradients against the fp32 reference trainer's (outside the timed region).
Results go to ``--json`` after every measurement (a run cut short keeps what it finished). Where FP8 cannot run
(CPU, a GPU before sm_89, torchao missing) it says why in one line and exits 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    environment_info,
    forward_gflop,
    make_inputs,
    max_rel_err,
    measure_matmul_ceiling,
    reference_model,
)
from benchmarks.test_bench_train import build_trainer, gradients, step_inputs, trainer_oracle
from dit_fast.models.dit import DiTFast
from dit_fast.models.fp8 import enable_fp8, fp8_unavailable_reason
from dit_fast.utils.hardware import peak_flops, strict_fp32


def median_seconds(fn: Callable[[], Any], rounds: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``rounds`` calls (after the caller's warm-up), synchronised."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_case(precision: str, config: str, batch: int, device: torch.device, rounds: int) -> dict[str, Any]:
    """DiTFast bf16 (``precision`` "bf16") or with FP8 linears ("fp8"), blocks compiled: seconds and error vs fp32."""
    reference = reference_model(config, device)
    model = DiTFast.from_config(reference.config).to(device)
    model.load_state_dict(reference.state_dict())
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    if precision == "fp8":
        enable_fp8(model)
    model.compile()
    x, t, y = make_inputs(config, batch, device)
    with torch.no_grad():
        out = model(x.to(torch.bfloat16), t, y)  # warm-up and compile
        seconds = median_seconds(lambda: model(x.to(torch.bfloat16), t, y), rounds, device)
        with strict_fp32():
            exact = reference(x, t, y)
    return {"seconds": seconds, "gflop": forward_gflop(config, batch), "max_rel_err_vs_fp32": max_rel_err(out, exact)}


def train_case(precision: str, config: str, batch: int, device: torch.device, rounds: int) -> dict[str, Any]:
    """The trainer step of DiTFast (blocks compiled; FP8 linears for "fp8"): seconds, first-step gradient error."""
    trainer = build_trainer("dit_fast", config, batch, device, "bf16")
    if precision == "fp8":
        enable_fp8(trainer.model)  # the parameters are kept: the trainer's optimizer stays valid
    trainer.model.compile()
    data = step_inputs(trainer, batch, device)
    trainer.train_step(*data)  # step 0: warm-up, compile, and the gradients checked
    grads = gradients(trainer.model)
    seconds = median_seconds(lambda: trainer.train_step(*data), rounds, device)
    exact, _ = trainer_oracle(config, batch, _Settings(device))
    return {"seconds": seconds, "gflop": 3 * forward_gflop(config, batch), "max_rel_err_vs_fp32":
            max_rel_err(grads, exact)}


class _Settings:
    """The two fields of ``BenchSettings`` that ``trainer_oracle`` reads: fp32 oracle only (no bf16 baseline)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.dtype, self.dtype_name = device, torch.float32, "fp32"


def run(config: str, forward_batch: int, train_batch: int, rounds: int, out: Path | None) -> dict[str, Any]:
    """Measure every (case, precision) in turn, writing ``out`` after each; returns the results."""
    device = torch.device("cuda")
    ceiling = measure_matmul_ceiling(device, torch.bfloat16)
    datasheet = peak_flops(device, torch.bfloat16)
    result: dict[str, Any] = {"environment": environment_info(device, ("triton", "torchao")), "config": config,
                              "ceiling_gflops": ceiling.gflops, "datasheet_bf16_tflops": datasheet and datasheet / 1e12,
                              "cases": []}
    for name, fn, batch in (("forward", forward_case, forward_batch), ("trainer step", train_case, train_batch)):
        for precision in ("bf16", "fp8"):
            row = {"case": f"{config} batch {batch} {name}", "precision": precision, **fn(precision, config, batch,
                                                                                        device, rounds)}
            row["gflops"] = row["gflop"] / row["seconds"]
            row["images_per_s"] = batch / row["seconds"]
            row["mfu"] = row["gflops"] / ceiling.gflops
            row["mfu_datasheet"] = datasheet and row["gflops"] * 1e9 / datasheet
            result["cases"].append(row)
            print(f"{row['case']:<36} {precision}: {row['seconds'] * 1e3:8.1f} ms, {row['images_per_s']:7.1f} img/s,"
                  f" MFU {row['mfu']:.1%} (datasheet {row['mfu_datasheet'] or 0:.1%}), error vs fp32 "
                  f"{row['max_rel_err_vs_fp32']:.2e}", flush=True)
            if out is not None:
                out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fp8_check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="DiT-XL/2")
    parser.add_argument("--forward-batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here (after every case)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        print(f"fp8_check: nothing measured: {reason}")
        return 0
    run(args.config, args.forward_batch, args.train_batch, args.rounds, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
