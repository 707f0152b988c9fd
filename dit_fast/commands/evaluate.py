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

import numpy as np

from dit_fast.sampling.adm_eval import BATCH_SIZE, INCEPTION_FILE, evaluate
from dit_fast.sampling.frechet import frechet_distance
from dit_fast.sampling.metrics import check_npz, evaluate_digits, load_statistics
from dit_fast.utils.validation import UserError


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
    group.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per Inception batch")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    group.add_argument("--progress", action="store_true", help="show a progress bar per file")


def score_digits(path: str) -> dict[str, float]:
    """Class accuracy and Fréchet distance of a digits samples ``.npz``."""
    with np.load(check_npz(path)) as f:
        if "arr_0" not in f or "labels" not in f:
            raise UserError(f"{path!r} needs 'arr_0' (N, 8, 8, C) uint8 and 'labels' (N,); it has {sorted(f.files)}")
        images, labels = f["arr_0"], f["labels"]
    square = images.ndim == 4 and images.shape[1] == images.shape[2] >= 8
    if images.dtype != np.uint8 or not square:
        raise UserError(f"{path!r}: arr_0 must be digit images (N, S, S, C) uint8, S >= 8, got {images.shape} "
                        f"{images.dtype} (other data sets: --ref REF.npz, the ADM metrics)")
    return evaluate_digits(images, labels)


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
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v:.4f}")
    return 0
