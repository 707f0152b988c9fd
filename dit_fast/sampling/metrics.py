"""Sample quality on the built-in digits, and the readers of samples / statistics files.

- ``evaluate_digits_model(model, out_dir)``: samples a trained digits DiT (what ``dit-fast train`` runs after
  training on the built-in digits), scores it with ``evaluate_digits`` and writes a grid and ``metrics.json``.
- ``evaluate_digits(samples, labels)``: a scikit-learn classifier (RBF SVM) trained once on real digits
  (deterministic, cached per process) scores class-conditional samples: the share classified as the class asked
  for; and the Fréchet distance between the samples and the real digits in PCA features (32 components).
- ``check_npz`` / ``load_statistics``: a samples ``.npz`` checked before reading; ``mu``/``sigma`` (or 2-D
  ``features``) of a statistics file. The Fréchet distance itself is ``dit_fast.sampling.frechet``; the ADM
  metrics (FID, sFID, IS, precision, recall) are ``dit_fast.sampling.adm_eval``; ``dit-fast evaluate`` is
  ``dit_fast.commands.evaluate``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_fast.diffusion import Transport
from dit_fast.reference import check_labels
from dit_fast.sampling.frechet import check_statistics, feature_statistics, frechet_distance_features
from dit_fast.sampling.generate import generate
from dit_fast.sampling.outputs import save_grid
from dit_fast.utils.datacheck import npz_arrays

DIGITS_FEATURES = 32
DIGITS_TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def digits_scorer() -> tuple[object, object, float, np.ndarray]:
    """(classifier, feature map, the classifier's held-out accuracy, real-digit features (1797, D)).

    The classifier is an RBF support-vector machine on 8x8 digits scaled to [0, 1] (held-out accuracy about 98%);
    the features are the real digits' first ``DIGITS_FEATURES`` principal components. Deterministic (a fixed 80/20
    split, no randomness in either fit) and computed once per process (well under a second).
    """
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    digits = load_digits()
    x = digits.data / 16.0  # (1797, 64) in [0, 1]
    perm = np.random.RandomState(0).permutation(len(x))
    n_test = int(len(x) * DIGITS_TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    clf = SVC(gamma=0.8).fit(x[train], digits.target[train])
    accuracy = float(clf.score(x[test], digits.target[test]))
    pca = PCA(n_components=DIGITS_FEATURES, svd_solver="full").fit(x)
    return clf, pca, accuracy, pca.transform(x)


def digits_pixels(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """Samples (N, 1, S, S) in [-1, 1] or (N, S, S[, 1|3]) uint8 (any S >= 8; area-downsampled to 8x8) ->
    (N, 64) in [0, 1], the classifier's input."""
    if isinstance(samples, np.ndarray) and samples.dtype == np.uint8:
        a = samples.astype(np.float64) / 255.0
        if a.ndim == 4:
            a = a.mean(axis=-1)  # RGB copies (or one channel) -> gray
        x = torch.from_numpy(a)[:, None] * 2 - 1  # (N, 1, H, W) in [-1, 1]
    else:
        x = torch.as_tensor(samples).double()
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] < 8:
        raise ValueError(f"digit samples must be (N, 1, S, S) with S >= 8, or (N, S, S, C) uint8; got "
                         f"{tuple(samples.shape)}")
    if x.shape[2] != 8:
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
    return ((x.clamp(-1, 1) + 1) / 2).reshape(len(x), 64).numpy()


def evaluate_digits(samples: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Score class-conditional digit samples: samples as ``digits_pixels`` accepts, labels (N,) the classes asked.

    Returns "accuracy" (share classified as the class asked for), "frechet" (Fréchet distance to all real digits
    in the 32 principal-component features), "classifier_accuracy" (the classifier's held-out accuracy on real
    digits: the ceiling) and "real_frechet" (as many real digits as samples vs all: the floor at that size).
    """
    clf, pca, clf_acc, real = digits_scorer()
    x = digits_pixels(samples)
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} samples but {len(y)} labels")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class ids, got {y.dtype}")
    check_labels(torch.from_numpy(y.astype(np.int64)), len(clf.classes_), what="labels")
    accuracy = float((clf.predict(x) == y).mean())
    frechet = frechet_distance_features(pca.transform(x), real)
    subset = np.random.RandomState(0).permutation(len(real))[: max(2, min(len(x), len(real)))]
    real_frechet = frechet_distance_features(real[subset], real)
    return {"accuracy": accuracy, "frechet": frechet, "classifier_accuracy": clf_acc, "real_frechet": real_frechet}


def evaluate_digits_model(model: torch.nn.Module, out_dir: str | Path, *, num_samples: int = 1000,
                          cfg_scale: float = 2.0, sampler: str = "ddpm", num_steps: int = 100, seed: int = 0,
                          device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                          transport: Transport | None = None) -> dict[str, Any]:
    """Sample a digits DiT (pixel space, 10 classes) for every class in turn, unguided and with guidance
    ``cfg_scale``, and score both (``evaluate_digits``); a flow model passes its ``transport`` and a flow sampler.
    Writes the guided samples' grid (a row per digit) to ``out_dir/samples.png`` and the scores to
    ``out_dir/metrics.json``; returns the scores ("unguided_accuracy", "guided_frechet", ...) and "grid" (the PNG
    path)."""
    labels = torch.arange(num_samples) % model.config.num_classes
    results: dict[str, Any] = {}
    grid = None
    for name, scale in (("unguided", 1.0), ("guided", cfg_scale)):
        t0 = time.perf_counter()
        samples = generate(model, labels, sampler=sampler, num_steps=num_steps, cfg_scale=scale,
                           guide_channels="all", seed=seed, batch_size=num_samples, device=device,
                           clip_denoised=True, progress=False, transport=transport)
        scores = evaluate_digits(samples, labels)
        log(f"{name} (cfg {scale}, {sampler}-{num_steps}, {num_samples} samples): class accuracy "
            f"{100 * scores['accuracy']:.1f}%, Frechet distance {scores['frechet']:.3f} "
            f"({time.perf_counter() - t0:.1f} s)")
        results.update({f"{name}_{k}": v for k, v in scores.items()})
        if scale != 1.0 or grid is None:
            grid = samples
    grid_path = Path(out_dir) / "samples.png"
    save_grid(grid[:100][torch.argsort(labels[:100], stable=True)], grid_path, nrow=10)  # a row per class
    results["grid"] = str(grid_path)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(results, indent=1))
    log(f"sample grid (guided, a row per digit) written to {grid_path}")
    return results


# ---------------------------------------------------------------------------------------------------- CLI

# First bytes of files people pass by mistake -> what they are.
_NOT_NPZ = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x93NUMPY": "a single-array .npy file",
            b"\x80": "a pickle (a PyTorch checkpoint?)"}


def check_npz(path: str) -> Path:
    """``path`` as a Path if it is an existing ``.npz`` (zip) file; FileNotFoundError / ValueError otherwise,
    saying what the file is instead."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path!r} does not exist" if not p.exists() else f"{path!r} is not a file")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] != b"PK\x03\x04":
        what = next((kind for magic, kind in _NOT_NPZ.items() if head.startswith(magic)), "not a zip archive")
        raise ValueError(f"{path} is not an .npz file (it is {what}); give the .npz written by `dit-fast sample "
                         "--npz`")
    return p


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an ``.npz`` holding ``mu`` and ``sigma`` (ADM reference batches) or ``features`` (N, D),
    checked (``check_statistics``: finite, a covariance), so that a distance is never NaN or negative."""
    with np.load(check_npz(path)) as f:
        names = ["mu", "sigma"] if "mu" in f.files and "sigma" in f.files else ["features"]
        if names == ["features"] and "features" not in f.files:
            raise ValueError(f"{path!r} has neither 'mu' and 'sigma' nor 'features' (it has {sorted(f.files)})")
    arrays = npz_arrays(path, names)
    if names == ["features"]:
        features = arrays["features"]
        if not np.isfinite(features).all():
            raise ValueError(f"{path}: features hold NaN or inf")
        return feature_statistics(features)
    return check_statistics(arrays["mu"], arrays["sigma"], path)




