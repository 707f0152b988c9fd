"""The paths `dit-fast sample` runs: guidance through forward_with_cfg, --cache, --cuda-graph (selection and errors
on the CPU; replay against eager on CUDA)."""

from __future__ import annotations

import re

import pytest
import torch

from dit_fast.checkpoints import save_checkpoint
from dit_fast.cli import main as cli_main
from dit_fast.models.cuda_graph import CUDAGraphRunner
from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from dit_fast.sampling.generate import generate, sample_batch, sampling_network
from tests.helpers import max_rel_err, tiny_dit

CUDA = torch.cuda.is_available()


def _tiny() -> DiTFast:
    ref = tiny_dit(depth=2, scale=0.05)
    fast = DiTFast.from_config(ref.config)
    fast.load_state_dict(ref.state_dict())
    return fast.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(_tiny(), path)
    return path


def test_guided_sampling_matches_the_plain_two_pass_guidance():
    """Sampling through forward_with_cfg (shared embedding) gives the samples of guiding a plain forward."""
    model = _tiny()
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 7])
    kw = {"sampler": "ddim", "num_steps": 5, "cfg_scale": 3.0, "null_class": 10, "guide_channels": "all",
          "interval": (100, 800)}
    with torch.no_grad():
        fast_path = sample_batch(model, noise, labels, **kw)
        plain = sample_batch(lambda x, t, y: model(x, t, y), noise, labels, **kw)  # no forward_with_cfg
    assert max_rel_err(fast_path, plain) < 1e-5


class _CPUCapture:
    """Stands in for DiTFast.cuda_graph on the CPU: records each capture, 'replays' by running the captured call."""

    def __init__(self, model: DiTFast) -> None:
        self.model = model
        self.captures: list[tuple] = []
        self.replays = 0

    def __call__(self, x, t, y, cfg_scale=None, warmup=2, guide_channels=3, interval=None):
        self.captures.append((tuple(x.shape), cfg_scale, guide_channels, interval))

        def run(x2, t2, y2):
            self.replays += 1
            if cfg_scale is None:
                return DiTFast.forward(self.model, x2, t2, y2)
            return DiTFast.forward_with_cfg(self.model, x2, t2, y2, cfg_scale, guide_channels, interval)

        return run


def test_cuda_graph_runner_captures_once_per_shape_and_replays(monkeypatch):
    model = _tiny()
    capture = _CPUCapture(model)
    monkeypatch.setattr(model, "cuda_graph", capture)
    runner = CUDAGraphRunner(model)
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 7])
    kw = {"sampler": "ddim", "num_steps": 6, "null_class": 10, "guide_channels": "all"}
    with torch.no_grad():
        graphed = sample_batch(runner, noise, labels, cfg_scale=2.0, **kw)
        eager = sample_batch(model, noise, labels, cfg_scale=2.0, **kw)
        sample_batch(runner, noise, labels, cfg_scale=1.0, **kw)  # unguided: the plain forward's graph
        sample_batch(runner, noise[:2], labels[:2], cfg_scale=2.0, **kw)  # a new batch shape
    assert torch.equal(graphed, eager)
    assert capture.captures == [((6, 1, 8, 8), 2.0, "all", None), ((3, 1, 8, 8), None, 3, None),
                                ((4, 1, 8, 8), 2.0, "all", None)]
    assert capture.replays == 3 * 6  # three graphed runs of 6 steps
    with pytest.raises(TypeError, match="DiTFast"):
        CUDAGraphRunner(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2))


def test_generate_selects_the_graph_path_and_guards_it():
    model = _tiny()
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, torch.tensor([1]), cuda_graph=True, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        generate(model, torch.tensor([1]), cuda_graph=True, cache="fora:2", device="cuda", num_steps=2,
                 progress=False)
    runner = sampling_network(model, torch.device("cuda"), cuda_graph=True)
    assert isinstance(runner, CUDAGraphRunner) and runner.model is model
    assert sampling_network(model, torch.device("cpu")) is model
    with pytest.raises(TypeError, match="DiTFast"):
        sampling_network(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2),
                         torch.device("cuda"), cuda_graph=True)


@pytest.mark.parametrize(("extra", "message"), [
    (["--cache", "fora:0"], "argument --cache: cache period must be an integer >= 1"),
    (["--cache", "lru"], "argument --cache: unknown cache policy"),
    (["--cache", "auto", "--compile"], "drop --compile"),
    (["--cache", "fora:2", "--cuda-graph"], "drop --cuda-graph"),
    (["--cuda-graph", "--impl", "reference"], "needs the DiTFast"),
    (["--cuda-graph", "--device", "cpu"], "needs a CUDA device"),
])
def test_sample_cli_cache_and_graph_errors(ckpt, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), "--no-progress", *extra])
    assert re.search(message, str(e.value) + capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_sample_cli_with_cache(ckpt, tmp_path, capsys):
    common = ["sample", "--ckpt", str(ckpt), "--num-samples", "3", "--sampler", "ddim", "--num-sampling-steps", "8",
              "--cfg-scale", "2", "--no-progress", "--device", "cpu", "--seed", "2"]
    assert cli_main([*common, "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]) == 0
    assert cli_main([*common, "--cache", "none", "--out", str(tmp_path / "b.png"), "--npz",
                     str(tmp_path / "b.npz")]) == 0
    assert cli_main([*common, "--cache", "fora:2", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "cache fora:2: 4 full network evaluations, 4 cached" in out
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()  # off: bit-identical


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_sampling_matches_eager():
    model = _tiny().cuda()
    labels = torch.tensor([1, 2, 3, 4, 5])
    kw = {"sampler": "dpm++", "num_steps": 6, "cfg_scale": 2.0, "guide_channels": "all", "seed": 1,
          "batch_size": 3, "device": "cuda", "progress": False}
    eager = generate(model, labels, **kw)
    graphed = generate(model, labels, cuda_graph=True, **kw)
    assert max_rel_err(graphed, eager) < 1e-4
    fresh = _tiny().cuda()
    x, t, y = torch.randn(4, 1, 8, 8, device="cuda"), torch.full((4,), 500, device="cuda"), torch.arange(4).cuda()
    fresh.cuda_graph(x, t, y, cfg_scale=2.0)
    assert not fresh._stack_cache  # the warm-up ran the captured (per-block modulation) path

