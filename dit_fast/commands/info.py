"""``dit-fast info``: print the model zoo: depth, width, heads, patch, tokens, params, Gflops."""

from __future__ import annotations

import argparse
from typing import Any

from dit_fast.commands.arguments import int_arg
from dit_fast.models.config import CONFIGS, zoo_rows
from dit_fast.utils.validation import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"configs to show (default: all 12): {', '.join(CONFIGS)}")
    parser.add_argument("--image-size", type=int_arg(8), default=256,
                        help="image side in pixels; latent side = image/8")


def format_zoo(rows: list[dict[str, Any]]) -> str:
    """The rows of ``zoo_rows`` as a fixed-width table."""
    header = (f"{'name':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} "
              f"{'params':>9} {'Gflops':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['name']:<10} {r['depth']:>5} {r['hidden']:>6} {r['heads']:>5} {r['patch']:>5} {r['tokens']:>6} "
            f"{r['params'] / 1e6:>8.1f}M {r['gflops']:>8.2f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} is not a multiple of 8 (the VAE's factor)")
    rows = zoo_rows(args.names or None, input_size=args.image_size // 8)
    side, latent = args.image_size, args.image_size // 8
    print(f"DiT model zoo at {side}x{side} ({latent}x{latent}x4 latents); "
          "Gflops per image, multiply-add = 1 flop (paper convention)")
    print(format_zoo(rows))
    return 0
