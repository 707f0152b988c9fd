"""Model configurations: the ``DiTConfig`` dataclass, the paper's 12 named configs, Gflops and parameter counts.

Print the zoo with ``dit-fast info`` (``dit_fast.commands.info``; e.g. ``dit-fast info DiT-XL/2 --image-size 512``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

NUMERICS = ("official", "diffusers")


@dataclass(frozen=True)
class DiTConfig:
    """Every hyper-parameter of a DiT; ``asdict(config)`` is what checkpoints store.

    ``input_size`` is the latent side (``image_size // 8`` for the SD VAE), an int or ``(height, width)``.
    ``numerics`` selects the two constants in which diffusers' port differs from the official code:
    "official" (timestep frequencies ``exp(-ln(1e4) * i / 128)``, MLP-branch LayerNorm eps 1e-6) or
    "diffusers" (divisor 127, eps 1e-5). ``per_block_conditioning`` gives every block its own timestep and label
    embedder (``t_embedder.{i}``, ``y_embedder.{i}``; the final layer uses block 0's), the layout of a DiT built or
    trained in diffusers, whose copies differ; False (the default) is the paper's one shared pair.
    """

    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    numerics: str = "official"
    per_block_conditioning: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.input_size, list):
            object.__setattr__(self, "input_size", tuple(self.input_size))
        h, w = self.grid_input
        problems = []
        for name in ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if h < 1 or w < 1:
            problems.append(f"input_size={self.input_size} must be positive")
        elif self.patch_size >= 1 and (h % self.patch_size or w % self.patch_size):
            problems.append(f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos positions)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.numerics not in NUMERICS:
            problems.append(f"numerics={self.numerics!r} must be one of {NUMERICS}")
        if problems:
            raise ValueError("invalid DiTConfig: " + "; ".join(problems))

    @property
    def grid_input(self) -> tuple[int, int]:
        """Latent (height, width)."""
        s = self.input_size
        return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (height, width) = latent size / patch."""
        h, w = self.grid_input
        return h // self.patch_size, w // self.patch_size

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["input_size"], tuple):
            d["input_size"] = list(d["input_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> DiTConfig:
        return replace(self, **changes)


# The paper's Table 1 sizes x patch sizes 2, 4, 8.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
    for size, (depth, hidden, heads) in _SIZES.items()
    for p in (2, 4, 8)
}


def get_config(name: str, **overrides: Any) -> DiTConfig:
    """The named config (``"DiT-XL/2"``; ``"DiT-XL-2"`` is accepted too, and SiT's names, ``"SiT-XL/2"``: SiT's
    models are DiT's architecture and sizes) with ``overrides`` applied."""
    key = name.removeprefix("SiT-")
    key = "DiT-" + key if key != name else name
    key = key.replace("DiT-XL-", "DiT-XL/").replace("DiT-L-", "DiT-L/").replace("DiT-B-", "DiT-B/")
    key = key.replace("DiT-S-", "DiT-S/")
    if key not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; valid names: {', '.join(CONFIGS)}")
    return replace(CONFIGS[key], **overrides)


def _as_config(model: Any) -> DiTConfig:
    if isinstance(model, DiTConfig):
        return model
    if isinstance(model, str):
        return get_config(model)
    config = getattr(model, "config", None)
    if isinstance(config, DiTConfig):
        return config
    raise TypeError(f"expected a config name, a DiTConfig or a DiT module, got {type(model).__name__}")


def gflops(model: Any, input_size: int | tuple[int, int] | None = None) -> float:
    """Forward cost of one image in the paper's convention, in Gflops.

    A multiply-add counts as ONE flop (the paper's Table 4 convention; multiply by 2 for hardware FLOPs). Counted:
    patch embedding, timestep MLP, every adaLN projection, the qkv/proj/MLP linears and both attention matmuls
    (QK^T and AV), the final adaLN and linear. Norms, activations, softmax, the label lookup and the VAE are not.

    ``model`` is a config name ("DiT-XL/2"), a ``DiTConfig`` or a module with a ``.config``. ``input_size`` is the
    latent side (32 for 256x256 images, 64 for 512x512); ``None`` takes the config's own.
    """
    cfg = _as_config(model)
    if input_size is not None:
        cfg = cfg.replace(input_size=input_size)
    d, t, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
    patch_embed = t * (cfg.in_channels * p * p) * d
    t_embed = (256 * d + d * d) * (cfg.depth if cfg.per_block_conditioning else 1)
    per_block = (
        6 * d * d  # adaLN-Zero modulation (once per image)
        + t * 3 * d * d  # fused qkv
        + 2 * t * t * d  # QK^T and AV over all heads
        + t * d * d  # attention output projection
        + 2 * t * d * cfg.mlp_hidden  # MLP fc1 + fc2
    )
    final = 2 * d * d + t * d * p * p * cfg.out_channels
    macs = patch_embed + t_embed + cfg.depth * per_block + final
    return macs / 1e9


def param_count(model: Any) -> int:
    """Number of trainable parameters (the fixed ``pos_embed`` table excluded).

    Computed from the config, so it is exact for the reference layout without building the model.
    """
    cfg = _as_config(model)
    d, p = cfg.hidden_size, cfg.patch_size
    linear = lambda i, o: i * o + o  # noqa: E731
    patch_embed = cfg.in_channels * p * p * d + d
    embedders = cfg.depth if cfg.per_block_conditioning else 1
    t_embed = (linear(256, d) + linear(d, d)) * embedders
    y_embed = (cfg.num_classes + int(cfg.class_dropout_prob > 0)) * d * embedders
    block = linear(d, 3 * d) + linear(d, d) + linear(d, cfg.mlp_hidden) + linear(cfg.mlp_hidden, d) + linear(d, 6 * d)
    final = linear(d, 2 * d) + linear(d, p * p * cfg.out_channels)
    return patch_embed + t_embed + y_embed + cfg.depth * block + final


def zoo_rows(names: list[str] | None = None, input_size: int = 32) -> list[dict[str, Any]]:
    """One dict per config: name, depth, hidden, heads, patch, tokens, params, gflops."""
    rows = []
    for name in names or list(CONFIGS):
        cfg = get_config(name, input_size=input_size)
        rows.append({
            "name": name,
            "depth": cfg.depth,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_heads,
            "patch": cfg.patch_size,
            "tokens": cfg.num_tokens,
            "params": param_count(cfg),
            "gflops": gflops(cfg),
        })
    return rows
