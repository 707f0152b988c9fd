"""Fixed cost of ``dit-fast sample``: seconds from a fresh process to the first sampling step, per checkpoint format.

``python -m benchmarks.time_to_first_step`` writes a random-weights DiT-XL/2 checkpoint as an official-layout ``.pt``
and as ``.safetensors`` (to ``--dir``, default a temporary folder), then for each format and dtype starts a fresh
Python process that runs ``dit-fast sample``'s own imports and ``load_networks`` (read the checkpoint, build the
model on the meta device and assign the weights, cast once to the sampling dtype, check the weights are finite,
load the VAE, a randomly initialised sd-vae-ft ``AutoencoderKL`` saved to the same folder, with diffusers imported
on a second thread meanwhile) and prints the time of each part. "To first step" runs from the spawn (the
interpreter's start included) to both networks in place; "wall" runs to the process's exit, which adds the
teardown. Checkpoint files come from the page cache after the first read (the first format's first run reads them
from disk: run it twice to see both).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.image_latency import random_vae
from dit_fast.models.config import get_config

CHILD = """
import time, sys
t0 = time.perf_counter()
import argparse
import torch
from dit_fast.commands import sample
from dit_fast.utils.distributed import Dist
t1 = time.perf_counter()
parser = argparse.ArgumentParser()
sample.add_arguments(parser)
args = parser.parse_args(["--ckpt", {path!r}, "--model", {config!r}, "--vae", {vae!r}, "--dtype", {dtype!r}])
model, vae, _, _ = sample.load_networks(args, Dist(0, 1, 0, torch.device("cpu")))
t2 = time.perf_counter()
assert next(model.parameters()).dtype == {{"fp32": torch.float32, "bf16": torch.bfloat16}}[{dtype!r}]
print(f"{{time.time() - float(sys.argv[1]):.2f}} {{t1 - t0:.2f}} {{t2 - t1:.2f}}", flush=True)
"""


def write_checkpoints(folder: Path, config: str) -> dict[str, Path]:
    """A random-weights ``config`` (seeded paper init, no zero layers) as ``model.pt`` and ``model.safetensors``, and
    in bf16 as ``model-bf16.safetensors`` (what ``dit-fast convert --dtype bf16`` writes)."""
    from safetensors.torch import save_file

    from dit_fast.reference import DiT_models

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = DiT_models[config]().state_dict()
    state = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}
    paths = {"pt": folder / "model.pt", "safetensors": folder / "model.safetensors",
             "safetensors, bf16 file": folder / "model-bf16.safetensors"}
    torch.save(state, paths["pt"])
    save_file(state, str(paths["safetensors"]))
    save_file({k: v.bfloat16() for k, v in state.items()}, str(paths["safetensors, bf16 file"]))
    return paths


def run_child(path: Path, config: str, dtype: str, vae: Path) -> tuple[float, float, float, float]:
    """(ready s, wall s, import s, load s) of one fresh process loading ``path`` in ``dtype`` and the VAE ``vae``
    through ``dit-fast sample``'s own ``load_networks``: ready = from the spawn to both networks in place (the first
    step could start), wall = to the process's exit (which adds the teardown)."""
    code = CHILD.format(path=str(path), config=config, dtype=dtype, vae=str(vae))
    start, spawned = time.perf_counter(), time.time()
    out = subprocess.run([sys.executable, "-c", code, repr(spawned)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    wall = time.perf_counter() - start
    ready, imports, load = (float(v) for v in out.stdout.split()[-3:])
    return ready, wall, imports, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_first_step", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="DiT-XL/2")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per format and dtype (the best is reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = write_checkpoints(Path(tmp), args.config)
        vae = Path(tmp) / "vae"
        random_vae(str(vae), 8 * get_config(args.config).input_size)  # the sd-vae-ft AutoencoderKL, 8x down
        sizes = {fmt: p.stat().st_size / 1e9 for fmt, p in paths.items()}
        print(f"{args.config} random weights; load average {os.getloadavg()[0]:.2f}")
        print("| format | dtype | file GB | to first step s | wall s (to exit) | imports s | DiT read + build + cast, "
              "VAE load s |\n|---|---|---|---|---|---|---|")
        for fmt, path in paths.items():
            for dtype in ("bf16",) if "bf16" in fmt else ("fp32", "bf16"):
                runs = [run_child(path, args.config, dtype, vae) for _ in range(args.repeats)]
                ready, wall, imports, load = min(runs)
                print(f"| {fmt} | {dtype} | {sizes[fmt]:.2f} | {ready:.2f} | {wall:.2f} | {imports:.2f} | {load:.2f} |",
                      flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
