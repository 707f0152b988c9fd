"""``dit-fast convert``: convert checkpoints between official .pt / train.py, dit-fast and diffusers."""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_fast.checkpoints import FORMATS, CheckpointError, convert
from dit_fast.commands.arguments import positive_int
from dit_fast.models.config import CONFIGS, NUMERICS
from dit_fast.utils.guard import Output, check_outputs
from dit_fast.utils.hardware import DTYPES
from dit_fast.utils.validation import check_output_dir, check_output_file


def _input_size_arg(text: str) -> int | tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    raise argparse.ArgumentTypeError(f"must be a latent size N or HxW (positive integers), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="official .pt, train.py checkpoint, dit-fast checkpoint, "
                                                   "diffusers model or pipeline folder")
    parser.add_argument("dst", metavar="DST", help="output: a folder (dit-fast, diffusers) or a file "
                                                   "(official .pt; dit-fast if it ends in .safetensors)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--numerics", choices=NUMERICS, default=None,
                        help="numerics stored in a dit-fast output (default: the source's; official for others)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help=f"zoo config name, gives num_heads for official weights: {', '.join(CONFIGS)}")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="attention heads (not visible in shapes)")
    parser.add_argument("--input-size", type=_input_size_arg, default=None, metavar="N|HxW",
                        help="latent size, for non-square pos_embed grids")
    parser.add_argument("--num-classes", type=positive_int, default=None, help="classes, without the null row")
    parser.add_argument("--use-model-weights", action="store_true",
                        help="train.py checkpoints: take 'model' instead of 'ema'")
    parser.add_argument("--allow-embedder-mismatch", action="store_true",
                        help="diffusers input whose per-block embedder copies differ: keep block 0's (lossy, one "
                             "shared pair as the official layout) instead of one embedder per block")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: as stored); a bf16 file is half the size and `dit-fast "
                             "sample` in bf16 loads it without a cast")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def main(args: argparse.Namespace) -> int:
    dst, src = Path(args.dst), Path(args.src)
    single_file = args.to == "official" or (args.to == "dit-fast" and dst.suffix == ".safetensors")
    kind = ("checkpoint" if args.to == "official" else "safetensors") if single_file else "files"
    check_outputs({"DST": Output(dst, kind)}, {"SRC": src}, overwrite=True)  # never SRC, nor inside or around it
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) if src.is_dir() else (
        src.stat().st_size if src.is_file() else 0)  # about the output's size; a missing SRC is reported below
    if single_file:
        check_output_file(dst, "DST", size_bytes=size, example="model.pt" if args.to == "official" else
                          "model.safetensors")
    else:
        check_output_dir(dst, "DST", size_bytes=size)
    ckpt = convert(
        args.src, dst, args.to, numerics=args.numerics, model_name=args.model, num_heads=args.num_heads,
        input_size=args.input_size, num_classes=args.num_classes, use_model_weights=args.use_model_weights,
        embedder_mismatch="warn" if args.allow_embedder_mismatch else "per-block",
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    print(ckpt.summary())
    print(f"wrote {dst} (format: {args.to})")
    if args.to == "diffusers":
        print("note: diffusers runs its own numerics (timestep divisor 127, MLP-norm eps 1e-5); load the folder with "
              "numerics='diffusers' to reproduce it, or the default official numerics to follow the paper")
    elif args.to == "official":
        print("note: the official format stores no config; loading it infers one (num_heads from the zoo, "
              "--model or --num-heads)")
    return 0
