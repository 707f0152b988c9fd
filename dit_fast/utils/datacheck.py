"""Datasets checked when they are opened, every problem named by its file.

- Image folders (``scan_image_folder``): a class is a visible sub-folder holding at least one image. Stray folders
  (hidden ones, ``__MACOSX``, ``lost+found``, ``$RECYCLE.BIN``, ``System Volume Information``) and empty folders
  are not classes (they would shift every label); they are returned as notes, which the commands print. Links to
  folders are followed once: a folder reached again (a symlink loop, two links to one folder) is not re-read.
- Images (``read_image``): truncated or corrupt files raise ``UserError`` naming the file (from a data-loading
  worker, ``dit_fast.workers`` turns the worker's traceback into that one line); 16-bit images are scaled to
  8 bits (65535 -> 255), not clipped.
- Latent folders (``read_latent_meta``, ``open_npy``): ``meta.json`` must be a JSON object with the classes, the
  image size and the scale factor; ``latents.npy`` / ``labels.npy`` must be whole (a truncated array is refused
  when opened, not found as a crash mid-run).
- ``.npz`` files (``npz_arrays``; ``open_npz_array`` streams one array in batches without loading it whole): a
  truncated or corrupt archive or member (BadZipFile, zlib errors, short reads) is one error naming the file and the
  member.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dit_fast.utils.validation import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
STRAY_FOLDERS = frozenset({"__MACOSX", "lost+found", "$RECYCLE.BIN", "System Volume Information"})
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)


def _images_under(folder: Path, seen: set[tuple[int, int]]) -> list[str]:
    """Image paths under ``folder`` (sorted, links followed), skipping folders already in ``seen`` (dev, inode)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in STRAY_FOLDERS)
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """``(classes, samples, notes)`` of an ImageNet-layout folder ``root/<class>/<image>``: class names (sorted),
    ``(path, class index)`` for every image, and a note per folder that is not a class. FileNotFoundError /
    UserError naming the folder when there is nothing to train on."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data path {str(root)!r} is not a folder (expected root/<class>/<image>)")
    seen = {(root.stat().st_dev, root.stat().st_ino)}
    classes, samples, notes = [], [], []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            continue
        if entry.name.startswith(".") or entry.name in STRAY_FOLDERS:
            notes.append(f"skipped {entry} (not a class: hidden or system folder)")
            continue
        st = entry.stat()
        if (st.st_dev, st.st_ino) in seen:
            notes.append(f"skipped {entry} (a link to a folder already read)")
            continue
        images = _images_under(entry, seen)
        if not images:
            notes.append(f"skipped {entry} (no images: not a class)")
            continue
        samples += [(path, len(classes)) for path in images]
        classes.append(entry.name)
    if not classes:
        folders = [e for e in root.iterdir() if e.is_dir()]
        what = (f"{len(folders)} folders but no images in them (extensions {', '.join(IMAGE_EXTENSIONS)})" if folders
                else "no class subfolders")
        raise UserError(f"data path {str(root)!r} has {what} (expected root/<class>/<image>, the ImageNet layout)")
    return classes, samples, notes


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully decoded; UserError naming the file when it is truncated or not an
    image. 16-bit grey images are scaled to 8 bits (PIL's ``convert`` would clip them to white)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                arr = np.asarray(img, dtype=np.float64)
                arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
                return Image.fromarray(arr, mode="L").convert("RGB")
            if img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
                return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL raises all four for bad files
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------- latents

LATENT_META_FIELDS = {"classes": list, "image_size": int, "scale_factor": (int, float)}


def read_json_object(path: Path, hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; UserError naming the file when it is not valid JSON (``hint`` appended) or holds
    something other than an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}){hint}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


def read_latent_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A latent folder's ``meta.json``, checked: a JSON object with ``classes`` (a list of names), ``image_size``
    (a positive int) and ``scale_factor`` (a positive number). UserError naming the file otherwise."""
    path = Path(path)
    meta = read_json_object(path, hint="; re-run `dit-fast extract-latents`")
    for key, kind in LATENT_META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{path}: {key!r} is missing or not a {getattr(kind, '__name__', 'number')} (got "
                            f"{value!r})")
    if not meta["classes"] or meta["image_size"] <= 0 or not meta["scale_factor"] > 0:
        raise UserError(f"{path}: needs a non-empty 'classes', image_size > 0 and scale_factor > 0")
    return meta


def open_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """``np.load(path)`` (memory-mapped with ``mmap``); UserError naming the file when it is missing, truncated
    or not an array file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; re-run `dit-fast extract-latents`") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is truncated or not a .npy array ({e}); re-run `dit-fast extract-latents`") from None


# ---------------------------------------------------------------------------------------------------- .npz

class NpzArrayReader:
    """One array of an ``.npz`` read in batches along its first axis, streamed from the zip member (compressed or
    not) without loading it whole. ``shape`` and ``dtype`` are the array's."""

    def __init__(self, stream: IO[bytes], shape: tuple[int, ...], dtype: np.dtype, path: str | os.PathLike = "",
                 name: str = "arr_0"):
        self._stream, self.path, self.name = stream, path, name
        self.shape = shape
        self.dtype = dtype
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (<= batch_size, *shape[1:]) arrays, in file order, once."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        while self._read < self.shape[0]:
            n = min(batch_size, self.shape[0] - self._read)
            try:
                data = self._stream.read(n * self._row_bytes)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a damaged member, found as it is streamed
                raise ValueError(f"{self.path}: {self.name} is truncated or corrupt at row {self._read} "
                                 f"({type(e).__name__}: {e})") from None
            if len(data) != n * self._row_bytes:
                raise ValueError(f"truncated array: expected {n * self._row_bytes} more bytes at row {self._read}, "
                                 f"got {len(data)}")
            self._read += n
            yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape(n, *self.shape[1:])  # writable


@contextlib.contextmanager
def open_npz_array(path: str | Path, name: str) -> Iterator[NpzArrayReader]:
    """Stream array ``name`` of the ``.npz`` at ``path`` (C order, no Python objects); errors name the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a readable .npz (truncated, or not an .npz file: no zip directory)") from None
    with archive:
        members = [m.removesuffix(".npy") for m in archive.namelist()]
        if name not in members:
            raise ValueError(f"{str(path)!r} has no array {name!r} (it has {sorted(members)})")
        with archive.open(f"{name}.npy") as stream:
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{str(path)!r}: {name} is in .npy format version {version}; np.savez writes 1.0 "
                                 "(2.0 for huge headers), which this reader supports")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(stream)
            if fortran or dtype.hasobject or len(shape) == 0:
                raise ValueError(f"{str(path)!r}: {name} must be a C-ordered numeric array with a batch axis, got "
                                 f"shape {shape}, dtype {dtype}, fortran order {fortran}")
            yield NpzArrayReader(stream, tuple(shape), dtype, path, name)


def npz_arrays(path: str | os.PathLike, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Read the arrays ``names`` of the ``.npz`` at ``path``; UserError naming the file (and member) when the
    archive or a member is truncated or corrupt, or a name is missing."""
    names = list(names)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [n for n in names if n not in f.files]
            if missing:
                have = ", ".join(sorted(f.files)) or "nothing"
                raise UserError(f"{path} has no {', '.join(missing)} (it has {have})")
            out = {}
            for name in names:
                try:
                    out[name] = f[name]
                except NPZ_ERRORS as e:
                    raise UserError(f"{path}: member {name!r} is truncated or corrupt ({type(e).__name__}: "
                                    f"{e})") from None
            return out
    except UserError:
        raise
    except NPZ_ERRORS as e:
        raise UserError(f"{path} is not a readable .npz (truncated or corrupt: {type(e).__name__}: {e})") from None
