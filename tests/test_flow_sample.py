"""``dit-fast sample`` with flow models: a SiT-format checkpoint (SiT's state-dict layout = DiT's, learned-sigma
final layer) through the ODE and SDE samplers with guidance, the objective from the file or ``--objective``,
and the errors that name the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_fast.cli import main as cli_main
from dit_fast.diffusion import create_transport
from dit_fast.models.config import get_config
from dit_fast.models.dit import DiTFast
from dit_fast.sampling.generate import generate
from dit_fast.sampling.outputs import to_uint8
from tests.helpers import perturb_


@pytest.fixture(scope="module")
def sit_ckpt(tmp_path_factory):
    """A tiny SiT-format file: a bare DiT-layout state dict (3 channels in, 6 out: learned sigma, as SiT-XL/2)."""
    torch.manual_seed(0)
    model = DiTFast(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    perturb_(model, 0.05)
    path = tmp_path_factory.mktemp("sit") / "SiT-tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def _sample(path, tmp_path, *extra):
    npz = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
    rc = cli_main(["sample", "--ckpt", str(path), "--num-heads", "2", "--class-labels", "1", "4", "8",
                   "--cfg-scale", "2.5", "--seed", "5", "--out", str(tmp_path / "g.png"), "--npz", str(npz),
                   "--no-progress", "--device", "cpu", *extra])
    assert rc == 0
    with np.load(npz) as f:
        return f["arr_0"]


@pytest.mark.parametrize("sampler,steps,extra", [
    ("ode-heun", 4, ["--guidance-interval", "0.25", "1"]),
    ("sde", 5, ["--guide-channels", "all", "--last-step", "Tweedie"]),
    ("ode-euler", 3, []),
])
def test_sit_checkpoint_samples_with_guidance(sit_ckpt, tmp_path, sampler, steps, extra):
    path, model = sit_ckpt
    images = _sample(path, tmp_path, "--objective", "flow", "--sampler", sampler, "--num-sampling-steps",
                     str(steps), *extra)
    options = {"last_step": "Tweedie", "diffusion_form": "sigma", "diffusion_norm": 1.0,
               "last_step_size": 0.04} if sampler == "sde" else {}
    expected = generate(model, torch.tensor([1, 4, 8]), sampler=sampler, num_steps=steps, cfg_scale=2.5,
                        guide_channels="all" if "all" in extra else 3,
                        interval=(0.25, 1.0) if "--guidance-interval" in extra else None, seed=5,
                        clip_denoised=True, progress=False, transport=create_transport(), flow_options=options)
    assert np.abs(images.astype(int) - to_uint8(expected).astype(int)).max() <= 1


def test_sit_name_without_objective_says_pass_objective_flow(sit_ckpt, tmp_path, capsys):
    path, _ = sit_ckpt
    with pytest.raises(SystemExit, match=r"SiT-tiny\.pt looks like a SiT \(flow\) checkpoint.*--objective flow"):
        cli_main(["sample", "--ckpt", str(path), "--num-heads", "2", "--out", str(tmp_path / "g.png"),
                  "--no-progress"])


@pytest.mark.parametrize("extra,message", [
    (["--objective", "flow", "--sampler", "ddpm"], r"sampler 'ddpm' cannot sample a flow model \(ddpm is for DDPM"),
    (["--objective", "ddpm", "--sampler", "sde"], r"sampler 'sde' cannot sample a DDPM model"),
    (["--objective", "ddpm", "--path-type", "GVP"], r"--path-type is for flow models"),
])
def test_objective_errors(sit_ckpt, tmp_path, extra, message):
    path, _ = sit_ckpt
    with pytest.raises(SystemExit, match=message):
        cli_main(["sample", "--ckpt", str(path), "--num-heads", "2", "--out", str(tmp_path / "g.png"),
                  "--no-progress", *extra])
    assert not list(tmp_path.iterdir())


def test_flow_training_checkpoint_samples_without_objective_flag(tmp_path):
    """A dit-fast flow training run stores its objective: sample picks the flow family (default sde) itself."""
    rc = cli_main(["train", "--objective", "flow", "--results-dir", str(tmp_path / "runs"), "--hidden-size", "32",
                   "--depth", "1", "--num-heads", "2", "--impl", "reference", "--max-steps", "2",
                   "--global-batch-size", "8", "--no-progress", "--no-eval", "--log-every", "100"])
    assert rc == 0
    (ckpt,) = (tmp_path / "runs").glob("*/checkpoints/*.pt")
    out = tmp_path / "out"
    out.mkdir()
    images = _sample(ckpt, out, "--num-sampling-steps", "3")
    assert images.shape == (3, 8, 8, 3)
    with pytest.raises(SystemExit, match="was trained with the flow objective"):
        _sample(ckpt, out, "--objective", "ddpm")


def test_sit_model_names_are_dit_sizes():
    assert get_config("SiT-XL/2") == get_config("DiT-XL/2") and get_config("SiT-B-4") == get_config("DiT-B/4")


def test_cache_with_a_flow_sampler(sit_ckpt, tmp_path, capsys):
    """``--cache`` counts the flow sampler's network evaluations: ode-heun with 5 time points makes 8."""
    path, _ = sit_ckpt
    _sample(path, tmp_path, "--objective", "flow", "--sampler", "ode-heun", "--num-sampling-steps", "5", "--cache",
            "fora:2")
    assert "cache fora:2: 4 full network evaluations, 4 cached" in capsys.readouterr().out
