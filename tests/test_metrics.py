"""Fréchet distance (against an independent scipy computation) and the digits scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dit_fast.cli import main as cli_main
from dit_fast.sampling.frechet import feature_statistics, frechet_distance, frechet_distance_features
from dit_fast.sampling.metrics import evaluate_digits
from dit_fast.training.data import DigitsDataset


def _scipy_frechet(mu1, s1, mu2, s2):
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize(("d", "n"), [(1, 50), (8, 200), (64, 40)])  # the last: singular covariances (n < d)
def test_frechet_matches_scipy(d, n):
    rng = np.random.RandomState(d)
    a = rng.randn(n, d) @ rng.randn(d, d)
    b = rng.randn(n, d) * 0.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    assert frechet_distance_features(a, b) == ours
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7 * np.trace(s1))


def test_frechet_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


def test_digits_scorer_real_vs_noise():
    ds = DigitsDataset()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:300]
    real = evaluate_digits(ds.images[idx], ds.labels[idx])
    assert real["accuracy"] > 0.97 and real["classifier_accuracy"] > 0.97
    assert real["frechet"] < 0.2 and real["frechet"] == pytest.approx(real["real_frechet"], rel=1.0)
    noise = evaluate_digits(torch.rand(300, 1, 8, 8) * 2 - 1, ds.labels[idx])
    assert noise["accuracy"] < 0.3 and noise["frechet"] > 10 * real["frechet"]
    up = evaluate_digits(DigitsDataset(16).images[idx], ds.labels[idx])  # 16x16 samples are area-downsampled
    assert up["accuracy"] > 0.95
    with pytest.raises(ValueError, match="labels"):
        evaluate_digits(ds.images[:5], ds.labels[:4])


def test_evaluate_cli(tmp_path, capsys):
    ds = DigitsDataset()
    images = np.round((ds.images[:200, 0].numpy() + 1) * 127.5).astype(np.uint8)[..., None].repeat(3, -1)
    np.savez(tmp_path / "s.npz", arr_0=images, labels=ds.labels[:200].numpy())
    assert cli_main(["evaluate", str(tmp_path / "s.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.97
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "a.npz", features=rng.randn(50, 4))
    np.savez(tmp_path / "b.npz", mu=np.zeros(4), sigma=np.eye(4))
    assert cli_main(["evaluate", "--frechet", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    assert "frechet:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["evaluate", str(tmp_path / "missing.npz")])
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 32, 32, 3), np.float32), labels=np.zeros(2))
    with pytest.raises(SystemExit, match="uint8"):
        cli_main(["evaluate", str(tmp_path / "bad.npz")])
    with pytest.raises(SystemExit, match="give a samples .npz, or --frechet"):
        cli_main(["evaluate"])
    np.savez(tmp_path / "c.npz", other=np.zeros(2))
    with pytest.raises(SystemExit, match="neither 'mu' and 'sigma' nor 'features'"):
        cli_main(["evaluate", "--frechet", str(tmp_path / "a.npz"), str(tmp_path / "c.npz")])
