"""``dit-fast evaluate``: score samples.

A samples ``.npz`` (from ``dit-fast sample --npz``) of digits gets class accuracy and Fréchet distance
(``dit_fast.sampling.metrics``); with ``--ref REF.npz`` the ADM evaluator's FID, sFID, Inception Score, precision and
recall against a reference batch (``dit_fast.sampling.adm_eval``, InceptionV3 in PyTorch); ``--frechet A B`` gives
the Fréchet distance between two feature/statistics files (``.npz`` with ``mu`` and ``sigma``, as the ADM reference
batches, or a 2-D ``features``).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from dit_fast.commands.arguments import argument_type, positive_int
from dit_fast.sampling.adm_eval import BATCH_SIZE, INCEPTION_FILE, evaluate, open_npz_array
from dit_fast.sampling.frechet import frechet_distance
from dit_fast.sampling.metrics import check_npz, evaluate_digits, load_statistics
from dit_fast.utils.datacheck import npz_arrays
from dit_fast.utils.environment import device_name
from dit_fast.utils.validation import UserError

DIGITS_MAX_SIDE = 64  # digits samples are 8x8 (the built-in default) up to a few upsamplings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", nargs="?", default=None,
                        help="samples .npz from `dit-fast sample --npz` (arr_0 + labels): digits, or any "
                             "images with --ref")
    parser.add_argument("--frechet", nargs=2, metavar=("A", "B"), default=None,
                        help="Fréchet distance between two .npz files with mu/sigma or features")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    group = parser.add_argument_group("ADM metrics (FID, sFID, IS, precision, recall) with --ref")
    group.add_argument("--ref", default=None, metavar="REF.npz",
                       help="ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): score SAMPLES against it")
    group.add_argument("--inception-weights", default=None, metavar="PATH",
                       help=f"torch-fidelity InceptionV3 weights ({INCEPTION_FILE}; default: torch-fidelity's cache "
                            "under $TORCH_HOME/hub/checkpoints)")
    group.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="images per Inception batch")
    group.add_argument("--device", type=argument_type(device_name), default=None,
                       help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument("--progress", action="store_true", help="show a progress bar per file")


def score_digits(path: str) -> dict[str, float]:
    """Class accuracy and Fréchet distance of a digits samples ``.npz``. The images are checked to be digits (grey,
    at most ``DIGITS_MAX_SIDE`` px) from the array's header and first batch before the file is read whole: a colour
    or full-size set is refused (its metrics are ``--ref``'s)."""
    with open_npz_array(check_npz(path), "arr_0") as reader:
        shape, dtype = reader.shape, reader.dtype
        if dtype != np.uint8 or len(shape) != 4 or shape[1] != shape[2] or not 8 <= shape[1] <= DIGITS_MAX_SIDE:
            raise UserError(f"{path}: arr_0 must be digit samples (N, S, S, C) uint8 with 8 <= S <= "
                            f"{DIGITS_MAX_SIDE}, got {shape} {dtype}; score other data sets with --ref REF.npz")
        first = next(reader.batches(256), np.zeros((0, *shape[1:]), np.uint8))
    if shape[3] == 3 and not (first == first[..., :1]).all():
        raise UserError(f"{path}: arr_0 holds {shape[1]}x{shape[2]} colour images, not digit samples (grey); score "
                        "other data sets with --ref REF.npz")
    arrays = npz_arrays(path, ["arr_0", "labels"])
    return evaluate_digits(arrays["arr_0"], arrays["labels"])


def main(args: argparse.Namespace) -> int:
    """Score digit samples (class accuracy, Fréchet distance), samples against an ADM reference batch (``--ref``),
    or compare two feature statistics files."""
    if (args.samples is None) == (args.frechet is None):
        raise UserError("give a samples .npz, or --frechet A B")
    if args.ref is not None and args.samples is None:
        raise UserError("--ref needs a samples .npz to score against it")
    if args.ref is not None:
        result = evaluate(args.samples, args.ref, inception_weights=args.inception_weights,
                          batch_size=args.batch_size, device=args.device, progress=args.progress)
    elif args.frechet is not None:
        result = {"frechet": frechet_distance(*load_statistics(args.frechet[0]), *load_statistics(args.frechet[1]))}
    else:
        result = score_digits(args.samples)
    if not all(math.isfinite(v) for v in result.values()):
        raise UserError(f"the result holds NaN or inf ({result}); the inputs are degenerate")
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        for k, v in result.items():
            print(f"{k}: {v:.4f}")
    return 0
