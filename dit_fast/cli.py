"""The ``dit-fast`` command: one entry point, one subcommand per task.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``main(args)``; this file
only maps names to modules, so adding a command is one line in ``COMMANDS``, and imports only the module of the
command it runs. ARCHITECTURE.md at the repository root lists where each command's code lives.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dit_fast import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dit_fast.config", "print the model zoo: depth, width, heads, patch, tokens, params, Gflops"),
    "env": ("dit_fast.env", "print installed attention/kernel backends and what auto picks on this machine"),
    "train": ("dit_fast.train", "train a DiT (no arguments: a small one on the built-in digits, in minutes on a CPU)"),
    "sample": ("dit_fast.sample", "sample a trained DiT into a PNG grid and an ADM-evaluator .npz"),
    "evaluate": ("dit_fast.metrics", "score samples: digits (class accuracy, Frechet distance), or FID/sFID/IS/"
                                     "precision/recall against an ADM reference batch (--ref)"),
    "extract-latents": ("dit_fast.vae", "encode an image folder once into memory-mapped VAE latents for training"),
    "convert": ("dit_fast.checkpoints", "convert checkpoints between official .pt / train.py, dit-fast and diffusers"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dit-fast`` parser; only ``command``'s module is imported (and its flags added), so that running one
    command never imports another's dependencies."""
    parser = argparse.ArgumentParser(prog="dit-fast", description="Fast, faithful Diffusion Transformers (DiT).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            p.description = (module.__doc__ or help_text).strip().splitlines()[0]
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.version:
        print(f"dit-fast {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
