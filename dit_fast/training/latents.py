"""Latent extraction (``dit-fast extract-latents``): encode an image folder once into one memory-mapped array.

For each image AND its horizontal mirror the VAE posterior's mean and std are stored, so training draws fresh
latents every epoch (``dit_fast.training.data.LatentDataset``) without running the VAE again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dit_fast.models.vae import SCALE_FACTOR, VAE
from dit_fast.training.data import LABELS_FILE, LATENTS_FILE, META_FILE, ImageFolderDataset, collate
from dit_fast.utils.files import atomic_write


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


