"""Training: exact resume after SIGKILL (with a corrupt newest checkpoint), 1 vs 2 processes (DDP, FSDP2, FSDP2 +
compile), compile-then-shard, smoke run, errors."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dit_fast.cli import main as cli_main
from dit_fast.models.config import DiTConfig
from dit_fast.training.state import list_checkpoints, load_train_checkpoint, resolve_resume
from dit_fast.training.trainer import build_model
from dit_fast.utils.distributed import compile_and_shard
from dit_fast.utils.files import atomic_save
from tests.helpers import assert_close, perturb_

TINY = ["--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--impl", "reference", "--no-eval",
        "--no-progress", "--threads", "1", "--log-every", "1000"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dit_fast.cli", "train", "--results-dir", str(results), *TINY, *extra]


def _final(results: Path) -> dict:
    (exp,) = results.iterdir()
    return load_train_checkpoint(list_checkpoints(exp / "checkpoints")[-1])


def _assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["step"] == b["step"] and (a["epoch"], a["index"]) == (b["epoch"], b["index"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if atol == 0.0:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                assert_close(a[part][k], b[part][k], atol=atol, rtol=atol, name=f"{part}.{k}")


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    steps = "80"
    args = ["--max-steps", steps, "--global-batch-size", "16", "--ckpt-every", "2", "--keep-last", "3"]
    # The killed run: stopped with SIGKILL as soon as a few checkpoints exist, mid-run.
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed_dir, *args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(killed_dir.glob("*/checkpoints/*.pt"))
        if len(ckpts) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    (exp,) = killed_dir.iterdir()
    ckpts = list_checkpoints(exp / "checkpoints")
    assert ckpts and int(ckpts[-1].stem) < int(steps), "the run finished before it could be killed"
    # Corrupt (truncate) the newest checkpoint: resuming must fall back to the previous one and say so.
    if len(ckpts) >= 2:
        data = ckpts[-1].read_bytes()
        ckpts[-1].write_bytes(data[: len(data) // 2])
    resumed = subprocess.run(_train_cmd(killed_dir, *args, "--resume", "auto"), env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    out = resumed.stdout + resumed.stderr
    assert "resuming from" in out
    if len(ckpts) >= 2:
        assert "truncated or corrupt" in out and "falling back" in out

    straight = subprocess.run(_train_cmd(tmp_path / "straight", *args), env=ENV, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr
    a, b = _final(killed_dir), _final(tmp_path / "straight")
    assert a["step"] == int(steps)
    _assert_same_state(a, b)
    for k, v in a["opt"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["opt"]["state"][k][name]), f"optimizer {k}.{name} differs"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun (gloo) with 2 processes x 4 samples, DDP, FSDP2 and FSDP2 + compile (inductor), = 1 process x 8
    samples, eager: same data and draws."""
    args = ["--max-steps", "3", "--global-batch-size", "8", "--ckpt-every", "1000", "--global-seed", "5"]
    one = subprocess.run(_train_cmd(tmp_path / "one", *args), env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    reference = _final(tmp_path / "one")
    # fp32 all-reduce / reduce-scatter rounding only; compiled kernels also reorder reductions
    for mode, extra, atol in (("ddp", [], 1e-5), ("fsdp", ["--fsdp"], 1e-5),
                              ("fsdp-compile", ["--fsdp", "--compile"], 1e-4)):
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "dit_fast.cli", "train", "--results-dir", str(tmp_path / mode), *TINY, *args,
                              *extra], env=ENV, capture_output=True, text=True, timeout=600)
        assert two.returncode == 0, two.stdout + two.stderr
        b = _final(tmp_path / mode)
        assert b["world_size"] == 2 and len(b["rng"]) == 2
        _assert_same_state(reference, b, atol=atol)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_fsdp_compile_compiles_blocks_then_shards(tmp_path, impl):
    """``--fsdp --compile``'s preparation in one gloo process: every block compiled in place, then sharded (FSDP2
    wraps the compiled blocks, torchtitan's order); the blocks share one graph per block signature with no graph
    break and no recompilation over steps, and training matches the eager, unsharded model."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                       num_classes=7)
    torch.manual_seed(0)
    model = perturb_(build_model(config, impl), 0.05)
    eager = copy.deepcopy(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_and_shard(model, ema, compile=True, fsdp=True, backend="aot_eager")
        for m in (model, ema):
            assert isinstance(m, FSDPModule) and all(isinstance(b, FSDPModule) for b in m.blocks)
            assert all(isinstance(p, DTensor) for p in m.parameters())
        assert all(b._compiled_call_impl is not None for b in model.blocks)
        assert all(b._compiled_call_impl is None for b in ema.blocks)  # the EMA copy is never compiled
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 998]), torch.tensor([1, 6])
        opt, opt_eager = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager))
        graphs = []
        for _ in range(3):
            for m, o in ((model, opt), (eager, opt_eager)):
                o.zero_grad()
                m(x, t, y).square().mean().backward()
                o.step()
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs == [1 if impl == "reference" else 2] * 3, graphs  # DiTFast's block 0 takes no residual
        assert not counters["graph_break"], dict(counters["graph_break"])
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert_close(p.full_tensor(), q, atol=1e-5, rtol=1e-5, name=name)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_digits_smoke_run_writes_grid_and_metrics(tmp_path, capsys):
    rc = cli_main(["train", "--results-dir", str(tmp_path), "--hidden-size", "32", "--depth", "1", "--num-heads",
                   "2", "--impl", "reference", "--max-steps", "3", "--global-batch-size", "8", "--no-progress",
                   "--threads", "1", "--eval-samples", "20", "--eval-steps", "2"])
    assert rc == 0
    (exp,) = tmp_path.iterdir()
    assert {"samples.png", "metrics.json", "log.txt", "log.csv", "config.json"} <= {p.name for p in exp.iterdir()}
    out = capsys.readouterr().out
    assert "guided" in out and "class accuracy" in out and "Frechet distance" in out
    header, *rows = (exp / "log.csv").read_text().splitlines()
    assert header.startswith("step,epoch,loss") and len(rows) == 1
    ckpt = _final(tmp_path)
    assert ckpt["config"]["hidden_size"] == 32 and ckpt["config"]["in_channels"] == 1 and ckpt["step"] == 3
    # The training checkpoint is a superset of the official train.py dict, so the checkpoint loader reads it.
    from dit_fast.checkpoints import load_checkpoint

    loaded = load_checkpoint(list_checkpoints(exp / "checkpoints")[-1])
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k])


def test_atomic_save_and_resume_fallbacks(tmp_path, capsys):
    ckpt_dir = tmp_path / "000-x" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    good = {"format": "dit-fast-train-v1", "step": 2}
    atomic_save(good, ckpt_dir / "0000002.pt")
    (ckpt_dir / "0000004.pt").write_bytes(b"truncated")
    (ckpt_dir / ".0000006.pt.tmp-123").write_bytes(b"partial write")  # ignored
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["0000002.pt", "0000004.pt"]
    logged: list[str] = []
    ckpt, path = resolve_resume("auto", str(tmp_path), logged.append)
    assert path.name == "0000002.pt" and ckpt["step"] == 2
    assert "0000004.pt" in logged[0] and "falling back" in logged[0]
    (ckpt_dir / "0000002.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        resolve_resume(str(ckpt_dir / "0000004.pt"), str(tmp_path), logged.append)
    assert resolve_resume("auto", str(tmp_path / "empty"), logged.append) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.pt"), str(tmp_path), logged.append)


@pytest.mark.parametrize(("argv", "message"), [
    (["--data-path", "/nonexistent/folder"], "does not exist"),
    (["--global-batch-size", "4000"], "fewer than one global batch"),
    (["--num-classes", "3"], "smaller than the 10 classes"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--keep-last", "0"], "argument --keep-last: must be an integer >= 1"),
])
def test_train_errors(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--results-dir", str(tmp_path), *TINY, "--max-steps", "1", *argv])
    assert re.search(message, str(e.value) + capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # no experiment folder for a run that failed


def test_empty_image_folder_and_missing_vae(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no images"):
        cli_main(["train", "--results-dir", str(tmp_path / "r"), *TINY, "--data-path", str(tmp_path / "data")])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a" / "x.png")
    with pytest.raises(SystemExit, match="needs --vae"):
        cli_main(["train", "--results-dir", str(tmp_path / "r"), *TINY, "--data-path", str(tmp_path / "data")])
    with pytest.raises(SystemExit, match="VAE folder .* does not exist|diffusers"):
        cli_main(["train", "--results-dir", str(tmp_path / "r"), *TINY, "--data-path", str(tmp_path / "data"),
                  "--vae", str(tmp_path / "no-vae")])


def test_resume_with_another_config_fails(tmp_path):
    base = ["train", "--results-dir", str(tmp_path), *TINY, "--max-steps", "2", "--global-batch-size", "8"]
    assert cli_main(base) == 0
    with pytest.raises(SystemExit, match="another model config.*hidden_size"):
        cli_main([*base, "--resume", "auto", "--hidden-size", "64"])


def test_gradient_checkpointing_and_clipping_change_nothing_but_memory(tmp_path):
    base = ["train", *TINY, "--max-steps", "2", "--global-batch-size", "8"]
    assert cli_main([*base, "--results-dir", str(tmp_path / "plain")]) == 0
    assert cli_main([*base, "--results-dir", str(tmp_path / "ckpt"), "--grad-checkpointing"]) == 0  # bare: full
    _assert_same_state(_final(tmp_path / "plain"), _final(tmp_path / "ckpt"), atol=1e-6)
    assert cli_main([*base, "--results-dir", str(tmp_path / "sel"), "--grad-checkpointing", "selective"]) == 0
    _assert_same_state(_final(tmp_path / "plain"), _final(tmp_path / "sel"), atol=1e-6)
    assert cli_main([*base, "--results-dir", str(tmp_path / "clip"), "--max-grad-norm", "1e-3"]) == 0
    clipped, plain = _final(tmp_path / "clip"), _final(tmp_path / "plain")
    assert any(not torch.equal(clipped["model"][k], plain["model"][k]) for k in plain["model"])


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_train_on_latents_and_on_images_with_online_vae(tmp_path):
    from diffusers.models import AutoencoderKL
    from PIL import Image

    from dit_fast.models.vae import VAE
    from dit_fast.training.latents import extract_latents

    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp_path / "vae")
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 16), (40 * i, 100, 200 if c == "a" else 0)).save(tmp_path / "images" / c / f"{i}.png")
    extract_latents(str(tmp_path / "images"), VAE(tmp_path / "vae"), tmp_path / "latents", 16, progress=False)
    common = ["train", *TINY, "--model", "DiT-S/2", "--max-steps", "2", "--global-batch-size", "4",
              "--image-size", "16", "--num-workers", "0"]
    assert cli_main([*common, "--results-dir", str(tmp_path / "r1"), "--data-path", str(tmp_path / "latents")]) == 0
    latent = _final(tmp_path / "r1")
    assert latent["config"]["in_channels"] == 4 and latent["config"]["input_size"] == 8
    assert latent["config"]["num_classes"] == 2
    assert cli_main([*common, "--results-dir", str(tmp_path / "r2"), "--data-path", str(tmp_path / "images"),
                     "--vae", str(tmp_path / "vae")]) == 0
    assert _final(tmp_path / "r2")["config"] == latent["config"]


def test_train_config_is_filled_by_the_cli_and_presets_by_the_recipes():
    from dataclasses import fields

    from dit_fast.cli import build_parser
    from dit_fast.training.config import DIGITS_RECIPE, OFFICIAL_RECIPE, TrainConfig

    args = build_parser("train").parse_args(["train", "--lr", "3e-4", "--no-ema-warmup", "--fsdp", "--max-steps", "5"])
    cfg = TrainConfig.from_args(args)
    assert {f.name for f in fields(TrainConfig)} <= set(vars(args))  # one flag per field
    assert (cfg.lr, cfg.ema_warmup, cfg.fsdp, cfg.max_steps, cfg.global_batch_size) == (3e-4, False, True, 5, None)
    digits = cfg.resolved()
    assert digits.global_batch_size == DIGITS_RECIPE["global_batch_size"] and digits.lr == 3e-4
    assert digits.resolved() == digits
    official = TrainConfig(data_path="latents/").resolved()
    assert {k: getattr(official, k) for k in OFFICIAL_RECIPE} == OFFICIAL_RECIPE
    assert TrainConfig(data_path="latents/", epochs=2).resolved().max_steps is None  # --epochs is the budget
    assert TrainConfig.from_args(args).resolved().lr == 3e-4
