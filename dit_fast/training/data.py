"""Training data: the built-in digits, image folders (ImageNet layout) and pre-extracted VAE latents.

Every dataset is indexed by a key ``(index, flip)``: which sample and whether to mirror it horizontally. The flip
decision is made by the sampler from the epoch's seed (``epoch_order``), not inside the dataset, so that the data a
run sees depends only on ``(global_seed, epoch, position)``: the same for one process or many, and after a resume.

- ``DigitsDataset``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download), pixel
  space, 1 channel, scaled to [-1, 1]. Digits are never flipped (a mirrored 2 is not a 2).
- ``ImageFolderDataset``: ``root/<class>/<image>`` like torchvision's ImageFolder (classes sorted by name; stray,
  hidden and empty folders are not classes, and files are checked as they are read: ``dit_fast.datacheck``), with the
  ADM centre crop (``center_crop_arr``) and random horizontal flips, as the official training script.
- ``LatentDataset``: the memory-mapped output of ``dit-fast extract-latents``: for every image and its mirror
  image, the VAE posterior's mean and std. Training draws ``(mean + std * eps) * 0.18215`` (``sample_latents``),
  exactly the official online ``vae.encode(x).latent_dist.sample().mul_(0.18215)`` with a random flip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_fast.utils.datacheck import open_npy, read_image, read_latent_meta, scan_image_folder
from dit_fast.utils.seeds import mix_seed
from dit_fast.utils.validation import UserError

LATENTS_FILE = "latents.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
DIGITS_SIZE = 8
DIGITS_MAX = 16.0  # pixel values in load_digits are 0..16


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits as a class-conditional pixel dataset.

    Items are ``(x, y)`` with x (1, S, S) float32 in [-1, 1] (S = ``image_size``; 8 is native, larger sides are
    bilinear upsamplings) and y the digit 0..9. ``images`` holds all of them: (1797, 1, S, S).
    """

    num_classes = 10
    in_channels = 1

    def __init__(self, image_size: int = DIGITS_SIZE):
        from sklearn.datasets import load_digits

        if image_size < DIGITS_SIZE:
            raise ValueError(f"digits image_size must be >= {DIGITS_SIZE} (the native side), got {image_size}")
        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32))[:, None]  # (N, 1, 8, 8) in 0..16
        x = x / (DIGITS_MAX / 2) - 1.0  # [-1, 1]
        if image_size != DIGITS_SIZE:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False)
        self.images = x.contiguous()  # (N, 1, S, S)
        self.labels = torch.from_numpy(digits.target.astype(np.int64))  # (N,)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, _ = key  # never flipped
        return self.images[index], int(self.labels[index])


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX filtering while the short side >= 2 * size, bicubic-resize the short side
    to ``image_size``, then crop the centre square. Same arithmetic as guided-diffusion / the official DiT."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` images, ADM centre-cropped to ``image_size``; items ``(x (3, S, S) in [-1, 1], y)``."""

    in_channels = 3

    def __init__(self, root: str | os.PathLike, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = str(root)
        self.classes, self.samples, self.notes = scan_image_folder(root)  # notes: folders that are not classes
        self.image_size = image_size
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        path, label = self.samples[index]
        img = center_crop_arr(read_image(path), self.image_size)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return image_to_tensor(img), label


class LatentDataset(torch.utils.data.Dataset):
    """Pre-extracted VAE posteriors (``dit-fast extract-latents``), memory-mapped.

    ``moments`` is (N, 2, 2, C, h, w): [image, mirrored image] x [mean, std]. Items are ``(m, y)`` with m (2, C, h,
    w) float32 = [mean, std] of the requested flip; ``sample_latents(m, eps)`` turns a batch of them into training
    latents. ``image_size`` is the pixel side the latents were extracted at.
    """

    in_channels: int

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a latent folder from `dit-fast extract-latents` "
                                    f"(no {META_FILE})")
        self.meta = read_latent_meta(meta_path)
        self.moments = open_npy(path / LATENTS_FILE)  # (N, 2, 2, C, h, w)
        self.labels = np.asarray(open_npy(path / LABELS_FILE, mmap=False))  # (N,)
        if self.moments.ndim != 6 or self.moments.shape[1:3] != (2, 2) or self.labels.shape != (len(self.moments),):
            raise UserError(f"corrupt latent folder {str(path)!r}: latents {self.moments.shape}, labels "
                            f"{self.labels.shape} (expected (N, 2, 2, C, h, w) and (N,))")
        if self.moments.dtype not in (np.float16, np.float32) or self.labels.dtype.kind not in "iu":
            raise UserError(f"corrupt latent folder {str(path)!r}: latents {self.moments.dtype}, labels "
                            f"{self.labels.dtype} (expected float16/float32 and integers)")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.meta["classes"]):
            raise UserError(f"corrupt latent folder {str(path)!r}: labels outside 0..{len(self.meta['classes']) - 1}, "
                            f"the classes of {META_FILE}")
        self.in_channels = int(self.moments.shape[3])
        self.latent_size = tuple(int(s) for s in self.moments.shape[4:])
        self.image_size = int(self.meta["image_size"])
        self.classes = list(self.meta["classes"])
        self.num_classes = len(self.classes)
        self.scale_factor = float(self.meta["scale_factor"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        m = torch.from_numpy(np.array(self.moments[index, int(flip)], dtype=np.float32))  # (2, C, h, w)
        return m, int(self.labels[index])


def sample_latents(moments: torch.Tensor, eps: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """moments (N, 2, C, h, w) = [mean, std], eps (N, C, h, w) standard normal -> (mean + std * eps) * scale."""
    return (moments[:, 0] + moments[:, 1] * eps) * scale_factor


def build_dataset(data_path: str | None, image_size: int) -> DigitsDataset | ImageFolderDataset | LatentDataset:
    """``None`` -> the built-in digits at ``image_size``; a latent folder (has meta.json) -> LatentDataset;
    any other folder -> ImageFolderDataset."""
    if data_path is None:
        return DigitsDataset(image_size)
    if (Path(data_path) / META_FILE).is_file():
        return LatentDataset(data_path)
    return ImageFolderDataset(data_path, image_size)


def epoch_order(num_samples: int, seed: int, epoch: int, flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's shuffled order and flip bits: (perm (N,) int64, flip (N,) bool), a function of (seed, epoch)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    perm = torch.randperm(num_samples, generator=g)
    flip = torch.rand(num_samples, generator=g) < 0.5 if flips else torch.zeros(num_samples, dtype=torch.bool)
    return perm, flip


class StepBatchSampler(torch.utils.data.Sampler[list[tuple[int, bool]]]):
    """Yields this rank's keys ``(index, flip)`` for each training step, from a data position onward.

    Each epoch is ``epoch_order(seed, epoch)`` cut into ``len // global_batch`` global batches (the remainder is
    dropped, as the official ``drop_last=True``); rank r of W takes the r-th contiguous slice of every global batch.
    Iteration starts at ``(epoch, index)`` (index = position within the epoch's order, a multiple of the global
    batch), which is what a checkpoint stores, and runs for ``num_steps`` steps.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int, flips: bool,
                 start_epoch: int, start_index: int, num_steps: int):
        if global_batch % world_size:
            raise ValueError(f"global batch size {global_batch} is not divisible by the world size {world_size}")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed, self.flips = rank, world_size, seed, flips
        self.start_epoch, self.start_index, self.num_steps = start_epoch, start_index, num_steps
        self.local_batch = global_batch // world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(epoch, index)`` of each step's global batch."""
        epoch, index = self.start_epoch, self.start_index
        for _ in range(self.num_steps):
            if index + self.global_batch > self.num_samples:
                epoch, index = epoch + 1, 0
            yield epoch, index
            index += self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        cached_epoch, perm, flip = -1, None, None
        lo = self.rank * self.local_batch
        for epoch, index in self.positions():
            if epoch != cached_epoch:
                perm, flip = epoch_order(self.num_samples, self.seed, epoch, self.flips)
                cached_epoch = epoch
            sl = slice(index + lo, index + lo + self.local_batch)
            yield list(zip(perm[sl].tolist(), flip[sl].tolist(), strict=True))

    def __len__(self) -> int:
        return self.num_steps


def collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(x, y), ...] -> (x (N, ...), y (N,) int64)."""
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
