"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) as DiT uses it.

DiT models ImageNet in the latent space of ``stabilityai/sd-vae-ft-ema`` or ``stabilityai/sd-vae-ft-mse``
(Hugging Face ids; the choice does not affect training). We load a LOCAL copy only (a folder with
``config.json`` and weights, e.g. from ``huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir vae-ema``):
sampling and training never reach the network. Latents are ``posterior sample * 0.18215``.

``dit-fast extract-latents`` (``dit_fast.training.latents``) encodes an image folder once with it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SCALE_FACTOR = 0.18215
HF_VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class VAE:
    """A loaded AutoencoderKL: ``encode_moments`` (images -> posterior mean/std), ``encode`` (-> scaled latent
    sample) and ``decode`` (scaled latents -> images in [-1, 1])."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = str(path)
        self.model = load_autoencoder(path).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Pixel side / latent side (8 for the SD VAE)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3, H, W) in [-1, 1] -> (mean, std), each (N, C, H/f, W/f) float32 (unscaled posterior)."""
        dist = self.model.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, 3, H, W) in [-1, 1] -> scaled latent sample (N, C, H/f, W/f), as the official training loop."""
        mean, std = self.encode_moments(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * eps) * SCALE_FACTOR

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents z (N, C, h, w) -> images (N, 3, h*f, w*f) float32, clamped to [-1, 1]."""
        return self.model.decode((z / SCALE_FACTOR).to(self.device, self.dtype)).sample.float().clamp(-1, 1)


def load_autoencoder(path: str | os.PathLike) -> torch.nn.Module:
    """diffusers ``AutoencoderKL.from_pretrained(path)`` from a local folder, with clear errors."""
    if importlib.util.find_spec("diffusers") is None:
        raise ImportError("the VAE needs diffusers: pip install diffusers (or dit-fast[diffusers])")
    p = Path(path)
    if not p.exists():
        hint = (f"; {path!r} looks like a name, not a folder: download it first, e.g. `huggingface-cli download "
                f"{HF_VAE_IDS.get(str(path), HF_VAE_IDS['ema'])} --local-dir vae`" if not p.is_absolute() else "")
        raise FileNotFoundError(f"VAE folder {str(path)!r} does not exist{hint} (Hugging Face ids: "
                                f"{', '.join(HF_VAE_IDS.values())})")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {str(path)!r} has no config.json (expected a diffusers AutoencoderKL "
                                "folder, e.g. a local copy of stabilityai/sd-vae-ft-ema)")
    from diffusers.models import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(p), local_files_only=True)
