"""The output-path guard: a command never replaces what it reads, nor a file of the user's that it did not write.

Every command declares, before it loads anything, the paths it reads (``inputs``: option -> file or folder) and
the files or folders it will write (``outputs``: option -> ``Output(path, kind)``); ``check_outputs`` then refuses,
in one line naming the options:

- an output that is an input (the same file by ``os.path.samefile`` or the same real path: ``--out model.pt`` with
  ``--ckpt model.pt``, links included), lies inside an input folder (the data folder, a checkpoint or VAE folder),
  or is a folder to be created whole that would hold an input;
- two outputs that are the same file (``--out`` == ``--npz``);
- an existing file or folder that is not what this command writes (``kind``): a PNG grid may replace a PNG, an
  ``.npz`` of samples an ``.npz`` of samples, but ``--out model.pt`` never replaces a checkpoint, unless
  ``--overwrite``. ``describe_file`` says what the file is (by its first bytes);
- a name longer than the file system allows (NAME_MAX; the temporary's longer name is shortened by ``files``).

``image_format(path)`` picks the image format of a path by its suffix (PNG, JPEG or WebP, written by PIL), so
``--out grid.jpg`` writes a JPEG; other suffixes are refused.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dit_fast.utils.files import name_max
from dit_fast.utils.validation import UserError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_MAGIC = {b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x93NUMPY": "a .npy array",
          b"\x80": "a pickle (a PyTorch checkpoint?)", b"{": "a JSON file"}


@dataclass(frozen=True)
class Output:
    """A path a command writes and what it writes there: "image", "npz", "checkpoint" (a torch ``.pt``),
    "safetensors", "folder" (created whole, must not exist) or "files" (a folder the command writes files into)."""

    path: str | os.PathLike
    kind: str


def describe_file(path: str | os.PathLike) -> str:
    """What ``path`` holds, judged by its first bytes: "a PNG image", "an .npz of samples", "a PyTorch
    checkpoint", "a safetensors file", "a folder", ... ("a file" when unknown)."""
    p = Path(path)
    if p.is_dir():
        return "a folder"
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError:
        return "a file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a damaged zip archive"
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch checkpoint"
        return "an .npz of samples" if "arr_0.npy" in names else ("an .npz" if names and all(
            n.endswith(".npy") for n in names) else "a zip archive")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "a safetensors file"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    return next((what for magic, what in _MAGIC.items() if head.startswith(magic)), "a file")


# What each kind of output may replace without --overwrite.
_REPLACEABLE = {"image": {"a PNG image", "a JPEG image", "a WebP image"}, "npz": {"an .npz of samples"},
                "checkpoint": {"a PyTorch checkpoint"}, "safetensors": {"a safetensors file"},
                "folder": set(), "files": {"a folder"}}


def image_format(path: str | os.PathLike, option: str = "--out") -> str:
    """The PIL format an image path's suffix asks for ("PNG", "JPEG", "WEBP"); UserError for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise UserError(f"{option} {path}: unsupported image type {suffix or '(no suffix)'!r}; end it in "
                        f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file or folder: ``os.path.samefile`` when both exist, else equal real
    paths (so a path about to be created equals an input it would replace)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _real(a) == _real(b)


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside ``folder`` (real paths; ``folder`` itself excluded)."""
    p, f = _real(path), _real(folder)
    return p != f and f in p.parents


def check_name_length(path: str | os.PathLike, option: str) -> None:
    """UserError when a component of ``path`` exceeds the file system's NAME_MAX, or the path PATH_MAX (4096)."""
    p = Path(os.path.abspath(path))
    limit = name_max(p.parent)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise UserError(f"{option} {path}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, longer than "
                            f"the {limit} this file system allows")
    if len(os.fsencode(str(p))) >= 4096:
        raise UserError(f"{option} {path}: the path is longer than 4096 bytes")


def check_outputs(outputs: Mapping[str, Output | None], inputs: Mapping[str, str | os.PathLike | None], *,
                  overwrite: bool = False) -> None:
    """Refuse (UserError) any output that is or touches an input, collides with another output, would replace
    what this command did not write (without ``overwrite``), or has too long a name. ``None`` entries are unset
    options. Creates nothing."""
    outs = {k: v for k, v in outputs.items() if v is not None}
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    for option, out in outs.items():
        path = Path(out.path)
        check_name_length(path, option)
        for name, source in ins.items():
            if same_file(path, source):
                raise UserError(f"{option} {path} is the input {name} {source}; writing it would destroy it: choose "
                                "another path")
            if source.is_dir() and is_within(path, source):
                raise UserError(f"{option} {path} lies inside the input {name} {source}; write it elsewhere")
            if out.kind == "folder" and is_within(source, path):
                raise UserError(f"{option} {path} holds the input {name} {source}; choose another folder")
        _check_replace(option, path, out.kind, overwrite)
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if same_file(outs[a].path, outs[b].path):
                raise UserError(f"{a} and {b} are the same file ({outs[a].path}); give them different paths")


def _check_replace(option: str, path: Path, kind: str, overwrite: bool) -> None:
    if kind not in _REPLACEABLE:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(_REPLACEABLE)}")
    if not os.path.lexists(path):
        return
    what = describe_file(path)
    if kind == "folder":
        if path.is_dir() and not any(path.iterdir()):
            return
        raise UserError(f"{option} {path} exists ({what}); choose a new path (it is created whole)")
    if kind != "files" and path.is_dir():
        example = {"image": "sample.png", "npz": "samples.npz", "checkpoint": "model.pt"}.get(kind, "model.safetensors")
        raise UserError(f"{option} {path} is a folder; give a file path, e.g. {path / example}")
    if kind == "files" and not path.is_dir():
        raise UserError(f"{option} {path} is {what}, not a folder")
    if not overwrite and what not in _REPLACEABLE[kind]:
        raise UserError(f"{option} {path} exists and is {what}, not {_noun(kind)} this command writes; pass "
                        "--overwrite to replace it")


def _noun(kind: str) -> str:
    return {"image": "an image", "npz": "an .npz of samples", "checkpoint": "a checkpoint",
            "safetensors": "a safetensors file", "files": "a folder"}.get(kind, "what")
