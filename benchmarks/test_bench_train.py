"""Training level: the real ``Trainer.train_step`` of ``dit-fast train``, per implementation and batch size.

One group per batch ("<config> batch <B> trainer step"; batches 32 and 64 on a GPU, 2 on a CPU). Each case builds the
``Trainer`` the command line builds (a latent folder of random VAE posteriors written to a temporary directory,
DiT-XL/2 on a GPU) and times ``train_step``: the diffusion draws, the forward under autocast (bf16 on a GPU) over fp32
master weights, the loss, the backward, AdamW (fused on CUDA) and the EMA update. Implementations: the plain
reference and DiTFast, eager and with their blocks compiled (``+compile``; regional, as ``DiTFast.compile()``).

Parity, outside the timed region: the first step (also the warm-up, and the compile) of every case draws the same
timesteps and noise (the step's generator is seeded by the step), so its parameter gradients are compared with the
fp32 reference trainer's first step (``dtype="fp32"``); the bound is relative to the plain reference's own error
under the run's autocast dtype at that step. Work per step: 3 forwards (``dit_fast.gflops`` x 2 x batch x 3).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    compile_regionally,
    forward_gflop,
    max_rel_err,
    record_and_check,
    run_timed,
)
from dit_fast.models.config import get_config
from dit_fast.training.config import TrainConfig
from dit_fast.training.data import LABELS_FILE, LATENTS_FILE, META_FILE
from dit_fast.training.trainer import Trainer
from dit_fast.utils.distributed import Dist

TRAIN_BATCHES = {"cuda": (32, 64), "cpu": (2,)}
TRAINER_IMPLS = ("reference", "reference+compile", "dit_fast", "dit_fast+compile")
IMPL_FLAG = {"reference": "reference", "dit_fast": "fast"}  # benchmark impl -> TrainConfig.impl


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "trainer_impl" in metafunc.fixturenames:
        from benchmarks.common import settings_from_config

        settings = settings_from_config(metafunc.config)
        batches = (settings.batch,) if settings.batch else TRAIN_BATCHES[settings.kind]
        cases = [(b, impl) for b in batches for impl in TRAINER_IMPLS if settings.wants(impl)]
        metafunc.parametrize(("train_batch", "trainer_impl"), cases, ids=[f"B{b}-{i}" for b, i in cases])


@functools.cache
def latent_folder(config_name: str, samples: int) -> Path:
    """A latent folder (``dit-fast extract-latents`` layout) of ``samples`` random posteriors for ``config_name``."""
    cfg = get_config(config_name)
    root = Path(tempfile.mkdtemp(prefix="dit-fast-bench-latents-"))
    gen = np.random.default_rng(0)
    shape = (samples, 2, 2, cfg.in_channels, *cfg.grid_input)
    moments = gen.standard_normal(shape, dtype=np.float32)
    moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1 + 0.05  # the std halves: positive
    np.save(root / LATENTS_FILE, moments)
    np.save(root / LABELS_FILE, gen.integers(0, cfg.num_classes, samples).astype(np.int64))
    meta = {"image_size": 8 * cfg.grid_input[0], "classes": [str(c) for c in range(cfg.num_classes)],
            "scale_factor": 0.18215}
    (root / META_FILE).write_text(json.dumps(meta))
    return root


def build_trainer(impl: str, config_name: str, batch: int, device: torch.device, dtype: str) -> Trainer:
    """The ``dit-fast train`` Trainer for ``impl`` ("+compile": its blocks compiled) at one global batch, its modules
    built directly on ``device`` (seeded: every trainer starts from the same weights)."""
    cfg = TrainConfig(data_path=str(latent_folder(config_name, batch)), model=config_name, global_batch_size=batch,
                      results_dir=tempfile.mkdtemp(prefix="dit-fast-bench-train-"), impl=IMPL_FLAG[
                          impl.removesuffix("+compile")], dtype=dtype, device=device.type, max_steps=1000,
                      no_progress=True, eval=False)
    with torch.device(device):
        trainer = Trainer(cfg, Dist(rank=0, world_size=1, local_rank=0, device=device))
    if impl.endswith("+compile"):
        if impl.startswith("dit_fast"):
            trainer.model.compile()
        else:
            compile_regionally(trainer.model)
    return trainer


def step_inputs(trainer: Trainer, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's data, made on ``device``: posterior moments (B, 2, C, h, w) and labels (B,)."""
    cfg = trainer.config
    gen = torch.Generator(device).manual_seed(0)
    mean = torch.randn(batch, cfg.in_channels, *cfg.grid_input, generator=gen, device=device)
    std = torch.rand(batch, cfg.in_channels, *cfg.grid_input, generator=gen, device=device) * 0.1 + 0.05
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen, device=device)
    return torch.stack([mean, std], dim=1), labels


def gradients(model: nn.Module) -> torch.Tensor:
    """Every parameter gradient of the step just taken, flattened and concatenated in fp32."""
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


@functools.cache
def _first_step_gradients(impl: str, config_name: str, batch: int, device: torch.device, dtype: str) -> torch.Tensor:
    trainer = build_trainer(impl, config_name, batch, device, dtype)
    trainer.train_step(*step_inputs(trainer, batch, device))
    grads = gradients(trainer.model)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return grads


def trainer_oracle(config_name: str, batch: int, settings: BenchSettings) -> tuple[torch.Tensor, float]:
    """(the fp32 reference trainer's first-step gradients, the plain reference's own error in the run's dtype)."""
    exact = _first_step_gradients("reference", config_name, batch, settings.device, "fp32")
    reference_err = 0.0
    if settings.dtype != torch.float32:
        low = _first_step_gradients("reference", config_name, batch, settings.device, settings.dtype_name)
        reference_err = max_rel_err(low, exact)
    return exact, reference_err


def test_trainer_step(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, profile_case,
                      train_batch: int, trainer_impl: str) -> None:
    """Time ``Trainer.train_step`` (forward, backward, AdamW, EMA); first-step gradients checked against fp32."""
    if bench_settings.dtype == torch.float16:
        pytest.skip("the trainer's autocast dtypes are fp32 and bf16")
    device = bench_settings.device
    config_name = bench_settings.sizing("model").config
    case = f"{config_name} batch {train_batch} trainer step"
    benchmark.group = case
    exact, reference_err = trainer_oracle(config_name, train_batch, bench_settings)
    trainer = build_trainer(trainer_impl, config_name, train_batch, device, bench_settings.dtype_name)
    data = step_inputs(trainer, train_batch, device)
    trainer.train_step(*data)  # step 0: warm-up (and compile), and the parity check's gradients
    grads = gradients(trainer.model)
    run_timed(benchmark, lambda: trainer.train_step(*data), device, bench_settings.sizing("model").rounds,
              warmup_rounds=0, grad=True)
    profile_case(benchmark, lambda: trainer.train_step(*data))
    record_and_check(benchmark, impl=trainer_impl, case=case, gflop=3 * forward_gflop(config_name, train_batch),
                     images=train_batch, output=grads, oracle=exact, settings=bench_settings, ceiling=matmul_ceiling,
                     model=config_name, reference_err=reference_err)
