"""``dit-fast train``: train a DiT (no arguments: a small one on the built-in digits, in minutes on a CPU).

One flag per ``TrainConfig`` field (``dit_fast.training.config``), in its group; the loop is
``dit_fast.training.trainer.Trainer``. Multi-GPU: ``torchrun --nproc_per_node 8 -m dit_fast.cli train ...``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from dit_fast.commands.arguments import argument_type
from dit_fast.kernels.registry import check_environment as check_kernels_environment
from dit_fast.models.attention import check_environment as check_attention_environment
from dit_fast.models.fp8 import fp8_unavailable_reason
from dit_fast.training.config import TrainConfig
from dit_fast.training.trainer import Trainer, evaluate_digits_run
from dit_fast.utils.distributed import cleanup, setup_distributed
from dit_fast.utils.guard import Output, check_outputs
from dit_fast.utils.validation import UserError, check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, in its group (the field's metadata holds the flag's options)."""
    parser.register("action", "boolean_optional", argparse.BooleanOptionalAction)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        kwargs = dict(f.metadata)
        group = kwargs.pop("group")
        if "type" in kwargs:
            kwargs["type"] = argument_type(kwargs["type"])
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **kwargs)


def main(args: argparse.Namespace) -> int:
    """Train a DiT (with no arguments: a small one on the built-in digits, then sample and score it)."""
    requested = TrainConfig.from_args(args)
    cfg = requested.resolved()
    if cfg.eval and cfg.data_path is not None:
        raise UserError("--eval scores the built-in digits only; for other data run `dit-fast sample --npz` and the "
                        "ADM evaluator")
    check_attention_environment()
    check_kernels_environment()
    check_outputs({"--results-dir": Output(cfg.results_dir, "files")}, {"--data-path": cfg.data_path,
                                                                        "--vae": cfg.vae})
    check_output_dir(cfg.results_dir, "--results-dir")
    try:
        d = setup_distributed(cfg.device)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    if cfg.threads is not None and d.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if cfg.fp8 and (reason := fp8_unavailable_reason(d.device)) is not None:
        cleanup(d)
        raise UserError(reason)  # before the data and the model are built
    trainer, finished = None, False
    try:
        trainer = Trainer(requested, d)
        trainer.run()
        if cfg.data_path is None and cfg.eval and d.is_main:
            evaluate_digits_run(trainer)
        finished = True
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # the sharded model and optimizer go before the process group (cleanup collects them)
        cleanup(d, finished=finished)
    return 0
