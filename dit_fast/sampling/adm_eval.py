"""FID, sFID, Inception Score, precision and recall as the ADM evaluator defines them, without TensorFlow.

The DiT paper reports the metrics of the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``, TF1 on
the 2015-12-05 InceptionV3 graph); this module computes the same definitions in PyTorch:

- features of each image (``arr_0``: (N, H, W, 3) uint8, resized inside the network to 299x299 by TF1's bilinear
  rule): ``pool_3`` (N, 2048), the first 7 channels of ``mixed_6/conv`` in NHWC order (N, 2023), and the 1008-way
  logits of the softmax layer without its bias;
- FID / sFID: Fréchet distances of ``pool_3`` / spatial statistics against the reference's ``mu``, ``sigma`` /
  ``mu_s``, ``sigma_s``; Inception Score over splits of 5000; precision / recall with k = 3 manifolds.

The network is torch-fidelity's InceptionV3 (``pip install 'dit-fast[eval]'``, or ``--no-deps``: only torch is
needed), a PyTorch port of exactly that TF graph. Its weights are never downloaded: ``--inception-weights PATH`` or
torch-fidelity's cache (``$TORCH_HOME/hub/checkpoints/``), checked against the SHA-256 prefix in the file name.
Reference batches are ADM's ``.npz`` files, streamed in batches, never loaded whole. docs/evaluation.md has the
definitions in full and why this network; ``dit-fast evaluate`` is ``dit_fast.commands.evaluate``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dit_fast.sampling.frechet import feature_statistics, frechet_distance
from dit_fast.utils.datacheck import NpzArrayReader, open_npz_array

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008  # the softmax layer of the 2015-12-05 graph
IS_SPLIT = 5000
PR_NEIGHBOURS = 3
BATCH_SIZE = 64
DISTANCE_BLOCK = 4096  # rows/columns per pairwise-distance block (64 MB in fp32)

INSTALL_HINT = ("the ADM metrics need torch-fidelity's InceptionV3: pip install 'dit-fast[eval]' (or, to keep the "
                "installed torch untouched, pip install --no-deps torch-fidelity)")


# ---------------------------------------------------------------------------------------------------- npz reading

def check_images(reader: NpzArrayReader, path: str | Path) -> None:
    """``arr_0`` must be (N, H, W, 3) uint8 images with N >= 2."""
    s = reader.shape
    if reader.dtype != np.uint8 or len(s) != 4 or s[3] != 3 or s[0] < 2:
        raise ValueError(f"{str(path)!r}: arr_0 must be RGB images (N >= 2, H, W, 3) uint8 as ADM's batches and "
                         f"`dit-fast sample --npz` write them, got shape {s}, dtype {reader.dtype}")


@dataclass
class Statistics:
    """Gaussian statistics of one feature set: ``mu`` (D,), ``sigma`` (D, D), float64."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> Statistics:
        return cls(*feature_statistics(features))

    def frechet_distance(self, other: Statistics) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def read_stored_statistics(path: str | Path) -> tuple[Statistics, Statistics] | None:
    """The (pool, spatial) statistics an ADM batch stores (``mu``, ``sigma``, ``mu_s``, ``sigma_s``), or None.

    A file with some but not all four arrays, or with shapes other than (2048,), (2048, 2048), (2023,),
    (2023, 2023), is an error.
    """
    keys = ("mu", "sigma", "mu_s", "sigma_s")
    with np.load(path) as f:
        present = [k for k in keys if k in f.files]
        if not present:
            return None
        if len(present) != len(keys):
            raise ValueError(f"{str(path)!r} stores {present} but not {[k for k in keys if k not in present]}: ADM "
                             "batches store all of mu, sigma, mu_s, sigma_s")
        arrays = {k: np.asarray(f[k], dtype=np.float64) for k in keys}
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
                "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    wrong = [f"{k} {arrays[k].shape} (expected {v})" for k, v in expected.items() if arrays[k].shape != v]
    if wrong:
        raise ValueError(f"{str(path)!r}: statistics of the wrong shape: {', '.join(wrong)}")
    return Statistics(arrays["mu"], arrays["sigma"]), Statistics(arrays["mu_s"], arrays["sigma_s"])


# ---------------------------------------------------------------------------------------------------- metrics

def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """Inception Score of logits (N, C): softmax, then ``exp(mean_x KL(p(y|x) || p(y)))`` per consecutive split of
    ``split_size`` rows (the last may be shorter), averaged over splits (ADM returns the mean only)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits must be (N >= 1, C), got shape {logits.shape}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]  # (n, C)
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))  # (1, C)
        kl = (p * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back (what one float16 op's result holds; overflow gives inf)."""
    return x.half().float()


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (U, D) x (V, D) -> (U, V), as ADM's distance block computes them: in float16,
    ``max(|u|^2 - 2 u.v + |v|^2, 0)`` with every op's result rounded to float16 (the norms and the matmul
    accumulated in float32, as GPU float16 kernels do); recomputed in float32 where float16 overflows."""
    u16, v16 = _fp16(u), _fp16(v)
    norm_u = _fp16(_fp16(u16 * u16).sum(1))[:, None]  # (U, 1)
    norm_v = _fp16(_fp16(v16 * v16).sum(1))[None]  # (1, V)
    d = _fp16(_fp16(norm_u - _fp16(2 * _fp16(u16 @ v16.T))) + norm_v).clamp_min(0)
    if bool(torch.isfinite(d).all()):
        return d
    u, v = u.float(), v.float()
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, block: int = DISTANCE_BLOCK) -> torch.Tensor:
    """features (N, D) -> (N,): each feature's squared distance to its k-th nearest neighbour in the set (the
    feature itself, at distance 0, is neighbour 0)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} neighbours needs more than {k} features, got {n}")
    radii = torch.empty(n)
    for r in range(0, n, block):
        rows = features[r:r + block]
        best = torch.full((len(rows), 0), float("inf"), device=features.device)
        for c in range(0, n, block):
            d = pairwise_sq_distances(rows, features[c:c + block])
            best = torch.cat([best, d], dim=1).topk(min(k + 1, best.shape[1] + d.shape[1]), dim=1,
                                                    largest=False).values
        radii[r:r + block] = best[:, k].cpu()
    return radii


def precision_recall(ref: torch.Tensor, samples: torch.Tensor, k: int = PR_NEIGHBOURS,
                     block: int = DISTANCE_BLOCK) -> tuple[float, float]:
    """Improved precision and recall of ``samples`` (M, D) against ``ref`` (N, D) features, k-NN manifolds.

    precision: share of samples within ``radius_ref[i]`` of some reference feature i; recall: share of reference
    features within ``radius_sample[j]`` of some sample j (squared distances, as ``pairwise_sq_distances``).
    """
    ref_radii = manifold_radii(ref, k, block).to(ref.device)
    sample_radii = manifold_radii(samples, k, block).to(ref.device)
    sample_in = torch.zeros(len(samples), dtype=torch.bool, device=ref.device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    for r in range(0, len(ref), block):
        for c in range(0, len(samples), block):
            d = pairwise_sq_distances(ref[r:r + block], samples[c:c + block])  # (refs, samples)
            sample_in[c:c + block] |= (d <= ref_radii[r:r + block, None]).any(dim=0)
            ref_in[r:r + block] |= (d <= sample_radii[None, c:c + block]).any(dim=1)
    return sample_in.float().mean().item(), ref_in.float().mean().item()


# ---------------------------------------------------------------------------------------------------- network

def inception_weights_path(path: str | Path | None = None) -> Path:
    """The InceptionV3 weights file: ``path`` if given, else torch-fidelity's cache; a clear error when missing."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    where = (f"download {INCEPTION_URL} (91 MB) and put it at {cached} (torch-fidelity's cache, under $TORCH_HOME), "
             "or pass its path with --inception-weights PATH")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"InceptionV3 weights {str(p)!r} do not exist; {where}")
        return p
    if not cached.is_file():
        raise FileNotFoundError(f"the ADM metrics need torch-fidelity's InceptionV3 weights, not found (dit-fast "
                                f"downloads nothing); {where}")
    return cached


def read_inception_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The checked state dict: its SHA-256 must start with ``INCEPTION_SHA256_PREFIX`` (torch hub's file naming)."""
    p = inception_weights_path(path)
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
        raise ValueError(f"{str(p)!r} is not {INCEPTION_FILE} (SHA-256 {digest.hexdigest()[:16]}..., expected "
                         f"{INCEPTION_SHA256_PREFIX}...): a different or truncated file; download {INCEPTION_URL}")
    return torch.load(p, map_location="cpu", weights_only=True)


@functools.cache
def _torch_fidelity_inception() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class, imported without torchvision where that is absent."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(INSTALL_HINT)
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    # The package __init__ imports extractors that need torchvision; the InceptionV3 module needs only torch. Import
    # it under an uninitialised package object, then restore sys.modules so that a later `import torch_fidelity`
    # runs the real __init__.
    prefix = "torch_fidelity"
    saved = {n: m for n, m in sys.modules.items() if n == prefix or n.startswith(prefix + ".")}
    sys.modules[prefix] = importlib.util.module_from_spec(importlib.util.find_spec(prefix))
    try:
        return importlib.import_module(f"{prefix}.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    finally:
        for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)


@functools.cache
def _inception_class() -> type:
    base = _torch_fidelity_inception()

    class TFInceptionV3(base):
        """torch-fidelity's InceptionV3 with weights from a state dict we read (None: random He-normal weights)."""

        def __init__(self, state_dict: dict[str, torch.Tensor] | None):
            self._random_init = state_dict is None
            buffer = io.BytesIO()
            torch.save(state_dict or {}, buffer)
            buffer.seek(0)
            super().__init__("dit-fast-inception-v3", ["2048", "logits_unbiased"],
                             feature_extractor_weights_path=buffer)
            if self._random_init:  # variance-preserving (He) init, so features stay O(1) through every convolution
                for module in self.modules():
                    if isinstance(module, nn.Conv2d):
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.normal_(self.fc.weight, std=POOL_DIM ** -0.5)

        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if self._random_init:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return TFInceptionV3


class InceptionFeatures(nn.Module):
    """The ADM evaluator's three feature sets of a batch of images.

    ``forward(images)``: (N, H, W, 3) uint8 (numpy or tensor, as the ``.npz`` stores them) -> ``(pool (N, 2048),
    spatial (N, 2023), logits (N, 1008))`` float32: ``pool_3``, ``mixed_6/conv[..., :7]`` flattened in (H, W, C)
    order, and ``pool_3 @ W`` (the softmax layer without its bias).

    Args:
        weights: a path to the weights file, None for torch-fidelity's cache, or "random" for random weights from
            the global RNG (He-normal convolutions: features of order 1; tests of the feature path without the file).
    """

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        network = _inception_class()  # first: an ImportError with the install hint
        state_dict = None if weights == "random" else read_inception_weights(weights)
        self.net = network(state_dict)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)  # TF's mixed_6/conv

    def _keep_spatial(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)  # (N, 17*17*7)

    @torch.no_grad()
    def forward(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {tuple(x.shape)}, dtype {x.dtype}")
        x = x.to(next(self.net.parameters()).device).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        pool, logits = self.net(x)  # (N, 2048), (N, 1008)
        spatial, self._spatial = self._spatial, None
        return pool.float(), spatial.float(), logits.float()


# ---------------------------------------------------------------------------------------------------- evaluation

Features = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Activations:
    """Features of a whole batch file: pool (N, 2048), spatial (N, 2023), logits (N, 1008), float32 numpy."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray


def compute_activations(path: str | Path, features: Features, batch_size: int = BATCH_SIZE,
                        progress: bool = False) -> Activations:
    """Stream ``arr_0`` of the ``.npz`` at ``path`` through ``features`` in batches."""
    pools, spatials, logits = [], [], []
    with open_npz_array(path, "arr_0") as reader:
        check_images(reader, path)
        total = -(-len(reader) // batch_size)
        for batch in tqdm(reader.batches(batch_size), total=total, desc=Path(path).name, disable=not progress):
            p, s, lg = features(batch)
            pools.append(p.cpu().numpy())
            spatials.append(s.cpu().numpy())
            logits.append(lg.cpu().numpy())
    return Activations(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


def statistics_of(path: str | Path, acts: Activations) -> tuple[Statistics, Statistics]:
    """(pool, spatial) statistics: those stored in the file if any (ADM's reference batches), else from ``acts``."""
    return read_stored_statistics(path) or (Statistics.of(acts.pool), Statistics.of(acts.spatial))


def evaluate(samples: str | Path, ref: str | Path, features: Features | None = None, *,
             inception_weights: str | Path | None = None, batch_size: int = BATCH_SIZE,
             device: str | torch.device | None = None, progress: bool = False) -> dict[str, float]:
    """The ADM evaluator's metrics of a samples ``.npz`` against a reference batch ``.npz``.

    ``features`` is the network (default: :class:`InceptionFeatures` with ``inception_weights`` on ``device``,
    CUDA when available). Returns ``{"inception_score", "fid", "sfid", "precision", "recall", "num_samples",
    "num_reference"}``.
    """
    for path in (samples, ref):  # both files readable, before the network is loaded or a batch is read
        with open_npz_array(path, "arr_0") as reader:
            check_images(reader, path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if features is None:
        features = InceptionFeatures(inception_weights).to(dev).eval()
    ref_acts = compute_activations(ref, features, batch_size, progress)
    ref_pool, ref_spatial = statistics_of(ref, ref_acts)
    sample_acts = compute_activations(samples, features, batch_size, progress)
    sample_pool, sample_spatial = statistics_of(samples, sample_acts)
    precision, recall = precision_recall(torch.from_numpy(ref_acts.pool).to(dev),
                                         torch.from_numpy(sample_acts.pool).to(dev))
    return {
        "inception_score": inception_score(sample_acts.logits),
        "fid": sample_pool.frechet_distance(ref_pool),
        "sfid": sample_spatial.frechet_distance(ref_spatial),
        "precision": precision,
        "recall": recall,
        "num_samples": float(len(sample_acts.pool)),
        "num_reference": float(len(ref_acts.pool)),
    }




