"""Sampling: PNG grid + ADM .npz, seeding independent of batch size and process count, latent decoding, errors."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.checkpoints import save_checkpoint
from dit_fast.cli import main as cli_main
from dit_fast.sampling.generate import generate
from dit_fast.sampling.outputs import save_grid, write_npz
from tests.helpers import tiny_dit

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(tiny_dit(), path)
    return path


def test_sample_writes_grid_and_npz(ckpt, tmp_path):
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    rc = cli_main(["sample", "--ckpt", str(ckpt), "--class-labels", "3", "7", "--num-samples", "5", "--sampler",
                   "ddim", "--num-sampling-steps", "3", "--cfg-scale", "2", "--guide-channels", "all", "--out",
                   str(out), "--npz", str(npz), "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert Image.open(out).size[0] > 0
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [3, 7, 3, 7, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "s.npz"]  # no temp files


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_samples_do_not_depend_on_batch_size(sampler):
    model, labels = tiny_dit(), torch.tensor([1, 2, 3, 4, 5])
    kw = {"sampler": sampler, "num_steps": 3, "cfg_scale": 1.5, "seed": 3, "progress": False}
    whole = generate(model, labels, batch_size=5, **kw)
    parts = torch.cat([generate(model, labels[:2], batch_size=2, **kw),
                       generate(model, labels[2:], batch_size=3, first_index=2, **kw)])
    assert whole.shape == (5, 1, 8, 8)
    if sampler == "ddpm":  # per-step noise comes from each batch's generator: only x_T is shared
        assert not torch.equal(whole, parts)
    else:
        torch.testing.assert_close(whole, parts, atol=1e-6, rtol=1e-6)


def test_two_process_sampling_matches_one(ckpt, tmp_path):
    common = ["--ckpt", str(ckpt), "--num-samples", "5", "--sampler", "dpm++", "--num-sampling-steps", "2",
              "--cfg-scale", "1.5", "--seed", "4", "--no-progress", "--batch-size", "2"]
    assert cli_main(["sample", *common, "--out", str(tmp_path / "1.png"), "--npz", str(tmp_path / "1.npz")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dit_fast.cli", "sample", *common, "--out", str(tmp_path / "2.png"), "--npz",
                          str(tmp_path / "2.npz")], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    with np.load(tmp_path / "1.npz") as a, np.load(tmp_path / "2.npz") as b:
        assert np.array_equal(a["labels"], b["labels"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # fp rounding of uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.npz", "1.png", "2.npz", "2.png"]  # shards removed


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_latent_model_decodes_with_vae(tmp_path):
    from diffusers.models import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp_path / "vae")
    save_checkpoint(tiny_dit(in_channels=4, input_size=4), tmp_path / "latent")
    base = ["sample", "--ckpt", str(tmp_path / "latent"), "--num-samples", "3", "--sampler", "ddim",
            "--num-sampling-steps", "2", "--no-progress", "--out", str(tmp_path / "g.png")]
    with pytest.raises(SystemExit, match="latent model .* pass --vae"):
        cli_main(base)
    assert cli_main([*base, "--vae", str(tmp_path / "vae"), "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 3)  # 4x4 latents, VAE factor 2


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
@pytest.mark.parametrize(("dtype", "native", "vae_dtype"), [("fp32", True, torch.float32),
                                                          ("bf16", True, torch.bfloat16),
                                                          ("bf16", False, torch.float32)])
def test_vae_decodes_in_the_sampling_dtype_where_bf16_is_native(tmp_path, monkeypatch, dtype, native, vae_dtype):
    """bf16 sampling decodes in bf16 too where the device computes bf16 natively (half the decode time on an
    AVX512-BF16 CPU); where it does not, the VAE stays fp32 (PyTorch's bf16 convolution loops are slow there)."""
    from diffusers.models import AutoencoderKL

    import dit_fast.commands.sample as sample_command

    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp_path / "vae")
    save_checkpoint(tiny_dit(in_channels=4, input_size=4), tmp_path / "latent")
    monkeypatch.setattr(sample_command, "native_bf16", lambda device: (native, "test"))
    made = []
    real = sample_command.VAE
    monkeypatch.setattr(sample_command, "VAE", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    assert cli_main(["sample", "--ckpt", str(tmp_path / "latent"), "--vae", str(tmp_path / "vae"), "--dtype", dtype,
                     "--num-samples", "2", "--sampler", "ddim", "--num-sampling-steps", "2", "--no-progress",
                     "--npz", str(tmp_path / "s.npz")]) == 0
    assert [v.dtype for v in made] == [vae_dtype]
    assert next(made[0].model.parameters()).dtype == vae_dtype
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3)


@pytest.mark.parametrize(("extra", "message"), [
    (["--class-labels", "3", "10"], r"class ids \[10\] are out of range"),
    (["--class-labels", "-1"], "argument --class-labels: must be an integer >= 0"),
    (["--cfg-scale", "0.5"], "argument --cfg-scale: must be a finite number >= 1"),
    (["--num-samples", "0"], "argument --num-samples: must be an integer >= 1"),
])
def test_sample_errors(ckpt, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), "--no-progress", *extra])
    assert re.search(message, str(e.value) + capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_checkpoint_and_wrong_config(tmp_path, ckpt):
    with pytest.raises(SystemExit, match="not found"):
        cli_main(["sample", "--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit, match="num_classes|classes"):
        cli_main(["sample", "--ckpt", str(ckpt), "--num-classes", "7", "--out", str(tmp_path / "g.png")])
    assert not list(tmp_path.iterdir())


def test_save_grid_and_npz_helpers(tmp_path):
    imgs = torch.linspace(-1, 1, 6 * 3 * 4 * 4).view(6, 3, 4, 4)
    path = save_grid(imgs, tmp_path / "g.png", nrow=3, padding=1, scale=2)
    assert Image.open(path).size == (1 + 3 * 9, 1 + 2 * 9)
    arr = np.random.RandomState(0).randint(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "shard.npy", arr[2:])
    write_npz(tmp_path / "x.npz", [arr[:2], tmp_path / "shard.npy"], np.arange(5))
    with np.load(tmp_path / "x.npz") as f:
        assert np.array_equal(f["arr_0"], arr) and f["labels"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="labels"):
        write_npz(tmp_path / "y.npz", [arr], np.arange(4))
    assert not (tmp_path / "y.npz").exists()


def test_guidance_interval_must_hold_a_step_the_sampler_visits():
    import argparse

    from dit_fast.commands.sample import check_interval_meets_steps
    from dit_fast.sampling.generate import model_timesteps
    from dit_fast.utils.validation import UserError

    assert model_timesteps("ddim", 50)[:3] == [0, 20, 41] and len(model_timesteps("ddpm", 250)) == 250
    dpm = model_timesteps("dpm++", 20)
    assert len(dpm) == 20 and dpm[0] == 0 and dpm[-1] == 999

    def check(interval, sampler="ddim", steps=50, cfg=2.0):
        check_interval_meets_steps(argparse.Namespace(guidance_interval=interval, cfg_scale=cfg, sampler=sampler,
                                                      num_sampling_steps=steps))

    with pytest.raises(UserError, match=r"holds none of the 50 timesteps ddim-50 visits \(the nearest: 0 and 20\)"):
        check([5, 15])
    check([5, 20])  # 20 is visited
    check([5, 15], cfg=1.0)  # unguided: the interval does not matter
    check(None)
    gap = next(t for t in range(1000) if t not in dpm)
    with pytest.raises(UserError, match="dpm\\+\\+-20"):
        check([gap, gap], sampler="dpm++", steps=20)
    check([dpm[5], dpm[5]], sampler="dpm++", steps=20)
