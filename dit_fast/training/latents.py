"""Latent extraction (``dit-fast extract-latents``): encode an image folder once into one memory-mapped array.

For each image AND its horizontal mirror the VAE posterior's mean and std are stored, so training draws fresh
latents every epoch (``dit_fast.training.data.LatentDataset``) without running the VAE again. The folder is written
under a temporary name and renamed when complete; the latents file is reserved on disk first (``preallocate``), so a
full disk is one error before any encoding, never a SIGBUS in the memory map; a damaged image ends the run with its
name, from a data-loading worker too.
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
from dit_fast.utils.files import atomic_write, preallocate
from dit_fast.utils.lifecycle import init_worker, worker_errors
from dit_fast.utils.validation import check_free_space


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
    for note in dataset.notes:
        print(f"note: {note}")
    shape = (len(dataset), 2, 2, vae.latent_channels, image_size // f, image_size // f)
    size = int(np.prod(shape)) * np.dtype(storage_dtype).itemsize + 9 * len(dataset)  # latents and labels
    check_free_space(output.parent, size, f"--output {output} ({len(dataset)} images: latents of {shape[3:]})")

    def write(tmp: Path) -> None:
        moments = np.lib.format.open_memmap(tmp / LATENTS_FILE, mode="w+", dtype=np.dtype(storage_dtype), shape=shape)
        preallocate(tmp / LATENTS_FILE, moments.offset + moments.nbytes)
        labels = np.empty(len(dataset), dtype=np.int64)
        keys = [(i, False) for i in range(len(dataset))]
        batches = [keys[i: i + batch_size] for i in range(0, len(keys), batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                             collate_fn=collate, worker_init_fn=init_worker)
        start = 0
        with worker_errors():
            for x, y in tqdm(loader, desc="extract-latents", disable=not progress):
                n = len(y)
                mean, std = vae.encode_moments(torch.cat([x, x.flip(-1)]))  # (2n, C, h, w): images, then mirrors
                both = torch.stack([mean, std], dim=1).view(2, n, 2, *mean.shape[1:])  # (flip, n, [m, s], C, h, w)
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


