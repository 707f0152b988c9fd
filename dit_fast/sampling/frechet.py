"""Gaussian statistics of feature sets and the Fréchet distance between them: the math of FID (numpy only).

- ``feature_statistics(features)``: mean and covariance (N - 1), float64, as numpy and the ADM evaluator;
- ``frechet_distance(mu1, sigma1, mu2, sigma2)``: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64, the
  matrix square root's trace from symmetric eigen-decompositions (no scipy needed);
- ``frechet_distance_features(f1, f2)``: the distance between two feature sets;
- ``check_statistics(mu, sigma, source)``: statistics read from a file are finite, of matching shapes, and
  ``sigma`` is a covariance (symmetric, no eigenvalue below round-off), so a distance is never NaN or negative.

Used by the digits scorer (``dit_fast.sampling.metrics``) and the ADM metrics (``dit_fast.sampling.adm_eval``).
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (mean (D,), covariance (D, D)), float64, covariance with N - 1 (as numpy/ADM)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): means (D,), covariances (D, D).

    ``tr((S1 S2)^(1/2))`` equals ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``; the latter is symmetric PSD, so both
    roots come from eigen-decompositions in float64, stable even for singular covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    a = _sqrt_psd(s1)
    w = np.linalg.eigvalsh(a @ s2 @ a)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return 0.0 if distance < 0 else distance  # negative only by round-off for PSD inputs; NaN stays NaN


def check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` as float64, or ValueError naming ``source`` (a file) when they hold NaN/inf, have
    mismatched shapes, or ``sigma`` is not a covariance matrix (asymmetric, or an eigenvalue below -1e-6 of the
    largest)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            raise ValueError(f"{source}: {name} holds NaN or inf ({int((~np.isfinite(a)).sum())} of {a.size} values)")
    d = mu.reshape(-1).shape[0]
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{source}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    scale = max(float(np.abs(sigma).max(initial=0.0)), 1e-300)
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * scale:
        raise ValueError(f"{source}: sigma is not a covariance matrix (not symmetric)")
    lowest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min(initial=0.0))
    if lowest < -1e-6 * scale:
        raise ValueError(f"{source}: sigma is not a covariance matrix (eigenvalue {lowest:.3g} < 0)")
    return mu, sigma


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
