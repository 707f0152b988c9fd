"""Training with either objective: the DDPM default draws exactly as before, flow matching trains a C-channel
model on SiT's loss, logit-normal times, and the objective stored in checkpoints and carried by ``convert``."""

from __future__ import annotations

import argparse

import pytest
import torch

from dit_fast.checkpoints import convert, load_checkpoint, read_checkpoint
from dit_fast.commands.train import add_arguments
from dit_fast.diffusion import Transport
from dit_fast.training.config import TrainConfig
from dit_fast.training.state import list_checkpoints
from dit_fast.training.trainer import Trainer, step_generator
from dit_fast.utils.distributed import Dist

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _trainer(tmp_path, **fields) -> Trainer:
    cfg = TrainConfig(results_dir=str(tmp_path), hidden_size=32, depth=1, num_heads=2, impl="reference",
                      global_batch_size=8, max_steps=2, ckpt_every=2, log_every=1000, no_progress=True, eval=False,
                      **fields)
    return Trainer(cfg, CPU)


def _first_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(trainer.batches()))


def test_ddpm_default_draws_the_official_timesteps(tmp_path):
    """The default objective keeps DiT's draw: t = randint(0, 1000) first from the step's generator, then the
    noise, so DDPM training is bit-identical to before the flow objective existed."""
    trainer = _trainer(tmp_path)
    assert trainer.transport is None and trainer.config.learn_sigma
    x, y = _first_batch(trainer)
    _, _, t, noise = trainer._draws(x, y)
    g = step_generator(0, 0, CPU.device)
    assert torch.equal(t, torch.randint(0, 1000, (8,), generator=g))
    assert torch.equal(noise, torch.randn(noise.shape, generator=g))
    assert trainer.objective() == {"name": "ddpm", "diffusion_steps": 1000, "time_sampling": "uniform"}


def test_ddpm_with_lognormal_timesteps(tmp_path):
    trainer = _trainer(tmp_path, time_sampling="lognormal:0.5:1")
    x, y = _first_batch(trainer)
    t = trainer._draws(x, y)[2]
    s = torch.sigmoid(0.5 + torch.randn(8, generator=step_generator(0, 0, CPU.device)))
    assert torch.equal(t, (s.double() * 1000).floor().long())


def test_flow_training_step_checkpoint_and_convert(tmp_path):
    trainer = _trainer(tmp_path, objective="flow", time_sampling="lognormal")
    assert not trainer.config.learn_sigma and trainer.transport.time_sampling.spec == "lognormal:0:1"
    x, y = _first_batch(trainer)
    xd, yd, t, noise = trainer._draws(x, y)
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1
    expected = trainer.transport.training_losses(trainer.model, xd, {"y": yd}, t=t, noise=noise)["loss"].mean()
    terms = trainer.train_step(x, y)
    assert torch.equal(terms["loss"], expected.detach()) and "vb" not in terms  # no bound term to report
    trainer.run()
    log = (trainer.exp_dir / "log.txt").read_text()
    assert "(mse " in log and "vb " not in log
    (ckpt_path,) = list_checkpoints(trainer.ckpt_dir)
    objective = load_checkpoint(ckpt_path).objective
    assert objective == {"name": "flow", "path_type": "Linear", "prediction": "velocity", "loss_weight": "none",
                         "train_eps": 0.0, "sample_eps": 0.0, "time_sampling": "lognormal:0:1"}
    assert Transport.from_dict(objective) == trainer.transport
    for dst in (tmp_path / "model.safetensors", tmp_path / "folder"):
        convert(ckpt_path, dst, "dit-fast")
        assert read_checkpoint(dst).objective == objective
    convert(ckpt_path, tmp_path / "official.pt", "official")
    assert read_checkpoint(tmp_path / "official.pt", num_heads=2).objective == {}  # bare state dict (as SiT.s)


def test_objective_flags_parse_and_reject_bad_values():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--objective", "flow", "--path-type", "GVP", "--prediction", "noise",
                              "--loss-weight", "likelihood", "--time-sampling", "lognormal:-0.5:1.5"])
    cfg = TrainConfig.from_args(args)
    assert (cfg.objective, cfg.path_type, cfg.prediction, cfg.loss_weight) == ("flow", "GVP", "noise", "likelihood")
    assert cfg.time_sampling == "lognormal:-0.5:1.5"
    for bad in (["--time-sampling", "beta"], ["--time-sampling", "lognormal:0:0"], ["--objective", "edm"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
