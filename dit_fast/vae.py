"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) as DiT uses it, and ``dit-fast extract-latents``.

DiT models ImageNet in the latent space of ``stabilityai/sd-vae-ft-ema`` or ``stabilityai/sd-vae-ft-mse``
(Hugging Face ids; the choice does not affect training). We load a LOCAL copy only (a folder with
``config.json`` and weights, e.g. from ``huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir vae-ema``):
sampling and training never reach the network. Latents are ``posterior sample * 0.18215``.

``dit-fast extract-latents`` encodes an image folder once into one memory-mapped array, storing for each image AND
its horizontal mirror the posterior's mean and std, so training can draw fresh latents every epoch
(``dit_fast.data.LatentDataset``) without running the VAE again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dit_fast.data import LABELS_FILE, LATENTS_FILE, META_FILE, ImageFolderDataset, collate
from dit_fast.files import atomic_write
from dit_fast.validation import check_output_dir, non_negative_int, positive_int

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


def extract_latents(data_path: str, vae: VAE, output: str | os.PathLike, image_size: int, batch_size: int = 32,
                    num_workers: int = 0, storage_dtype: str = "float32", progress: bool = True) -> Path:
    """Encode every image of ``data_path`` (ImageNet layout) and its mirror image; write ``output`` atomically.

    ``output/latents.npy`` is (N, 2, 2, C, h, w) = [image, mirror] x [mean, std]; ``labels.npy`` (N,) int64;
    ``meta.json`` holds the classes, image size, scale factor and VAE path. The folder appears only when complete
    (written under a temporary name, then renamed).
    """
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output {str(output)!r} already exists; remove it or choose another path")
    dataset = ImageFolderDataset(data_path, image_size)
    f = vae.downsample
    if image_size % f:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE's downsampling factor {f}")
    shape = (len(dataset), 2, 2, vae.latent_channels, image_size // f, image_size // f)
    def write(tmp: Path) -> None:
        moments = np.lib.format.open_memmap(tmp / LATENTS_FILE, mode="w+", dtype=np.dtype(storage_dtype), shape=shape)
        labels = np.empty(len(dataset), dtype=np.int64)
        keys = [(i, False) for i in range(len(dataset))]
        batches = [keys[i: i + batch_size] for i in range(0, len(keys), batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                             collate_fn=collate)
        start = 0
        for x, y in tqdm(loader, desc="extract-latents", disable=not progress):
            n = len(y)
            mean, std = vae.encode_moments(torch.cat([x, x.flip(-1)]))  # (2n, C, h, w) each: images then mirrors
            both = torch.stack([mean, std], dim=1).view(2, n, 2, *mean.shape[1:])  # (flip, n, [mean, std], C, h, w)
            moments[start: start + n] = both.transpose(0, 1).numpy().astype(storage_dtype)
            labels[start: start + n] = y.numpy()
            start += n
        moments.flush()
        del moments
        np.save(tmp / LABELS_FILE, labels)
        meta = {"classes": dataset.classes, "image_size": image_size, "scale_factor": SCALE_FACTOR,
                "vae": vae.path, "source": str(data_path), "num_images": len(dataset),
                "layout": "latents.npy (N, 2, 2, C, h, w) = [image, mirror] x [mean, std]"}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))

    atomic_write(output, write, directory=True)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-path", required=True, help="image folder in the ImageNet layout: root/<class>/<image>")
    parser.add_argument("--output", required=True, help="latent folder to create (must not exist)")
    parser.add_argument("--vae", required=True,
                        help=f"LOCAL folder of a diffusers AutoencoderKL (e.g. {HF_VAE_IDS['ema']} or "
                             f"{HF_VAE_IDS['mse']} downloaded with huggingface-cli)")
    parser.add_argument("--image-size", type=positive_int, default=256, help="pixel side after the ADM centre crop")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call (each encoded twice)")
    parser.add_argument("--num-workers", type=non_negative_int, default=4, help="data-loading worker processes")
    parser.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32",
                        help="dtype of the stored mean/std (float16 halves the file; float32 is exact)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> int:
    """Encode ``--data-path`` with the VAE into one memory-mapped latent folder for ``dit-fast train``."""
    check_output_dir(args.output, "--output", must_not_exist=True)
    vae = VAE(args.vae, device=args.device)
    out = extract_latents(args.data_path, vae, args.output, args.image_size, batch_size=args.batch_size,
                          num_workers=args.num_workers, storage_dtype=args.storage_dtype)
    print(f"wrote {out} (train with: dit-fast train --data-path {out})")
    return 0
