"""Fault injection over every command, as a user (or a scheduler, or a full disk) would inflict it: nothing a user
owns is modified by a failing or mistaken command, nothing hangs, no silent garbage, one line and a non-zero exit.

Cases that end in a check run in this process (``dit_fast.cli.main``; tiny models, a fraction of a second each).
What needs a process of its own runs as ``python -m dit_fast.cli`` in a subprocess: signals sent at named points
(``DIT_FAST_PAUSE_AT``, ``dit_fast.utils.lifecycle.pause_point``), data-loading workers, concurrent writers to one
run folder, a full disk (a small tmpfs where the test may mount one; skipped with the reason otherwise), and a
bad distributed environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.checkpoints import save_checkpoint
from dit_fast.cli import main as cli_main
from dit_fast.reference import DiT
from tests.helpers import ROOT, tiny_dit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "dit_fast.cli"]
TRAIN = ["train", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--impl", "reference", "--no-eval",
         "--no-progress", "--threads", "1", "--global-batch-size", "8"]
SAMPLE = ["sample", "--num-samples", "2", "--num-sampling-steps", "2", "--no-progress", "--device", "cpu"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(folder: Path, n: int = 4, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def _tiny_vae(folder: Path, prefix: str = "") -> None:
    import diffusers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=4, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(folder)
    if prefix:
        weights = folder / "diffusion_pytorch_model.safetensors"
        save_file({prefix + k: v for k, v in load_file(weights).items()}, weights)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Everything the cases read: checkpoints, VAEs, image and latent folders, .npz files, a user's files."""
    d = tmp_path_factory.mktemp("faults")
    threads = torch.get_num_threads()
    try:
        assert cli_main([*TRAIN, "--results-dir", str(d / "results"), "--max-steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    (ckpt,) = (d / "results").glob("*/checkpoints/0000002.pt")
    shutil.copy(ckpt, d / "model.pt")
    shutil.copy(ckpt, d / "other.pt")
    (d / "home" / "downloads").mkdir(parents=True)
    shutil.copy(ckpt, d / "home" / "downloads" / "ckpt.pt")
    (d / "home" / "config.json").write_text('{"mine": true}')
    no_opt = torch.load(ckpt, weights_only=True)
    del no_opt["opt"]
    torch.save(no_opt, d / "no_opt.pt")
    torch.manual_seed(0)
    save_checkpoint(DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=10), d / "latent_dit")
    save_checkpoint(tiny_dit(), d / "tiny")
    save_checkpoint(tiny_dit(), d / "m.safetensors")
    whole = (d / "m.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    (d / "bad.safetensors").write_bytes(whole[:8] + b"x" * 32 + whole[40:])
    whole = ckpt.read_bytes()
    (d / "cut.pt").write_bytes(whole[: len(whole) // 2])
    for c in ("a", "b"):
        _images(d / "imgs" / c)
    for stray in ("__MACOSX", "lost+found", ".hidden"):
        _images(d / "imgs" / stray, n=1)
    (d / "imgs" / "empty").mkdir()
    (d / "imgs" / "b" / "loop").symlink_to(d / "imgs" / "b")
    for c in ("a", "b"):
        _images(d / "trunc" / c, n=8)
    data = (d / "trunc" / "a" / "3.jpg").read_bytes()
    (d / "trunc" / "a" / "3.jpg").write_bytes(data[: len(data) // 3])
    lat = d / "latents"
    lat.mkdir()
    np.save(lat / "latents.npy", np.random.default_rng(0).standard_normal((8, 2, 2, 4, 2, 2)).astype(np.float32))
    np.save(lat / "labels.npy", np.arange(8) % 2)
    (lat / "meta.json").write_text(json.dumps({"classes": ["a", "b"], "image_size": 4, "scale_factor": 0.18215}))
    shutil.copytree(lat, d / "bad_meta")
    (d / "bad_meta" / "meta.json").write_text('{"classes": ["a", "b"], "image_size": ')
    rng = np.random.default_rng(0)
    np.savez(d / "colour.npz", arr_0=rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8), labels=np.arange(16) % 10)
    whole = (d / "colour.npz").read_bytes()
    (d / "cut.npz").write_bytes(whole[: len(whole) // 2])
    feats = rng.standard_normal((64, 4))
    np.savez(d / "good_stats.npz", features=feats)
    np.savez(d / "nan_stats.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    np.savez(d / "neg_stats.npz", mu=np.zeros(4), sigma=-np.eye(4))
    if _has("diffusers"):
        _tiny_vae(d / "vae")
        _tiny_vae(d / "vae_prefixed", prefix="vae.")
    return d


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(argv: list[str], capsys, **env: str) -> tuple[int, str]:
    """``dit-fast argv`` in this process: (exit status, stderr)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    try:
        code = cli_main(argv)
        message = ""
    except SystemExit as e:
        code, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    err = capsys.readouterr().err + message
    return code, err.strip()


def one_line(code: int, err: str, expected_code: int, pattern: str) -> None:
    import re

    # dit-fast's own lines (third-party import warnings and progress bars aside)
    lines = [line for line in err.splitlines() if line.startswith("dit-fast ")]
    assert code == expected_code, f"exit status {code}, expected {expected_code}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line from dit-fast on stderr, got:\n{err}"
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


# ---------------------------------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("option", ["--out", "--npz"])
def test_sample_never_replaces_its_checkpoint(world, capsys, option):
    before = _sha(world / "model.pt")
    extra = ["--out", str(world / "never.png")] if option == "--npz" else []
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), option, str(world / "model.pt"), *extra], capsys)
    one_line(code, err, 1, rf"^dit-fast sample: {option} \S+model\.pt is the input --ckpt \S+model\.pt")
    assert _sha(world / "model.pt") == before and not (world / "never.png").exists()


def test_sample_out_and_npz_are_not_one_file(world, capsys):
    same = str(world / "same.png")
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", same, "--npz", same], capsys)
    one_line(code, err, 1, r"^dit-fast sample: --out and --npz are the same file")


def test_sample_never_replaces_a_file_it_did_not_write(world, capsys):
    before = _sha(world / "other.pt")
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(world / "o.png"), "--npz",
                     str(world / "other.pt")], capsys)
    one_line(code, err, 1, r"--npz \S+other\.pt exists and is a PyTorch checkpoint, not an \.npz of samples this "
                           r"command writes; pass --overwrite")
    assert _sha(world / "other.pt") == before


def test_sample_writes_the_format_its_suffix_names(world, capsys, tmp_path):
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(tmp_path / "g.jpg")], capsys)
    assert code == 0, err
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(tmp_path / "g.gif")], capsys)
    one_line(code, err, 1, r"--out \S+g\.gif: unsupported image type '\.gif'")


def test_convert_never_replaces_its_source(world, capsys):
    before = _sha(world / "other.pt")
    code, err = run(["convert", str(world / "other.pt"), str(world / "other.pt"), "--to", "official", "--overwrite"],
                    capsys)
    one_line(code, err, 1, r"^dit-fast convert: DST \S+other\.pt is the input SRC")
    assert _sha(world / "other.pt") == before


def test_resume_from_a_checkpoint_outside_a_run_folder_starts_a_new_one(world, capsys, tmp_path):
    home = world / "home"
    before = {p: _sha(p) for p in home.rglob("*") if p.is_file()}
    code, err = run([*TRAIN, "--results-dir", str(tmp_path / "r"), "--max-steps", "3", "--resume",
                     str(home / "downloads" / "ckpt.pt")], capsys)
    assert code == 0, err
    assert {p: _sha(p) for p in home.rglob("*") if p.is_file()} == before  # nothing added, changed or removed
    (run_dir,) = (tmp_path / "r").iterdir()
    assert (run_dir / "checkpoints" / "0000003.pt").is_file()


# ---------------------------------------------------------------------------------------------------- models, data


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
@pytest.mark.parametrize("command", ["extract-latents", "sample", "train"])
def test_a_vae_that_does_not_load_is_refused(world, capsys, tmp_path, command):
    if command == "train":
        argv = [*TRAIN, "--data-path", str(world / "imgs"), "--vae", str(world / "vae_prefixed"), "--image-size", "8",
                "--model", "DiT-S/2", "--results-dir", str(tmp_path / "r")]
    elif command == "sample":
        argv = [*SAMPLE, "--ckpt", str(world / "latent_dit"), "--vae", str(world / "vae_prefixed"), "--out",
                str(tmp_path / "s.png")]
    else:
        argv = ["extract-latents", "--data-path", str(world / "imgs"), "--vae", str(world / "vae_prefixed"),
                "--output", str(tmp_path / "lat"), "--image-size", "8", "--num-workers", "0", "--device", "cpu"]
    code, err = run(argv, capsys)
    one_line(code, err, 1, r"the VAE weights in \S+vae_prefixed do not fit its AutoencoderKL config: \d+ weights "
                           r"missing .*the prefix 'vae'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_vae_that_is_not_a_vae(world, capsys, tmp_path):
    code, err = run(["extract-latents", "--data-path", str(world / "imgs"), "--vae", str(world / "tiny"), "--output",
                     str(tmp_path / "lat"), "--image-size", "8", "--device", "cpu"], capsys)
    one_line(code, err, 1, r"--vae \S+tiny holds a model without _class_name .*not an AutoencoderKL")


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_stray_empty_and_looping_folders_are_not_classes(world, capsys, tmp_path):
    code, err = run(["extract-latents", "--data-path", str(world / "imgs"), "--vae", str(world / "vae"), "--output",
                     str(tmp_path / "lat"), "--image-size", "8", "--num-workers", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert meta["classes"] == ["a", "b"] and meta["num_images"] == 8


@pytest.mark.parametrize(("name", "pattern"), [
    ("cut.pt", r"could not read \S+cut\.pt: truncated or corrupt PyTorch file"),
    ("cut.safetensors", r"could not read \S+cut\.safetensors: truncated or corrupt safetensors file"),
    ("bad.safetensors", r"\S+bad\.safetensors is not a checkpoint"),
])
def test_corrupt_checkpoints_are_named(world, capsys, tmp_path, name, pattern):
    code, err = run([*SAMPLE, "--ckpt", str(world / name), "--out", str(tmp_path / "s.png")], capsys)
    one_line(code, err, 1, pattern)
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_truncated_checkpoint_is_named(world, capsys, tmp_path):
    code, err = run([*TRAIN, "--results-dir", str(tmp_path / "r"), "--resume", str(world / "cut.pt")], capsys)
    one_line(code, err, 1, r"could not read \S+cut\.pt: truncated or corrupt PyTorch file")
    assert not (tmp_path / "r").exists()


def test_bad_latent_meta_is_named(world, capsys, tmp_path):
    code, err = run([*TRAIN, "--data-path", str(world / "bad_meta"), "--results-dir", str(tmp_path / "r"),
                     "--model", "DiT-S/2"], capsys)
    one_line(code, err, 1, r"bad_meta/meta\.json is not valid JSON")
    assert not (tmp_path / "r").exists()


def test_image_size_must_match_a_latent_folder(world, capsys, tmp_path):
    code, err = run([*TRAIN, "--data-path", str(world / "latents"), "--results-dir", str(tmp_path / "r"),
                     "--model", "DiT-S/2", "--image-size", "64"], capsys)
    one_line(code, err, 1, r"--image-size 64: the latent folder \S+latents was extracted at 4")


def test_resume_without_optimizer_state(world, capsys, tmp_path):
    code, err = run([*TRAIN, "--results-dir", str(tmp_path / "r"), "--resume", str(world / "no_opt.pt")], capsys)
    one_line(code, err, 1, r"no_opt\.pt has no optimizer state \('opt'\)")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("argv", "code", "pattern"), [
    (["--guidance-interval", "1500", "1600"], 1, r"--guidance-interval 1500 1600: the model's diffusion has "
                                                 r"timesteps 0\.\.999; outside them guidance would never apply"),
    (["--guidance-interval", "5", "15", "--sampler", "ddim", "--num-sampling-steps", "50", "--cfg-scale", "2"], 1,
     r"--guidance-interval 5 15 holds none of the 50 timesteps ddim-50 visits \(the nearest: 0 and 20\); guidance "
     r"would never apply"),
    (["--image-size", "64"], 1, r"--image-size 64 does not match the checkpoint, which makes 8x8 images"),
    (["--seed", str(2**32)], 2, r"argument --seed: must be an integer in \[0, 4294967295\]"),
    (["--class-labels"], 2, r"argument --class-labels: expected at least one argument"),
    (["--device", "mps"], 2, r"argument --device: must be cpu, cuda or cuda:N, got 'mps'"),
    (["--device", "meta"], 2, r"argument --device: must be cpu, cuda or cuda:N, got 'meta'"),
    (["--num-samples", str(10**12)], 1, r"--num-samples 1000000000000: the samples need about .* of memory"),
])
def test_sample_options(world, capsys, tmp_path, argv, code, pattern):
    out = tmp_path / "s.png"
    got, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(out), *argv], capsys)
    one_line(got, err, code, pattern)
    assert not out.exists()


def test_sample_image_size_of_a_pixel_checkpoint_is_its_pixel_size(world, capsys, tmp_path):
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(tmp_path / "s.png"), "--image-size",
                     "8"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(("argv", "code", "pattern"), [
    (["--eval", "--eval-samples", "1"], 2, r"argument --eval-samples: must be an integer >= 2, got '1'"),
    (["--eval", "--eval-steps", "2000"], 1, r"--eval-steps 2000 is more than the 1000 diffusion steps"),
    (["--global-seed", str(2**32)], 2, r"argument --global-seed: must be an integer in \[0, 4294967295\]"),
    (["--device", "mps"], 2, r"argument --device: must be cpu, cuda or cuda:N, got 'mps'"),
])
def test_train_options_are_checked_before_training(capsys, tmp_path, argv, code, pattern):
    got, err = run([*TRAIN, "--results-dir", str(tmp_path / "r"), "--max-steps", "2", *argv], capsys)
    one_line(got, err, code, pattern)
    assert not (tmp_path / "r").exists()


def test_bogus_attention_variable_is_named_before_the_run_folder(capsys, tmp_path):
    code, err = run([*TRAIN, "--results-dir", str(tmp_path / "r"), "--max-steps", "2", "--impl", "fast"], capsys,
                    DIT_FAST_ATTENTION="bogus")
    one_line(code, err, 1, r"environment variable DIT_FAST_ATTENTION='bogus' is not an attention backend")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize(("argv", "code", "pattern"), [
    (["{w}/colour.npz"], 1, r"colour\.npz: arr_0 holds 32x32 colour images, not digit samples"),
    (["{w}/cut.npz"], 1, r"cut\.npz is not a readable \.npz"),
    (["--frechet", "{w}/nan_stats.npz", "{w}/good_stats.npz"], 1, r"nan_stats\.npz: mu holds NaN or inf"),
    (["--frechet", "{w}/neg_stats.npz", "{w}/good_stats.npz"], 1, r"neg_stats\.npz: sigma is not a covariance "
                                                                   r"matrix"),
    (["{w}/colour.npz", "--ref", "{w}/cut.npz"], 1, r"cut\.npz is not a readable \.npz"),
    (["{w}/colour.npz", "--ref", "{w}/good_stats.npz", "--batch-size", "0"], 2, r"argument --batch-size: must be"),
])
def test_evaluate_inputs(world, capsys, argv, code, pattern):
    got, err = run(["evaluate", *(a.format(w=world) for a in argv)], capsys)
    one_line(got, err, code, pattern)


def test_evaluate_json_is_valid(world, capsys):
    code, _ = run(["evaluate", "--frechet", str(world / "good_stats.npz"), str(world / "good_stats.npz"), "--json"],
                  capsys)
    assert code == 0
    out = capsys.readouterr()  # printed to stdout before the capture in run() read stderr
    del out


def test_evaluate_debug_shows_the_traceback(world):
    with pytest.raises(ValueError, match="not a readable"):
        cli_main(["evaluate", str(world / "cut.npz"), "--debug"])


# ---------------------------------------------------------------------------------------------------- processes


def _spawn(argv: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *argv], cwd=cwd, env={**ENV, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_paused(proc: subprocess.Popen, name: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if line.startswith(f"dit-fast: paused at {name}"):
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"never paused at {name}: {proc.communicate()}")


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate("\n", timeout=timeout)
    return proc.returncode, err.strip()


def test_sigterm_while_sample_writes_its_npz(world, tmp_path):
    proc = _spawn([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", "s.png", "--npz", "s.npz"], tmp_path,
                  DIT_FAST_PAUSE_AT="written s.npz")
    _wait_paused(proc, "written s.npz")
    assert any(p.name.startswith(".s.npz.") for p in tmp_path.iterdir())  # the temporary is being written
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    one_line(code, err, 143, r"^dit-fast sample: stopped by SIGTERM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]  # the grid was done; no .npz, no temporary


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_sigterm_while_extract_latents_writes(world, tmp_path):
    proc = _spawn(["extract-latents", "--data-path", str(world / "imgs"), "--vae", str(world / "vae"), "--output",
                   "lat", "--image-size", "8", "--num-workers", "0", "--device", "cpu"], tmp_path,
                  DIT_FAST_PAUSE_AT="written lat")
    _wait_paused(proc, "written lat")
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".lat.")  # the temporary folder, complete
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    one_line(code, err, 143, r"^dit-fast extract-latents: stopped by SIGTERM")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_in_trains_first_seconds_leaves_no_empty_run_folder(tmp_path):
    proc = _spawn([*TRAIN, "--results-dir", "r", "--max-steps", "2"], tmp_path, DIT_FAST_PAUSE_AT="train:setup")
    _wait_paused(proc, "train:setup")
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    one_line(code, err, 143, r"^dit-fast train: stopped by SIGTERM")
    assert not list((tmp_path / "r").glob("*"))


def test_a_second_writer_is_refused_and_a_dead_ones_temps_are_swept(tmp_path, capsys, monkeypatch):
    """Writer A pauses inside its second checkpoint save; B (--resume auto) is refused naming A and touches nothing;
    A is killed outright; C resumes A's run, sweeping A's temporary."""
    train = [*TRAIN, "--results-dir", "r", "--max-steps", "4", "--ckpt-every", "2"]
    a = _spawn(train, tmp_path, DIT_FAST_PAUSE_AT="written 0000004.pt")
    _wait_paused(a, "written 0000004.pt")
    ckpts = tmp_path / "r" / "000-DiT-digits" / "checkpoints"
    (temp,) = ckpts.glob(".*.tmp")
    monkeypatch.chdir(tmp_path)
    code, err = run([*train, "--resume", "auto"], capsys)  # B, in this process
    one_line(code, err, 1, rf"run folder \S+000-DiT-digits is in use by process {a.pid} ")
    assert temp.exists() and [p.name for p in ckpts.glob("*.pt")] == ["0000002.pt"]  # B touched nothing
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["000-DiT-digits"]
    a.kill()
    a.communicate(timeout=60)
    code, err = run([*train, "--resume", "auto"], capsys)  # C
    assert code == 0, err
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000002.pt", "0000004.pt"]  # the temporary is gone


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_a_truncated_image_in_a_worker_ends_training(world, tmp_path):
    """The hang of round 2: a worker's error, then workers that ignored SIGTERM kept the process from exiting."""
    argv = ["train", "--data-path", str(world / "trunc"), "--vae", str(world / "vae"), "--image-size", "8", "--model",
            "DiT-S/2", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--no-progress", "--results-dir", "r",
            "--max-steps", "4", "--global-batch-size", "4", "--num-workers", "2"]
    r = subprocess.run([*CLI, *argv], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    one_line(r.returncode, r.stderr, 1, r"cannot read image \S+trunc/a/3\.jpg.*\(in a data-loading worker\)")
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())  # no run folder without a checkpoint


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_a_truncated_image_in_a_worker_ends_extraction(world, capsys, tmp_path):
    code, err = run(["extract-latents", "--data-path", str(world / "trunc"), "--vae", str(world / "vae"), "--output",
                     str(tmp_path / "lat"), "--image-size", "8", "--batch-size", "2", "--num-workers", "2",
                     "--device", "cpu"], capsys)
    one_line(code, err, 1, r"cannot read image \S+trunc/a/3\.jpg.*\(in a data-loading worker\)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("env", "pattern"), [
    ({"RANK": "1"}, r"RANK=1 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "abc", "RANK": "0"}, r"environment variable WORLD_SIZE='abc' is not an integer"),
])
def test_a_stray_distributed_environment_is_named(world, capsys, tmp_path, env, pattern):
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(tmp_path / "s.png")], capsys, **env)
    one_line(code, err, 1, pattern)
    code, err = run([*TRAIN, "--results-dir", str(tmp_path / "r"), "--max-steps", "2"], capsys, **env)
    one_line(code, err, 1, pattern)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s.png").exists()


def test_stale_temporaries_of_a_killed_sample_are_swept(world, capsys, tmp_path):
    from dit_fast.utils.files import temp_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = temp_path(tmp_path / "s.npz")
    stale = live.with_name(live.name.replace(f".{os.getpid()}@", f".{int(dead.stdout)}@"))
    stale.write_bytes(b"left by a killed run")
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(tmp_path / "s.png"), "--npz",
                     str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]


# ---------------------------------------------------------------------------------------------------- disks


def test_names_longer_than_the_file_system_allows(world, capsys, tmp_path):
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(tmp_path / ("x" * 300 + ".png"))],
                    capsys)
    one_line(code, err, 1, r"longer than the 255 this file system allows")
    long_ok = tmp_path / ("y" * 250 + ".png")  # fits; its temporary's longer name is shortened
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(long_ok)], capsys)
    assert code == 0, err and long_ok.is_file()


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_extract_latents_on_a_full_disk_deterministic(world, capsys, tmp_path, monkeypatch):
    """ENOSPC injected where the latents file is reserved: one line, no temporary, no SIGBUS later."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, err = run(["extract-latents", "--data-path", str(world / "imgs"), "--vae", str(world / "vae"), "--output",
                     str(tmp_path / "lat"), "--image-size", "8", "--num-workers", "0", "--device", "cpu"], capsys)
    one_line(code, err, 1, r"No space left on device while writing \S+latents\.npy")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root and a mount namespace that allows it), else skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_checkpoint_save_on_a_full_disk(small_disk):
    """Training passes its preflight, then the disk fills up before the checkpoint: one line, no traceback."""
    proc = _spawn([*TRAIN, "--results-dir", str(small_disk / "r"), "--max-steps", "2"], small_disk.parent,
                  DIT_FAST_PAUSE_AT="write 0000002.pt")
    _wait_paused(proc, "write 0000002.pt")
    filler = small_disk / "filler"
    with open(filler, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(bytes(1 << 16))
    code, err = _finish(proc)
    one_line(code, err, 1, r"No space left on device while writing \S+0000002\.pt")
    filler.unlink()
    assert not [p for p in (small_disk / "r").rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.skipif(not _has("diffusers"), reason="diffusers is not installed (the VAE cases need it)")
def test_extract_latents_preflight_on_a_small_disk(world, capsys, small_disk):
    code, err = run(["extract-latents", "--data-path", str(world / "imgs"), "--vae", str(world / "vae"), "--output",
                     str(small_disk / "lat"), "--image-size", "256", "--num-workers", "0", "--device", "cpu"], capsys)
    one_line(code, err, 1, r"--output \S+lat \(8 images: .*\): needs about .* but only .* is free")
    assert list(small_disk.iterdir()) == []


def test_sample_grid_preflight_on_a_small_disk(world, capsys, small_disk):
    """The grid's size is part of the preflight: 64 digits at 64 px are about 768 KiB before compression."""
    (small_disk / "other").write_bytes(bytes(640 << 10))  # what else is on the disk
    code, err = run([*SAMPLE, "--ckpt", str(world / "model.pt"), "--out", str(small_disk / "s.png"), "--num-samples",
                     "64", "--grid-images", "64"], capsys)
    one_line(code, err, 1, r"--out \S+s\.png \(a grid of 64 images of 8x8\): needs about 768\.0 KiB, but only")
    assert sorted(p.name for p in small_disk.iterdir()) == ["other"]
