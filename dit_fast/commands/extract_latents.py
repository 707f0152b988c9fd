"""``dit-fast extract-latents``: encode an image folder once into memory-mapped VAE latents for training."""

from __future__ import annotations

import argparse

import torch

from dit_fast.commands.arguments import argument_type, non_negative_int, positive_int
from dit_fast.models.vae import HF_VAE_IDS, VAE
from dit_fast.training.latents import extract_latents
from dit_fast.utils.environment import device_name
from dit_fast.utils.files import sweep_stale_temps
from dit_fast.utils.guard import Output, check_outputs
from dit_fast.utils.validation import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-path", required=True, help="image folder in the ImageNet layout: root/<class>/<image>")
    parser.add_argument("--output", required=True, help="latent folder to create (must not exist)")
    parser.add_argument("--vae", required=True,
                        help=f"LOCAL folder of a diffusers AutoencoderKL (e.g. {HF_VAE_IDS['ema']} or "
                             f"{HF_VAE_IDS['mse']} downloaded with huggingface-cli)")
    parser.add_argument("--image-size", type=positive_int, default=256, help="pixel side after the ADM centre crop")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call (each encoded twice)")
    parser.add_argument("--num-workers", type=non_negative_int, default=4, help="data-loading worker processes")
    parser.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32",
                        help="dtype of the stored mean/std (float16 halves the file; float32 is exact)")
    parser.add_argument("--device", type=argument_type(device_name), default="cuda" if torch.cuda.is_available() else
                        "cpu", help="cpu, cuda or cuda:N")


def main(args: argparse.Namespace) -> int:
    """Encode ``--data-path`` with the VAE into one memory-mapped latent folder for ``dit-fast train``."""
    check_outputs({"--output": Output(args.output, "folder")}, {"--data-path": args.data_path, "--vae": args.vae})
    check_output_dir(args.output, "--output", must_not_exist=True)
    sweep_stale_temps(args.output)  # a killed extraction's half-written folder
    vae = VAE(args.vae, device=args.device)
    out = extract_latents(args.data_path, vae, args.output, args.image_size, batch_size=args.batch_size,
                          num_workers=args.num_workers, storage_dtype=args.storage_dtype)
    print(f"wrote {out} (train with: dit-fast train --data-path {out})")
    return 0
