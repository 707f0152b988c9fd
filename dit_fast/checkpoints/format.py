"""What a checkpoint is to dit-fast: the file names and formats, the error, and the one result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_fast.models.config import DiTConfig

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMATS = ("dit-fast", "official", "diffusers")
EMBEDDER_MISMATCH = ("per-block", "warn", "error")

DOWNLOAD_HINT = (
    "dit-fast never downloads weights; get them first:\n"
    "  official DiT-XL/2: https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt and "
    "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt\n"
    "  diffusers pipelines: huggingface-cli download facebook/DiT-XL-2-256 (or facebook/DiT-XL-2-512) "
    "--local-dir DIR, then pass DIR (the transformer is in DIR/transformer)\n"
    "  VAE: stabilityai/sd-vae-ft-ema or stabilityai/sd-vae-ft-mse"
)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit a DiT; the message says what is wrong and what to do."""


@dataclass
class Checkpoint:
    """Weights in the official key layout, the config they belong to, and (from load_checkpoint) the model.

    format is where they came from: "official" (bare .pt state dict), "train.py", "safetensors" (a bare state
    dict in a safetensors file), "dit-fast" or "diffusers". notes records every decision the reader took (how
    the config was found, which weights were taken, what was regenerated). model is the built model in eval
    mode (load_checkpoint; then state_dict is the model's own) or None (read_checkpoint: no model built).
    objective is the training objective the file stores ({"name": "ddpm" | "flow", ...its settings}, written by
    dit-fast train and carried by convert to the dit-fast format), or {} when it stores none (official .pt files,
    DiT's and SiT's alike: nothing in them says "flow").
    """

    state_dict: StateDict
    config: DiTConfig
    format: str
    source: Path
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None
    objective: dict[str, Any] = field(default_factory=dict)

    @property
    def numerics(self) -> str:
        """The numerics the weights (and the model) follow: "official" or "diffusers" (see DiTConfig)."""
        return self.config.numerics

    def summary(self) -> str:
        """One line per fact: source, format, config, numerics, then the reader's notes."""
        c = self.config
        lines = [
            f"source: {self.source} (format: {self.format})",
            f"config: depth {c.depth}, hidden {c.hidden_size}, heads {c.num_heads}, patch {c.patch_size}, "
            f"input {c.input_size}, in_channels {c.in_channels}, classes {c.num_classes} "
            f"(dropout {c.class_dropout_prob}), learn_sigma {c.learn_sigma}, mlp_ratio {c.mlp_ratio}",
            f"numerics: {c.numerics}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])
