"""Data sets: the built-in digits, image folders (ADM crop, flips), latent extraction and memory-mapped latents."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.training.data import (
    LATENTS_FILE,
    META_FILE,
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    StepBatchSampler,
    build_dataset,
    center_crop_arr,
    epoch_order,
    sample_latents,
)
from tests.helpers import assert_close

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")


def test_digits_shapes_ranges_labels():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.in_channels == 1
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert set(ds.labels.tolist()) == set(range(10))
    x, y = ds[(5, True)]  # digits are never flipped
    assert torch.equal(x, ds.images[5]) and y == int(ds.labels[5])
    up = DigitsDataset(16)
    assert up.images.shape == (1797, 1, 16, 16)
    assert torch.allclose(torch.nn.functional.avg_pool2d(up.images, 2).mean(), ds.images.mean(), atol=1e-2)
    with pytest.raises(ValueError, match=">= 8"):
        DigitsDataset(4)


def _write_folder(root, sizes=((40, 30), (30, 50), (64, 64)), classes=("cat", "dog")):
    rng = np.random.RandomState(0)
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            p = root / c / f"{i}.png"
            Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            paths.append(p)
    return paths


def test_center_crop_matches_adm_arithmetic():
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (100, 260, 3), dtype=np.uint8))
    out = center_crop_arr(img, 16)
    assert out.size == (16, 16)
    # The ADM recipe by hand: BOX-halve while the short side >= 32 (100 -> 50), bicubic short side -> 16, centre.
    half = img.resize((130, 50), resample=Image.BOX).resize((65, 25), resample=Image.BOX)
    scaled = np.array(half.resize((round(65 * 16 / 25), 16), resample=Image.BICUBIC))
    x0 = (scaled.shape[1] - 16) // 2
    assert np.array_equal(np.array(out), scaled[:, x0: x0 + 16])


def test_image_folder_crop_and_flip(tmp_path):
    _write_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.num_classes == 2
    x, y = ds[(4, False)]
    assert x.shape == (3, 16, 16) and y == 1 and -1 <= x.min() and x.max() <= 1
    xf, _ = ds[(4, True)]
    assert torch.equal(xf, x.flip(-1))
    assert build_dataset(str(tmp_path), 16).__class__ is ImageFolderDataset


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path, 16)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, 16)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path, 16)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds[(0, False)]


def test_epoch_order_and_step_sampler_split_global_batches():
    perm, flip = epoch_order(10, seed=3, epoch=1, flips=True)
    perm2, flip2 = epoch_order(10, seed=3, epoch=1, flips=True)
    assert torch.equal(perm, perm2) and torch.equal(flip, flip2) and sorted(perm.tolist()) == list(range(10))
    assert not torch.equal(perm, epoch_order(10, seed=3, epoch=2, flips=True)[0])
    one = list(StepBatchSampler(10, 4, 0, 1, 3, True, 0, 0, 5))
    halves = [list(StepBatchSampler(10, 4, r, 2, 3, True, 0, 0, 5)) for r in range(2)]
    assert [a + b for a, b in zip(*halves, strict=True)] == one  # rank slices concatenate to the global batch
    s = StepBatchSampler(10, 4, 0, 1, 3, True, 0, 0, 5)
    assert list(s.positions()) == [(0, 0), (0, 4), (1, 0), (1, 4), (2, 0)]  # 2 steps per epoch, remainder dropped
    assert list(StepBatchSampler(10, 4, 0, 1, 3, True, 1, 4, 2)) == one[3:]  # resumed mid-epoch
    assert list(StepBatchSampler(10, 4, 0, 1, 3, True, 0, 8, 3)) == one[2:]  # past the epoch's end: next epoch
    with pytest.raises(ValueError, match="not divisible"):
        StepBatchSampler(10, 5, 0, 2, 0, False, 0, 0, 1)


@needs_diffusers
def test_extract_latents_and_memmap_sampling(tmp_path):
    from diffusers.models import AutoencoderKL

    from dit_fast.models.vae import VAE
    from dit_fast.training.latents import extract_latents

    torch.manual_seed(0)
    tiny = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)
    tiny.save_pretrained(tmp_path / "vae")
    images = tmp_path / "images"
    _write_folder(images)
    vae = VAE(tmp_path / "vae")
    assert vae.downsample == 2 and vae.latent_channels == 4
    out = extract_latents(str(images), vae, tmp_path / "latents", image_size=16, batch_size=4, progress=False)
    ds = LatentDataset(out)
    assert len(ds) == 6 and ds.in_channels == 4 and ds.latent_size == (8, 8) and ds.classes == ["cat", "dog"]
    assert isinstance(ds.moments, np.memmap) and ds.moments.shape == (6, 2, 2, 4, 8, 8)
    assert json.loads((out / META_FILE).read_text())["scale_factor"] == 0.18215
    assert build_dataset(str(out), 16).__class__ is LatentDataset

    # The stored posterior is the VAE's, for the image and for its mirror image.
    folder = ImageFolderDataset(images, 16)
    for flip in (False, True):
        x, y = folder[(3, flip)]
        mean, std = vae.encode_moments(x[None])
        m, label = ds[(3, flip)]
        assert label == y
        assert_close(m[0], mean[0], atol=1e-5, rtol=1e-5, name="mean")
        assert_close(m[1], std[0], atol=1e-6, rtol=1e-5, name="std")
        # Training draws (mean + std * eps) * 0.18215: the official latent_dist.sample().mul_(0.18215) with the
        # same eps.
        eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        dist = vae.model.encode(x[None]).latent_dist
        expected = (dist.mean + dist.std * eps) * 0.18215
        assert_close(sample_latents(m[None], eps, ds.scale_factor), expected, atol=1e-5, rtol=1e-4, name="latent")
        assert_close(vae.encode(x[None], generator=torch.Generator().manual_seed(7)), expected, atol=1e-5, rtol=1e-4,
                     name="online latent")

    with pytest.raises(FileExistsError, match="already exists"):
        extract_latents(str(images), vae, out, image_size=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "latents", "vae"]  # no temp folders left


@needs_diffusers
def test_extract_latents_unreadable_image_leaves_nothing(tmp_path):
    from diffusers.models import AutoencoderKL

    from dit_fast.models.vae import VAE
    from dit_fast.training.latents import extract_latents

    AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp_path / "vae")
    images = tmp_path / "images"
    _write_folder(images)
    (images / "dog" / "zz.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read image .*zz.png"):
        extract_latents(str(images), VAE(tmp_path / "vae"), tmp_path / "latents", image_size=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "vae"]


def test_vae_path_errors(tmp_path):
    from dit_fast.models.vae import load_autoencoder

    with pytest.raises((FileNotFoundError, ImportError), match="does not exist|diffusers"):
        load_autoencoder(tmp_path / "nope")
    with pytest.raises((FileNotFoundError, ImportError), match="config.json|diffusers"):
        load_autoencoder(tmp_path)


def test_latent_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract-latents"):
        LatentDataset(tmp_path)
    np.save(tmp_path / LATENTS_FILE, np.zeros((3, 2, 2, 4, 2, 2), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(2, np.int64))
    (tmp_path / META_FILE).write_text(json.dumps({"image_size": 16, "classes": ["a"], "scale_factor": 0.18215}))
    with pytest.raises(ValueError, match="corrupt latent folder"):
        LatentDataset(tmp_path)
