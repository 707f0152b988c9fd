"""Unit tests of the mechanisms behind "nothing a user owns is overwritten, no hang, no silent garbage": the output
guard, the run-folder lock and layout, temporaries (naming, sweeping, full disks), strict VAE loading, dataset
checks, worker processes and signals, and the distributed environment. The commands' use of them is covered in
tests/test_faults.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.utils.datacheck import npz_arrays, open_npy, read_image, read_latent_meta, scan_image_folder
from dit_fast.utils.environment import DistEnv, check_memory, device_name, read_dist_env
from dit_fast.utils.files import DiskFull, atomic_save, atomic_write, preallocate, sweep_stale_temps, temp_path
from dit_fast.utils.guard import Output, check_outputs, describe_file, image_format
from dit_fast.utils.lifecycle import Terminated, terminate_as_interrupt, worker_errors, worker_message
from dit_fast.utils.runlock import RunLock, discard_if_empty, run_folder_of
from dit_fast.utils.validation import UserError
from tests.helpers import ROOT

# ---------------------------------------------------------------------------------------------------- guard


@pytest.fixture
def owned(tmp_path: Path) -> dict[str, Path]:
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    grid = tmp_path / "old.png"
    Image.new("RGB", (4, 4)).save(grid)
    npz = tmp_path / "old.npz"
    np.savez(npz, arr_0=np.zeros((1, 4, 4, 3), np.uint8), labels=np.zeros(1))
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    return {"ckpt": ckpt, "grid": grid, "npz": npz, "data": data, "notes": tmp_path / "notes.txt"}


def test_describe_file(owned):
    assert describe_file(owned["ckpt"]) == "a PyTorch checkpoint"
    assert describe_file(owned["grid"]) == "a PNG image"
    assert describe_file(owned["npz"]) == "an .npz of samples"
    assert describe_file(owned["data"]) == "a folder"
    assert describe_file(owned["notes"]) == "a file"


@pytest.mark.parametrize("option", ["--out", "--npz"])
def test_output_equal_to_input_is_refused(owned, option):
    kind = "image" if option == "--out" else "npz"
    with pytest.raises(UserError, match=rf"^{option} \S+model\.pt is the input --ckpt \S+model\.pt; writing it"):
        check_outputs({option: Output(owned["ckpt"], kind)}, {"--ckpt": owned["ckpt"]}, overwrite=True)


def test_output_through_a_link_is_the_same_file(owned, tmp_path):
    link = tmp_path / "link.pt"
    link.symlink_to(owned["ckpt"])
    with pytest.raises(UserError, match="is the input --ckpt"):
        check_outputs({"--out": Output(link, "image")}, {"--ckpt": owned["ckpt"]}, overwrite=True)


def test_two_outputs_that_are_one_file(tmp_path):
    with pytest.raises(UserError, match=r"^--out and --npz are the same file"):
        check_outputs({"--out": Output(tmp_path / "x.png", "image"), "--npz": Output(tmp_path / "x.png", "npz")}, {})


def test_output_inside_an_input_folder_and_folder_holding_an_input(owned):
    with pytest.raises(UserError, match="lies inside the input --data-path"):
        check_outputs({"--output": Output(owned["data"] / "latents", "folder")}, {"--data-path": owned["data"]})
    with pytest.raises(UserError, match="holds the input --data-path"):
        check_outputs({"--output": Output(owned["data"].parent, "folder")}, {"--data-path": owned["data"]})


def test_existing_files_are_replaced_only_when_this_command_wrote_them(owned):
    check_outputs({"--out": Output(owned["grid"], "image"), "--npz": Output(owned["npz"], "npz")}, {})
    with pytest.raises(UserError, match=r"exists and is a PyTorch checkpoint, not an image this command writes; pass "
                                        r"--overwrite"):
        check_outputs({"--out": Output(owned["ckpt"], "image")}, {})
    with pytest.raises(UserError, match="is a file, not an .npz of samples"):
        check_outputs({"--npz": Output(owned["notes"], "npz")}, {})
    check_outputs({"--out": Output(owned["ckpt"], "image")}, {}, overwrite=True)  # the user said so
    with pytest.raises(UserError, match="exists"):
        check_outputs({"--output": Output(owned["data"], "folder")}, {})


def test_name_longer_than_name_max(tmp_path):
    with pytest.raises(UserError, match="longer than the 255 this file system allows"):
        check_outputs({"--out": Output(tmp_path / ("x" * 300 + ".png"), "image")}, {})


def test_image_format_by_suffix():
    assert image_format("a.png") == "PNG" and image_format("a.JPG") == "JPEG" and image_format("a.webp") == "WEBP"
    with pytest.raises(UserError, match=r"unsupported image type '\.gif'"):
        image_format("a.gif")
    with pytest.raises(UserError, match=r"'\(no suffix\)'"):
        image_format("grid")


# ---------------------------------------------------------------------------------------------------- run folders


def test_run_folder_of(tmp_path):
    run = tmp_path / "results" / "003-DiT-S-2"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {}, "recipe": {}, "args": {}}')
    assert run_folder_of(run / "checkpoints" / "0000010.pt") == run
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    (tmp_path / "home" / "config.json").write_text('{"mine": 1}')  # the user's, never a run's
    assert run_folder_of(downloads / "ckpt.pt") is None
    assert run_folder_of(tmp_path / "home" / "checkpoints" / "0000010.pt") is None  # config.json is not a run's


def test_discard_if_empty(tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "log.txt").write_text("started")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "0000001.pt").write_bytes(b"saved")
    assert discard_if_empty(tmp_path / "a") and not (tmp_path / "a").exists()
    assert not discard_if_empty(tmp_path / "b") and (tmp_path / "b").exists()


def test_run_lock_is_exclusive_across_processes(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from dit_fast.utils.runlock import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"run folder \S+ is in use by process {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held


# ---------------------------------------------------------------------------------------------------- temporaries


def test_temp_names_fit_name_max_and_name_the_process(tmp_path):
    tmp = temp_path(tmp_path / ("n" * 250 + ".pt"))
    assert len(tmp.name.encode()) <= 255 and f".{os.getpid()}@" in tmp.name


def test_sweep_removes_dead_writers_temps_only(tmp_path):
    target = tmp_path / "samples.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = temp_path(target)
    live.write_bytes(b"in flight")  # ours: alive
    stale = live.with_name(live.name.replace(f".{os.getpid()}@", f".{dead_pid}@"))
    stale.write_bytes(b"left by a killed run")
    other = tmp_path / ".other.npz.1@00000000.abcdef12.tmp"
    other.write_bytes(b"another name, another host")
    assert sweep_stale_temps(target) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_atomic_save_on_a_full_disk_is_one_error_and_no_temp(tmp_path, monkeypatch):
    """Deterministic ENOSPC: the file object's writes fail as on a full disk."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k))
                        if "w" in mode and ".tmp" in str(p) else real_open(p, mode, *a, **k))
    with pytest.raises(DiskFull, match=r"^No space left on device while writing \S+ckpt\.pt \(.* free on") as info:
        atomic_save({"w": torch.randn(1000)}, tmp_path / "ckpt.pt")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def test_preallocate_refuses_what_does_not_fit(tmp_path, monkeypatch):
    path = tmp_path / "latents.npy"
    path.write_bytes(b"")
    preallocate(path, 4096)
    assert path.stat().st_size == 4096

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFull, match="latents.npy"):
        preallocate(path, 1 << 40)


def test_atomic_write_removes_its_temp_on_terminated(tmp_path):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise Terminated()

    with pytest.raises(Terminated):
        atomic_write(tmp_path / "x.npz", write)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- data


def _png(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (10, 20, 30)).save(path)


def test_scan_skips_stray_empty_and_looping_folders(tmp_path):
    for c in ("cat", "dog"):
        _png(tmp_path / c / "0.png")
    for stray in ("__MACOSX", "lost+found", ".cache"):
        _png(tmp_path / stray / "0.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dog" / "loop").symlink_to(tmp_path / "dog")  # a symlink loop
    classes, samples, notes = scan_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert [label for _, label in samples] == [0, 1]
    assert len(notes) == 4 and any("empty" in n for n in notes)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert np.asarray(read_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 100, 255]


def test_truncated_image_names_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot read image \S+a\.jpg"):
        read_image(tmp_path / "a.jpg")


@pytest.mark.parametrize(("text", "error"), [("{not json", "is not valid JSON"), ("[1]", "not a JSON object"),
                                               ('{"classes": [], "image_size": 8, "scale_factor": 1}', "non-empty"),
                                               ('{"classes": ["a"], "image_size": "8", "scale_factor": 1}',
                                                "'image_size' is missing or not a int")])
def test_bad_latent_meta(tmp_path, text, error):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(UserError, match=error):
        read_latent_meta(tmp_path / "meta.json")


def test_truncated_npy_and_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((64, 64), np.float32))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:1000])
    with pytest.raises(UserError, match=r"a\.npy is truncated"):
        open_npy(tmp_path / "a.npy")
    np.savez_compressed(tmp_path / "s.npz", arr_0=np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), np.uint8),
                        labels=np.zeros(8, np.int64))
    whole = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.npz is not a readable \.npz"):
        npz_arrays(tmp_path / "cut.npz", ["arr_0"])
    with zipfile.ZipFile(tmp_path / "s.npz") as z:
        info = z.getinfo("arr_0.npy")
    bad = bytearray(whole)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    bad[start + 20: start + 60] = bytes(40)  # damage the deflate stream
    (tmp_path / "bad.npz").write_bytes(bytes(bad))
    with pytest.raises(UserError, match=r"bad\.npz(: member 'arr_0' is truncated or corrupt| is not a readable)"):
        npz_arrays(tmp_path / "bad.npz", ["arr_0", "labels"])
    with pytest.raises(UserError, match="has no mu"):
        npz_arrays(tmp_path / "s.npz", ["mu"])


# ---------------------------------------------------------------------------------------------------- processes


def test_worker_error_becomes_the_workers_message():
    loader = torch.utils.data.DataLoader(_Failing(), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as info, worker_errors():
        next(iter(loader))
    assert str(info.value) == "cannot read image 'x.jpg': truncated (in a data-loading worker)"
    assert worker_message(ValueError("plain")) is None


class _Failing(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        raise UserError("cannot read image 'x.jpg': truncated")


def test_sigterm_raises_terminated_inside_the_block_only():
    with terminate_as_interrupt(), pytest.raises(Terminated) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.01) if hasattr(signal, "sigtimedwait") else None
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_workers_end_on_sigterm_and_with_their_parent():
    """A worker stuck after an error still ends: the parent exits at once, with the worker's message."""
    code = textwrap.dedent("""
        import torch
        from dit_fast.utils.lifecycle import init_worker, worker_errors
        class D(torch.utils.data.Dataset):
            def __len__(self): return 64
            def __getitem__(self, i):
                if i == 3: raise ValueError("cannot read image 'b.jpg'")
                return torch.zeros(1)
        loader = torch.utils.data.DataLoader(D(), batch_size=1, num_workers=2, worker_init_fn=init_worker)
        with worker_errors():
            for _ in loader: pass
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "cannot read image 'b.jpg' (in a data-loading worker)" in r.stderr


# ---------------------------------------------------------------------------------------------------- environment


@pytest.mark.parametrize(("env", "error"), [
    ({"RANK": "1"}, r"^RANK=1 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "abc", "RANK": "0"}, r"^environment variable WORLD_SIZE='abc' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 must be < WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, r"WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT unset"),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "-1"}, r"LOCAL_RANK=-1 must be >= 0"),
])
def test_bad_distributed_environment_names_the_variable(env, error):
    with pytest.raises(UserError, match=error):
        read_dist_env(env)


def test_good_distributed_environment():
    assert read_dist_env({}) == DistEnv()
    assert read_dist_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                          "MASTER_PORT": "29500"}) == DistEnv(1, 2, 1)


# ---------------------------------------------------------------------------------------------------- models


def _tiny_vae(folder: Path, prefix: str = "") -> None:
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  block_out_channels=(8,), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(folder)
    if prefix:
        weights = folder / "diffusion_pytorch_model.safetensors"
        save_file({prefix + k: v for k, v in load_file(weights).items()}, weights)


def test_vae_loads_strictly(tmp_path):
    from dit_fast.models.vae import load_autoencoder

    _tiny_vae(tmp_path / "good")
    assert load_autoencoder(tmp_path / "good").config.latent_channels == 4
    _tiny_vae(tmp_path / "prefixed", prefix="vae.")
    with pytest.raises(UserError, match=r"do not fit its AutoencoderKL config: \d+ weights missing .*the prefix 'vae'"):
        load_autoencoder(tmp_path / "prefixed")
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel"}')
    with pytest.raises(UserError, match="holds a DiTTransformer2DModel .*not an AutoencoderKL"):
        load_autoencoder(tmp_path / "dit")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
        load_autoencoder(tmp_path / "broken")


def test_check_finite_names_what():
    from dit_fast.models.vae import check_finite

    x = torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(UserError, match=r"^the first latents hold non-finite values \(1 NaN, 1 inf of 3\)"):
        check_finite(x, "the first latents")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_weights_check_is_exact(dtype):
    """The one-reduction check: finite values whose sum overflows pass; a single NaN or inf anywhere is named, with
    inf and -inf together (their sum is NaN) and a NaN beside huge values."""
    from dit_fast.checkpoints.read import CheckpointError, check_finite_weights

    big = torch.finfo(dtype).max
    good = {"overflowing": torch.full((64,), big, dtype=dtype), "small": torch.randn(37).to(dtype),
            "steps": torch.arange(10)}
    check_finite_weights(good, "ok.pt")
    for values, counts in (([1.0, float("inf"), float("-inf")], "0 NaN, 2 inf"),
                           ([big, float("nan"), big], "1 NaN, 0 inf"), ([float("-inf")], "0 NaN, 1 inf")):
        with pytest.raises(CheckpointError, match=rf"^bad\.pt holds non-finite weights: w \({counts}\);"):
            check_finite_weights({**good, "w": torch.tensor(values, dtype=dtype)}, "bad.pt")


def test_device_names_and_memory():
    assert device_name("cuda:1") == "cuda:1" and device_name("cpu") == "cpu"
    for bad in ("mps", "meta", "cuda:x", ""):
        with pytest.raises(ValueError, match="must be cpu, cuda or cuda:N"):
            device_name(bad)
    check_memory(1 << 20, "one MiB")
    with pytest.raises(UserError, match=r"^the samples need about .* of memory, but .* is available"):
        check_memory(10**18, "the samples")
