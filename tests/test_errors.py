"""Bad input and faults, run the way a user runs them (``python -m dit_fast.cli ...`` in a subprocess): every case
exits non-zero with one clear line on stderr and no traceback, before any work is done; Ctrl-C and SIGTERM during
training save a checkpoint at the step reached and exit 130 / 143.

The independent command-line cases start together in a thread pool (a subprocess each, tiny models, two sampling
steps) so the file stays fast on two cores; each case is still its own test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast.checkpoints import save_checkpoint
from dit_fast.cli import main as cli_main
from dit_fast.commands.arguments import float_arg, int_arg
from dit_fast.reference import DiT
from dit_fast.utils.validation import (
    UserError,
    check_free_space,
    check_output_dir,
    check_output_file,
)
from tests.helpers import tiny_dit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "dit_fast.cli"]
TRAIN = ["train", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--impl", "reference", "--no-eval",
         "--no-progress", "--threads", "1"]


class _Evil:
    """Pickles as a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cases(d: Path) -> dict[str, list[str]]:
    tiny, nan, out = str(d / "tiny"), str(d / "nan"), str(d / "out")
    sample = ["sample", "--ckpt", tiny, "--num-samples", "2", "--num-sampling-steps", "2", "--no-progress",
              "--device", "cpu"]
    return {
        # sample: output paths checked before the model is loaded
        "npz_under_a_file": [*sample, "--out", f"{out}/npz_file.png", "--npz", str(d / "a_file" / "x.npz")],
        "npz_in_proc": [*sample, "--out", f"{out}/npz_proc.png", "--npz", "/proc/dit-fast-x.npz"],
        "out_is_a_folder": [*sample, "--out", str(d / "a_folder")],
        # sample: numbers and non-finite values
        "cfg_scale_nan": [*sample, "--out", f"{out}/nan.png", "--cfg-scale", "nan"],
        "cfg_scale_inf": [*sample, "--out", f"{out}/inf.png", "--cfg-scale", "inf"],
        "sample_threads": [*sample, "--out", f"{out}/t.png", "--threads", "-1"],
        "nan_weights": [*sample[:2], nan, *sample[3:], "--out", f"{out}/nanw.png"],
        "inf_outputs": [*sample[:2], str(d / "overflow"), *sample[3:], "--out", f"{out}/overflow.png"],
        "malicious_pickle": [*sample[:2], str(d / "evil.pt"), *sample[3:], "--out", f"{out}/evil.png"],
        "class_label_out_of_range": [*sample, "--out", f"{out}/l.png", "--class-labels", "3", "10"],
        # train: numbers, output folder, nothing created for a failed run
        "max_steps_negative": [*TRAIN, "--results-dir", str(d / "r_steps"), "--max-steps", "-5"],
        "batch_negative": [*TRAIN, "--results-dir", str(d / "r_batch"), "--global-batch-size", "-4"],
        "batch_zero": [*TRAIN, "--results-dir", str(d / "r_batch0"), "--global-batch-size", "0"],
        "ckpt_every_zero": [*TRAIN, "--results-dir", str(d / "r_ckpt"), "--ckpt-every", "0", "--max-steps", "2"],
        "train_threads_zero": [*TRAIN, "--results-dir", str(d / "r_threads"), "--threads", "0"],
        "lr_nan": [*TRAIN, "--results-dir", str(d / "r_lr"), "--lr", "nan"],
        "results_under_a_file": [*TRAIN, "--results-dir", str(d / "a_file" / "results"), "--max-steps", "1"],
        "results_in_proc": [*TRAIN, "--results-dir", "/proc/dit-fast-results", "--max-steps", "1"],
        "batch_larger_than_data": [*TRAIN, "--results-dir", str(d / "r_big"), "--global-batch-size", "4000"],
        "loss_diverges": [*TRAIN, "--results-dir", str(d / "diverged"), "--lr", "1e30", "--max-steps", "6",
                          "--global-batch-size", "8", "--ckpt-every", "3", "--log-every", "100"],
        # convert: output checked before reading the source
        "convert_under_a_file": ["convert", tiny, str(d / "a_file" / "converted"), "--to", "dit-fast"],
        "convert_in_proc": ["convert", tiny, "/proc/dit-fast-converted.pt", "--to", "official"],
        "convert_onto_a_folder": ["convert", tiny, str(d / "a_folder"), "--to", "official", "--overwrite"],
        # evaluate
        "evaluate_a_png": ["evaluate", str(d / "grid.png")],
        "evaluate_bad_labels": ["evaluate", str(d / "bad_labels.npz")],
        # --debug shows the traceback of the same error
        "debug_traceback": ["--debug", *sample[:2], nan, *sample[3:], "--out", f"{out}/debug.png"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("errors")
    model = tiny_dit()
    save_checkpoint(model, d / "tiny")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    save_checkpoint(model, d / "nan")
    model = tiny_dit()
    with torch.no_grad():  # finite weights whose output overflows to inf at the first step
        model.final_layer.linear.weight.fill_(1e38)
    save_checkpoint(model, d / "overflow")
    torch.save({"ema": _Evil(d / "pwned")}, d / "evil.pt")
    (d / "a_file").write_text("not a folder")
    (d / "a_folder").mkdir()
    (d / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    np.savez(d / "bad_labels.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 12, -1]))
    cases = _cases(d)

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *argv], env=ENV, capture_output=True, text=True, timeout=300, cwd=d)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(run, cases.values()), strict=True))
    for r in results.values():
        r.folder = d
    return results


def _one_line(r: subprocess.CompletedProcess, code: int, pattern: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == code, f"exit status {r.returncode}, expected {code}\nstderr:\n{r.stderr}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"expected one line on stderr, got:\n{err}"
    assert re.search(pattern, err), f"{pattern!r} not in {err!r}"
    return err


USAGE = 2  # argparse's exit status for a bad option value
CASES = {
    "npz_under_a_file": (1, r"^dit-fast sample: --npz \S+a_file/x\.npz: \S+a_file is a file, not a folder$"),
    "npz_in_proc": (1, r"^dit-fast sample: --npz /proc/dit-fast-x\.npz: cannot write in /proc \("),
    "out_is_a_folder": (1, r"^dit-fast sample: --out \S+a_folder is a folder; give a file path, e\.g\. "),
    "cfg_scale_nan": (USAGE, r"^dit-fast sample: argument --cfg-scale: must be a finite number >= 1(\.0)?, got 'nan'"),
    "cfg_scale_inf": (USAGE, r"^dit-fast sample: argument --cfg-scale: must be a finite number >= 1(\.0)?, got 'inf'"),
    "sample_threads": (USAGE, r"^dit-fast sample: argument --threads: must be an integer >= 1, got '-1'"),
    "nan_weights": (1, r"^dit-fast sample: \S+nan holds non-finite weights: blocks\.0\.attn\.qkv\.weight "
                       r"\(1 NaN, 0 inf\)"),
    "inf_outputs": (1, r"^dit-fast sample: samples 0\.\.1 hold NaN or inf: the model's output first did at sampling "
                       r"step 1 of 2 \(timestep \d+\)"),
    "malicious_pickle": (1, r"^dit-fast sample: \S+evil\.pt holds code objects \(posix\.system\) that dit-fast will "
                            r"not load"),
    "class_label_out_of_range": (1, r"^dit-fast sample: class ids must be in \[0, 9\]; class ids \[10\] are out of "
                                    r"range"),
    "max_steps_negative": (USAGE, r"^dit-fast train: argument --max-steps: must be an integer >= 1, got '-5'"),
    "batch_negative": (USAGE, r"^dit-fast train: argument --global-batch-size: must be an integer >= 1, got '-4'"),
    "batch_zero": (USAGE, r"^dit-fast train: argument --global-batch-size: must be an integer >= 1, got '0'"),
    "ckpt_every_zero": (USAGE, r"^dit-fast train: argument --ckpt-every: must be an integer >= 1, got '0'"),
    "train_threads_zero": (USAGE, r"^dit-fast train: argument --threads: must be an integer >= 1, got '0'"),
    "lr_nan": (USAGE, r"^dit-fast train: argument --lr: must be a finite number > 0(\.0)?, got 'nan'"),
    "results_under_a_file": (1, r"^dit-fast train: --results-dir \S+a_file/results: \S+a_file is a file, not a "
                                r"folder$"),
    "results_in_proc": (1, r"^dit-fast train: --results-dir /proc/dit-fast-results: cannot write in /proc \("),
    "batch_larger_than_data": (1, r"^dit-fast train: the dataset has 1797 samples, fewer than one global batch"),
    "loss_diverges": (1, r"^dit-fast train: training diverged: the loss became non-finite at step \d+ \(loss nan, "
                         r"lr .*\); stopped without saving the diverged weights"),
    "convert_under_a_file": (1, r"^dit-fast convert: DST \S+a_file/converted: \S+a_file is a file, not a folder$"),
    "convert_in_proc": (1, r"^dit-fast convert: DST /proc/dit-fast-converted\.pt: cannot write in /proc \("),
    "convert_onto_a_folder": (1, r"^dit-fast convert: DST \S+a_folder is a folder; give a file path"),
    "evaluate_a_png": (1, r"^dit-fast evaluate: \S*grid\.png is not an \.npz file \(it is a PNG image\)"),
    "evaluate_bad_labels": (1, r"^dit-fast evaluate: labels must be in \[0, 9\]; labels \[-1, 12\] are out of "
                               r"range"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_line(runs, case):
    code, pattern = CASES[case]
    _one_line(runs[case], code, pattern)
    d = runs[case].folder
    assert not (d / "pwned").exists()  # the malicious pickle never ran
    assert not (d / "out").exists()  # nothing was sampled or written: every check came first
    assert not list(d.glob("r_*/*")) and not list(d.glob("a_file*/*"))  # no experiment folder for a failed run
    if case == "loss_diverges":  # no checkpoint of diverged weights
        assert not list(d.glob("diverged/*/checkpoints/*.pt"))
    if case in ("npz_under_a_file", "npz_in_proc", "out_is_a_folder", "cfg_scale_nan", "nan_weights"):
        assert "sampling" not in runs[case].stdout  # failed before sampling started


def test_malicious_pickle_message_has_no_torch_hint(runs):
    err = runs["malicious_pickle"].stderr
    assert "weights_only=False" not in err and "truncated" not in err and "corrupt" not in err


def test_debug_shows_the_traceback(runs):
    r = runs["debug_traceback"]
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "non-finite weights" in r.stderr


def test_kernels_triton_on_cpu_says_once_that_it_runs_the_pytorch_twins():
    code = ("import torch, warnings; from dit_fast import DiTFast\n"
            "m = DiTFast(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, "
            "num_classes=10, kernels='triton')\n"
            "x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])\n"
            "m(x, t, y); m(x, t, y); m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 2.0)")
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("PyTorch twins") == 1, r.stderr
    assert "TRITON_INTERPRET=1" in r.stderr


@pytest.mark.parametrize("cls", ["reference", "fast"])
def test_patch_size_zero_is_a_clear_value_error(cls):
    from dit_fast import DiTFast

    model_cls = DiT if cls == "reference" else DiTFast
    with pytest.raises(ValueError, match="patch_size=0 must be >= 1"):
        model_cls(input_size=8, patch_size=0, in_channels=1, hidden_size=32, depth=1, num_heads=2)


def _signal_training(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    results = tmp_path / "results"
    proc = subprocess.Popen([*CLI, *TRAIN, "--results-dir", str(results), "--max-steps", "100000",
                             "--global-batch-size", "8", "--log-every", "1", "--ckpt-every", "100000"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    lines = []
    for line in proc.stdout:  # wait until training runs (a few steps logged)
        lines.append(line)
        if "(step=0000003)" in line or time.time() > deadline:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, err), results


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_saves_a_checkpoint(tmp_path, sig, code):
    from dit_fast.training.state import list_checkpoints, load_train_checkpoint

    r, results = _signal_training(tmp_path, sig)
    name = signal.Signals(sig).name
    err = _one_line(r, code, rf"^dit-fast train: interrupted by {name} at step (\d+); saved checkpoint "
                             r"(\S+\.pt) \(continue with --resume ")
    step = int(re.search(r"at step (\d+)", err).group(1))
    (exp,) = results.iterdir()
    (ckpt,) = list_checkpoints(exp / "checkpoints")
    assert ckpt.name == f"{step:07d}.pt" and str(ckpt) in err
    assert load_train_checkpoint(ckpt)["step"] == step >= 3
    assert not list((exp / "checkpoints").glob(".*"))  # no temp file left


def test_keyboard_interrupt_outside_training_is_one_line(monkeypatch, capsys):
    import dit_fast.commands.evaluate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dit_fast.commands.evaluate, "main", interrupted)
    assert cli_main(["evaluate", "x.npz"]) == 130
    assert capsys.readouterr().err.strip() == "dit-fast evaluate: interrupted"


def test_real_bugs_keep_their_traceback(monkeypatch):
    import dit_fast.commands.evaluate

    def buggy(args):
        return 1 / 0

    monkeypatch.setattr(dit_fast.commands.evaluate, "main", buggy)
    with pytest.raises(ZeroDivisionError):
        cli_main(["evaluate", "x.npz"])


def test_argument_types():
    assert int_arg(1)("3") == 3 and float_arg(0.0, exclusive_min=True)("1e-4") == 1e-4
    for parse, text in ((int_arg(1), "0"), (int_arg(0, 9), "10"), (int_arg(1), "2.5"), (float_arg(1.0), "nan"),
                        (float_arg(1.0), "-inf"), (float_arg(0.0, 1.0), "1.5"), (float_arg(0.0, exclusive_min=True),
                                                                                 "0")):
        with pytest.raises(Exception, match="must be"):
            parse(text)


def test_output_checks_create_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "x.npz"
    assert check_output_file(target, "--npz") == target
    check_output_dir(tmp_path / "new" / "results", "--results-dir")
    assert list(tmp_path.iterdir()) == []  # the checks probe, they create nothing
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        check_output_file(tmp_path / "f", "DST", overwrite=False)
    with pytest.raises(UserError, match="exists already"):
        check_output_dir(tmp_path, "--output", must_not_exist=True)
    with pytest.raises(UserError, match="needs about .* but only .* is free"):
        check_free_space(tmp_path, 1 << 62, "--npz x.npz")


def test_guidance_scale_must_be_finite():
    from dit_fast.diffusion import CFGModel

    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
            CFGModel(lambda x, t, y: x, scale, null_class=10)
