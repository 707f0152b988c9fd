"""The ``dit-fast`` command: one entry point, one subcommand per task.

Each subcommand is a module of ``dit_fast.commands`` exposing ``add_arguments(parser)`` and ``main(args)``; this
file only maps names to modules, so adding a command is one line in ``COMMANDS``, and imports only the module of
the command it runs. Library code raises exceptions; this is the one place that turns them into messages and exit
statuses.

Errors, in one place (``main``): a bad option value is a usage error, one line and exit status 2; bad input or an
environment the user can fix (``ValueError``, ``OSError``, a missing optional package, CUDA out of memory) is one
line ``dit-fast COMMAND: message`` on stderr and exit status 1 (an error raised in a data-loading worker: the
worker's own message); a run stopped by Ctrl-C or SIGTERM exits 130 / 143: every command runs under
``lifecycle.terminate_as_interrupt``, so SIGTERM unwinds like Ctrl-C and partial outputs are removed on the way
(training saves a checkpoint first). Anything else is a bug and keeps its traceback; ``--debug`` (before or after
the command) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dit_fast import __version__
from dit_fast.utils.lifecycle import Terminated, terminate_as_interrupt, worker_message
from dit_fast.utils.validation import Interrupted

# name -> one-line help; the command NAME is the module dit_fast.commands.NAME (dashes as underscores).
COMMANDS: dict[str, str] = {
    "info": "print the model zoo: depth, width, heads, patch, tokens, params, Gflops",
    "env": "print installed attention/kernel backends and what auto picks on this machine",
    "train": "train a DiT (no arguments: a small one on the built-in digits, in minutes on a CPU)",
    "sample": "sample a trained DiT into a PNG grid and an ADM-evaluator .npz",
    "evaluate": "score samples: digits (class accuracy, Frechet distance), or FID/sFID/IS/precision/recall against "
                "an ADM reference batch (--ref)",
    "extract-latents": "encode an image folder once into memory-mapped VAE latents for training",
    "convert": "convert checkpoints between official .pt / train.py, dit-fast and diffusers",
}
# Errors the user can act on: bad values, files and folders, missing optional packages.
USER_ERRORS = (ValueError, OSError, ImportError)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``dit-fast train: argument --max-steps: must be ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of any error")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dit-fast`` parser; only ``command``'s module is imported (and its flags added), so that running one
    command never imports another's dependencies."""
    parser = Parser(prog="dit-fast", description="Fast, faithful Diffusion Transformers (DiT).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module_name = f"dit_fast.commands.{name.replace('-', '_')}"
            _add_debug(p)
            importlib.import_module(module_name).add_arguments(p)
            p.set_defaults(_module=module_name)
    return parser


def _describe(error: BaseException) -> str:
    """An error's message; a system OSError as "path: reason"; a data-loading worker's error as its own message."""
    if (message := worker_message(error)) is not None:
        return f"{message} (in a data-loading worker)"
    if isinstance(error, OSError) and error.strerror and len(error.args) >= 2:
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return f"{where}: {error.strerror}" if where else error.strerror
    return str(error)


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # loaded by every command that can run out of memory
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


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
    prefix, debug = f"dit-fast {args.command}", getattr(args, "debug", False)
    try:
        with terminate_as_interrupt():
            return int(importlib.import_module(args._module).main(args) or 0)
    except Terminated as e:  # SIGTERM outside training's loop: unwound like Ctrl-C, temporaries removed
        if debug:
            raise
        print(f"{prefix}: {e}; partial outputs were removed", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:  # the run saved its state first
        if debug:
            raise
        print(f"{prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (*USER_ERRORS, RuntimeError) as e:
        if debug or not (isinstance(e, USER_ERRORS) or _is_out_of_memory(e)):
            raise
        message = _describe(e)
        if _is_out_of_memory(e):
            message = f"out of memory ({message.splitlines()[0]}); lower --batch-size (or use --dtype bf16)"
        raise SystemExit(f"{prefix}: {message}") from None


if __name__ == "__main__":
    sys.exit(main())
