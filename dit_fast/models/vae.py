"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) as DiT uses it.

DiT models ImageNet in the latent space of ``stabilityai/sd-vae-ft-ema`` or ``stabilityai/sd-vae-ft-mse``
(Hugging Face ids; the choice does not affect training). We load a LOCAL copy only (a folder with
``config.json`` and weights, e.g. from ``huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir vae-ema``):
sampling and training never reach the network. Latents are ``posterior sample * 0.18215``.

``dit-fast extract-latents`` (``dit_fast.training.latents``) encodes an image folder once with it.

Loading is strict (diffusers' ``from_pretrained`` leaves weights it could not match at their initial values and only
logs it, which used to give NaN latents or black images): ``config.json`` must describe an ``AutoencoderKL``, every
weight must load (no missing, unexpected or mis-shaped keys; a common prefix is named), the weights must be finite,
and so must the first latents and the first decoded batch of every ``VAE`` (``check_finite``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from dit_fast.utils.datacheck import read_json_object
from dit_fast.utils.validation import UserError

SCALE_FACTOR = 0.18215
HF_VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_CLASS = "AutoencoderKL"


class VAE:
    """A loaded AutoencoderKL: ``encode_moments`` (images -> posterior mean/std), ``encode`` (-> scaled latent
    sample) and ``decode`` (scaled latents -> images in [-1, 1])."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = str(path)
        model = load_autoencoder(path)
        with _quiet_diffusers():  # diffusers' notes on casting, for a model we cast as a whole on purpose
            self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self._checked: set[str] = set()  # the outputs whose first batch was checked finite

    def _first(self, what: str, *tensors: torch.Tensor) -> None:
        if what not in self._checked:
            for t in tensors:
                check_finite(t, f"the first {what} of the VAE in {self.path}")
            self._checked.add(what)

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
        mean, std = dist.mean.float(), dist.std.float()
        self._first("latents", mean, std)
        return mean, std

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, 3, H, W) in [-1, 1] -> scaled latent sample (N, C, H/f, W/f), as the official training loop."""
        mean, std = self.encode_moments(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * eps) * SCALE_FACTOR

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents z (N, C, h, w) -> images (N, 3, h*f, w*f) float32, clamped to [-1, 1]."""
        images = self.model.decode((z / SCALE_FACTOR).to(self.device, self.dtype)).sample.float()
        self._first("decoded images", images)
        return images.clamp(-1, 1)


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor``, or UserError when it holds NaN or infinite values (``what`` names it: "the first latents of
    VAE vae/", ...)."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return tensor
    nan, total = int(torch.isnan(tensor).sum()), tensor.numel()
    inf = int((~finite).sum()) - nan
    raise UserError(f"{what} hold non-finite values ({nan} NaN, {inf} inf of {total}); the model's weights or inputs "
                    "are broken")


def check_finite_module(module: torch.nn.Module, what: str) -> None:
    """UserError naming the first parameter or buffer of ``module`` that holds NaN or inf."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{what}: weight {name} holds non-finite values ({int(torch.isnan(t).sum())} NaN)")


def read_model_config(folder: Path, what: str) -> dict:
    """``folder/config.json`` as a dict; UserError naming the file when it is missing or not a JSON object."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what} {folder} has no config.json (expected a diffusers {VAE_CLASS} folder, e.g. "
                                f"a local copy of {HF_VAE_IDS['ema']})")
    return read_json_object(path)


def _vae_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        hint = (f"; {str(path)!r} looks like a name, not a folder: download it first, e.g. `huggingface-cli download "
                f"{HF_VAE_IDS.get(str(path), HF_VAE_IDS['ema'])} --local-dir vae`" if not p.is_absolute() else "")
        raise FileNotFoundError(f"VAE folder {str(path)!r} does not exist{hint}")
    if not p.is_dir():
        raise UserError(f"--vae {path} is a file; give the folder holding config.json and the weights")
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        raise UserError(f"--vae {path} is a pipeline folder; pass its VAE, {p / 'vae'}")
    return p


def _examples(keys: list[str]) -> str:
    return ", ".join(sorted(keys)[:3]) + (", ..." if len(keys) > 3 else "")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' loading chatter (the accelerate notice, key lists) off: what matters is raised as one line."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_autoencoder() -> type[torch.nn.Module]:
    """diffusers' ``AutoencoderKL`` class. Importing it is most of a VAE's load (diffusers' package, ~2 s on a CPU),
    so ``dit-fast sample`` calls this on a second thread while the DiT's weights load."""
    from diffusers.models import AutoencoderKL

    return AutoencoderKL


def load_autoencoder(path: str | os.PathLike) -> torch.nn.Module:
    """diffusers ``AutoencoderKL`` from a local folder, loaded strictly (see the module docstring); eval mode."""
    if importlib.util.find_spec("diffusers") is None:
        raise ImportError("the VAE needs diffusers: pip install diffusers (or dit-fast[diffusers])")
    folder = _vae_folder(path)
    config = read_model_config(folder, "VAE folder")
    kind = config.get("_class_name")
    if kind != VAE_CLASS:
        raise UserError(f"--vae {path} holds a {kind or 'model without _class_name'} (config.json), not an "
                        f"{VAE_CLASS}; pass the VAE's folder (e.g. {HF_VAE_IDS['ema']})")
    try:
        with _quiet_diffusers():
            model, info = import_autoencoder().from_pretrained(str(folder), local_files_only=True,
                                                               output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the VAE in {folder}: {first}") from None
    problems = []
    for field, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                         ("mismatched_keys", "of the wrong shape")):
        keys = [k[0] if isinstance(k, tuple) else k for k in info.get(field, [])]
        if keys:
            problems.append(f"{len(keys)} weights {label} ({_examples(keys)})")
    if problems:
        unexpected = list(info.get("unexpected_keys", []))
        prefix = {k.split(".", 1)[0] for k in unexpected} if unexpected else set()
        hint = (f"; the file's keys carry the prefix {next(iter(prefix))!r}: strip it" if len(prefix) == 1
                and info.get("missing_keys") else "")
        raise UserError(f"the VAE weights in {folder} do not fit its {VAE_CLASS} config: " + "; ".join(problems)
                        + hint)
    check_finite_module(model, f"the VAE in {folder}")
    return model.eval()
