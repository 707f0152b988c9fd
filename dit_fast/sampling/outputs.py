"""What a sampling run writes: images as uint8 (the official rounding), a PNG grid, an ADM-evaluator ``.npz``."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_fast.utils.files import atomic_write
from dit_fast.utils.guard import image_format


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 with the official rounding ``127.5 x + 128``."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
              scale: int = 0) -> Path:
    """Write images (N, C, H, W) float in [-1, 1] or (N, H, W, C) uint8 as one grid image, ``nrow`` per row, in the
    format ``path``'s suffix names (.png; .jpg/.jpeg: JPEG quality 95; .webp: lossless WebP; others refused).

    ``scale`` > 1 enlarges each image by pixel repetition (default: so small images are at least 64 px). Written
    atomically.
    """
    fmt = image_format(path)
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1|3), got {arr.shape}")
    n, h, w, c = arr.shape
    scale = scale or max(1, math.ceil(64 / max(h, w)))
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((padding + nrows * (h + padding), padding + ncol * (w + padding), c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0: y0 + h, x0: x0 + w] = arr[k]
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    return atomic_write(path, lambda tmp: Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format=fmt,
                                                                                                 **options))


def write_npz(path: str | os.PathLike, shards: list[np.ndarray | str | os.PathLike], labels: np.ndarray) -> Path:
    """Write an ADM-evaluator ``.npz``: ``arr_0`` (N, H, W, 3) uint8 streamed from ``shards`` (arrays or ``.npy``
    paths, concatenated in order, never all in memory) and ``labels`` (N,). Atomic."""
    arrays = [np.load(s, mmap_mode="r") if not isinstance(s, np.ndarray) else s for s in shards]
    n = sum(len(a) for a in arrays)
    if n != len(labels):
        raise ValueError(f"{n} images but {len(labels)} labels")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *arrays[0].shape[1:])}

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, header)
                for a in arrays:
                    for i in range(0, len(a), 1024):
                        out.write(np.ascontiguousarray(a[i: i + 1024], dtype=np.uint8).tobytes())
            with zf.open("labels.npy", "w") as out:
                np.lib.format.write_array(out, np.asarray(labels, dtype=np.int64))

    return atomic_write(path, write)


