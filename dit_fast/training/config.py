"""``TrainConfig``: every setting of a training run, one field per ``dit-fast train`` flag, and the two recipes.

The CLI fills a ``TrainConfig`` from its flags (``--global-batch-size`` is ``global_batch_size``;
``dit_fast.commands.train`` builds the parser from the fields, so a setting is declared once). A field left ``None``
takes its value from a recipe, a preset of the config: ``DIGITS_RECIPE`` (no ``--data-path``: a 0.3M-parameter DiT on
the built-in 8x8 digits that trains in minutes on a CPU) or ``OFFICIAL_RECIPE`` (the paper's: DiT-XL/2, AdamW lr 1e-4,
no weight decay, global batch 256, EMA 0.9999). ``TrainConfig.resolved()`` applies it; in Python::

    cfg = TrainConfig(data_path="latents/", model="DiT-B/2", max_steps=1000).resolved()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from dit_fast.models.config import CONFIGS, DiTConfig, get_config
from dit_fast.utils.environment import device_name
from dit_fast.utils.validation import SEED_MAX, float_range, int_range, non_negative_int, positive_float, positive_int

# The built-in default: a small DiT on the 8x8 digits, and a recipe that trains it well in minutes on a CPU.
# Small and many steps beats wide and few here: in 180 s of CPU time width 64 made 5,338 steps where width 128 made
# 851, with far better samples (benchmarks/results/digits_default.md). One CPU thread: these matmuls are too small
# to split, and extra threads collapse on a shared CPU.
DIGITS_MODEL = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=2,
                         num_classes=10)
DIGITS_RECIPE: dict[str, Any] = {
    "global_batch_size": 32, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999, "ema_warmup": True,
    "max_steps": 8000, "epochs": 1000, "log_every": 500, "ckpt_every": 2000, "image_size": 8, "threads": 1,
    "impl": "fast", "eval": True}
OFFICIAL_RECIPE: dict[str, Any] = {
    "global_batch_size": 256, "lr": 1e-4, "warmup_steps": 0, "ema_decay": 0.9999, "ema_warmup": False,
    "max_steps": None, "epochs": 1400, "log_every": 100, "ckpt_every": 50_000, "image_size": 256, "threads": None,
    "impl": "fast", "eval": False}

_DATA, _OPT = "data and model (official flag names)", "optimisation"
TIME_SAMPLING_HELP = ("training time distribution: uniform (default) or lognormal[:M:S], the logit-normal noise level "
                      "sigmoid(M + S n) of SD3 / LightningDiT (default M 0, S 1), for either objective")
_OBJ = "objective (DDPM as DiT, or flow matching as SiT)"
_PERF, _LOG = "performance", "logging, checkpoints, evaluation"


def _flag(group: str, default: Any = None, help: str | None = None, **flag_options: Any) -> Any:
    """A field that is also the flag ``--<name-with-dashes>`` in ``group``. ``flag_options`` are argparse's keywords
    (``dit_fast.commands.train`` builds the flags): ``type`` a parser raising ValueError (``TrainConfig.check``
    runs it too), ``action="boolean_optional"`` a ``--x/--no-x`` pair."""
    return field(default=default, metadata={"group": group, "help": help, **flag_options})


def time_sampling_spec(text: str) -> str:
    """The parser of ``--time-sampling`` (checked here without torch; ``dit_fast.diffusion.TimeSampling`` reads
    it): ``uniform``, ``lognormal`` or ``lognormal:M:S`` with S > 0; ValueError otherwise."""
    parts = text.strip().split(":")
    if parts == ["uniform"] or parts == ["lognormal"]:
        return parts[0]
    if parts[0] == "lognormal" and len(parts) == 3:
        try:
            m, s = float(parts[1]), float(parts[2])
        except ValueError:
            m = s = float("nan")
        if math.isfinite(m) and math.isfinite(s) and s > 0:
            return f"lognormal:{m:g}:{s:g}"
    raise ValueError(f"{text!r}: expected uniform, lognormal or lognormal:M:S (finite M, S > 0)")


@dataclass
class TrainConfig:
    """Every setting of ``dit-fast train`` (see the flags' help); ``None`` fields come from the recipe."""

    data_path: str | None = _flag(_DATA, help="image folder (ImageNet layout, needs --vae) or a latent folder from "
                                  "`dit-fast extract-latents`; default: the built-in digits")
    results_dir: str = _flag(_DATA, "results", "experiment folders NNN-<model> are created here")
    model: str | None = _flag(_DATA, help="model config (default: DiT-XL/2, or a 0.3M-parameter DiT for the "
                              "built-in digits)", choices=list(CONFIGS))
    image_size: int | None = _flag(_DATA, help="pixel side (default 256; 8 for the digits)", type=positive_int)
    num_classes: int | None = _flag(_DATA, help="default: the number of classes in the data", type=positive_int)
    vae: str | None = _flag(_DATA, help="LOCAL diffusers AutoencoderKL folder, for image-folder data")
    hidden_size: int | None = _flag(_DATA, help="override the model's width", type=positive_int)
    depth: int | None = _flag(_DATA, help="override the model's number of blocks", type=positive_int)
    num_heads: int | None = _flag(_DATA, help="override the model's attention heads", type=positive_int)
    patch_size: int | None = _flag(_DATA, help="override the model's patch side", type=positive_int)
    num_workers: int = _flag(_DATA, 4, "data-loading worker processes (image folders)", type=non_negative_int)

    epochs: int | None = _flag(_OPT, help="default 1400 (official); 1000 for the digits", type=positive_int)
    max_steps: int | None = _flag(_OPT, help="stop after this many steps (default: the epochs' worth; 8000 for the "
                                  "digits)", type=positive_int)
    global_batch_size: int | None = _flag(_OPT, help="default 256 (official); 32 for the digits", type=positive_int)
    lr: float | None = _flag(_OPT, help="AdamW learning rate (default 1e-4; 2e-3 for the digits)", type=positive_float)
    warmup_steps: int | None = _flag(_OPT, help="linear LR warm-up steps (default 0; 100 digits)",
                                     type=non_negative_int)
    weight_decay: float = _flag(_OPT, 0.0, type=float_range(0.0))
    ema_decay: float | None = _flag(_OPT, help="default 0.9999 (official); 0.999 for the digits",
                                    type=float_range(0.0, 1.0))
    ema_warmup: bool | None = _flag(_OPT, help="EMA decay min(decay, (1+step)/(10+step)), for short runs (default: "
                                    "on for the digits)", action="boolean_optional")
    max_grad_norm: float | None = _flag(_OPT, help="clip the gradient norm (default: no clipping)", type=positive_float)
    diffusion_steps: int = _flag(_OPT, 1000, type=positive_int)
    global_seed: int = _flag(_OPT, 0, f"0..{SEED_MAX}", type=int_range(0, SEED_MAX))

    objective: str = _flag(_OBJ, "ddpm", "ddpm: DiT's Gaussian diffusion (eps + learned sigma); flow: SiT's "
                           "flow matching (the model predicts --prediction along --path-type; no learned sigma)",
                           choices=["ddpm", "flow"])
    path_type: str = _flag(_OBJ, "Linear", "flow path (SiT's names)", choices=["Linear", "GVP", "VP"])
    prediction: str = _flag(_OBJ, "velocity", "what a flow model predicts", choices=["velocity", "score", "noise"])
    loss_weight: str = _flag(_OBJ, "none", "flow loss weighting of score/noise prediction (SiT's)",
                             choices=["none", "velocity", "likelihood"])
    train_eps: float | None = _flag(_OBJ, help="flow: keep training times in [eps, 1 - eps] (default: SiT's, 0 for "
                                    "velocity on Linear/GVP, else 1e-3; VP 1e-5)", type=float_range(0.0, 0.499))
    sample_eps: float | None = _flag(_OBJ, help="flow: the same for sampling, stored in the checkpoint (default: "
                                     "SiT's, 0 for velocity on Linear/GVP, else 1e-3)", type=float_range(0.0, 0.499))
    time_sampling: str = _flag(_OBJ, "uniform", TIME_SAMPLING_HELP, type=time_sampling_spec)

    device: str | None = _flag(_PERF, help="cpu, cuda or cuda:N (default: cuda when available)", type=device_name)
    dtype: str | None = _flag(_PERF, help="autocast dtype (default: bf16 on GPU, fp32 on CPU); weights and optimizer "
                              "stay fp32", choices=["fp32", "bf16"])
    compile: bool = _flag(_PERF, False, "torch.compile the model", action="store_true")
    threads: int | None = _flag(_PERF, help="CPU threads for tensor ops (default: 1 for the small digits model, "
                                "whose matmuls are too small to split; else PyTorch's)", type=positive_int)
    impl: str | None = _flag(_PERF, help="DiTFast (fused kernels, the default) or the plain reference model",
                             choices=["fast", "reference"])
    attention: str = _flag(_PERF, "auto", "attention backend of the fast model")
    kernels: str = _flag(_PERF, "auto", "kernel backend of the fast model")
    grad_checkpointing: str = _flag(_PERF, "none", "activation checkpointing of the blocks: none; full (recompute each "
                                    "block in the backward; the flag alone means full); selective (keep the GEMM and "
                                    "attention outputs, recompute norms, GELU and residuals)", nargs="?", const="full",
                                    choices=["none", "full", "selective"])
    fp8: bool = _flag(_PERF, False, "FP8 (torchao float8 rowwise) for the blocks' linears; Ada/Hopper GPUs",
                      action="store_true")
    fsdp: bool = _flag(_PERF, False, "shard parameters, gradients and optimizer state (FSDP2)", action="store_true")

    log_every: int | None = _flag(_LOG, help="default 100 (500 for the digits)", type=positive_int)
    ckpt_every: int | None = _flag(_LOG, help="default 50000 (2000 for the digits)", type=positive_int)
    keep_last: int = _flag(_LOG, 3, "checkpoints kept (older ones are deleted)", type=positive_int)
    resume: str | None = _flag(_LOG, help="'auto' (newest checkpoint under --results-dir, if any), an experiment "
                               "folder or a .pt")
    no_progress: bool = _flag(_LOG, False, "no progress bar", action="store_true")
    eval: bool | None = _flag(_LOG, help="after training the digits: sample, write a grid, report accuracy and "
                              "Frechet distance", action="boolean_optional")
    eval_samples: int = _flag(_LOG, 1000, "digits evaluation: samples (classes cycle; at least 2)", type=int_range(2))
    eval_cfg_scale: float = _flag(_LOG, 2.0, "digits evaluation: guidance scale", type=float_range(1.0))
    eval_sampler: str | None = _flag(_LOG, help="digits evaluation sampler (default: ddpm; ode-heun for flow)",
                                     choices=["ddpm", "ddim", "dpm++", "ode-euler", "ode-heun", "ode-dopri5", "sde"])
    eval_steps: int | None = _flag(_LOG, help="digits evaluation sampling steps (default: 100; 26 time points, 50 "
                                   "network evaluations, for ode-heun)", type=positive_int)

    @property
    def recipe(self) -> dict[str, Any]:
        """The preset this run's unset fields come from: the digits recipe without --data-path, else the official."""
        return DIGITS_RECIPE if self.data_path is None else OFFICIAL_RECIPE

    def resolved(self) -> TrainConfig:
        """A copy with every unset (None) recipe field filled from ``recipe`` (an explicit ``epochs`` without
        ``max_steps`` is the budget: no step limit)."""
        filled = {k: v for k, v in self.recipe.items() if getattr(self, k) is None}
        if self.epochs is not None and self.max_steps is None:
            filled["max_steps"] = None
        return replace(self, **filled).check()

    def check(self) -> TrainConfig:
        """``self``, or a ValueError naming a field outside its range: the range of its flag, which the command
        line checks when it parses (``dit_fast.utils.validation``)."""
        for f in fields(self):
            parse, value = f.metadata.get("type"), getattr(self, f.name)
            if parse is not None and value is not None:
                try:
                    parse(str(value))
                except ValueError as e:
                    raise ValueError(f"TrainConfig {f.name}: {e}") from None
        ddpm_eval = self.eval and self.objective == "ddpm" and self.eval_steps is not None
        if ddpm_eval and self.eval_steps > self.diffusion_steps:
            raise ValueError(f"--eval-steps {self.eval_steps} is more than the {self.diffusion_steps} diffusion steps "
                             "(--diffusion-steps)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        """The config of parsed ``dit-fast train`` flags (any object with one attribute per field)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def model_config(self, in_channels: int, input_size: int | tuple[int, int], data_classes: int) -> DiTConfig:
        """The model config: ``model`` (default DiT-XL/2, or the small digits DiT) fitted to the data's channels,
        model input size (pixels or latents) and classes (``num_classes``, at least the data's)."""
        num_classes = self.num_classes if self.num_classes is not None else data_classes
        if num_classes < data_classes:
            raise ValueError(f"--num-classes {num_classes} is smaller than the {data_classes} classes of the data")
        if isinstance(input_size, tuple) and input_size[0] == input_size[1]:
            input_size = input_size[0]
        overrides = {name: getattr(self, name) for name in ("hidden_size", "depth", "num_heads", "patch_size")
                     if getattr(self, name) is not None}
        base = DIGITS_MODEL if self.model is None and self.data_path is None else get_config(self.model or "DiT-XL/2")
        if self.objective == "flow":
            overrides["learn_sigma"] = False  # a flow model predicts one C-channel field, no variance
        return base.replace(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides)
