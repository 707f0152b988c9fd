"""The wheel installs ``dit_fast`` and ``kernels/`` as ``dit_fast.kernels`` (never a bare ``kernels``)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.helpers import ROOT


def test_wheel_installs_kernels_under_dit_fast(tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".benchmarks"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("dit_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dit_fast/kernels/__init__.py" in names
    package = ROOT / "dit_fast"
    sources = {str(Path(d, f).relative_to(ROOT)) for d, _, fs in os.walk(package, followlinks=True) for f in fs
               if f.endswith(".py")}
    assert sources - set(names) == set(), "modules missing from the wheel (pyproject's packages list)"
    assert not any(n.startswith("kernels/") for n in names), "a bare top-level 'kernels' package would clash"

    # A fresh venv that sees this interpreter's site-packages (for torch) through a .pth, not the project tree.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the parent environment may hold an (editable) dit-fast of the same version
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--ignore-installed",
                    "-q", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy, not this checkout
    probe = (
        "import importlib.util, dit_fast, dit_fast.kernels;"
        "print(dit_fast.__file__); print(dit_fast.kernels.__file__);"
        "print(importlib.util.find_spec('kernels'))"
    )
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout
    pkg_file, kernels_file, bare = out.split()
    assert pkg_file.startswith(site) and kernels_file.startswith(site)
    assert Path(kernels_file).parent == Path(pkg_file).parent / "kernels"
    assert bare == "None"
    assert (venv / "bin" / "dit-fast").exists()
    info = subprocess.run([str(venv / "bin" / "dit-fast"), "info", "DiT-XL/2"], check=True, capture_output=True,
                          text=True, cwd=tmp_path, env=env).stdout
    assert "118.62" in info


def test_checkout_reaches_kernels_only_as_dit_fast_kernels():
    """A bare checkout (no install) imports dit_fast.kernels through the dit_fast/kernels symlink, the one mechanism;
    the top-level folder refuses to be imported as a bare ``kernels`` (Hugging Face's package name)."""
    assert (ROOT / "dit_fast" / "kernels").is_symlink()
    assert (ROOT / "dit_fast" / "kernels").resolve() == (ROOT / "kernels").resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([sys.executable, "-c", "import dit_fast.kernels as K; print(K.__file__)"], cwd=ROOT, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bare = subprocess.run([sys.executable, "-c", "import kernels"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "import this package as dit_fast.kernels" in bare.stderr
