"""gpu_check.sh cannot lose a level's finished cases: a level stopped by SIGINT (what its `timeout --signal=INT` sends)
writes them to its JSON, a level stopped by SIGTERM writes nothing (why the script no longer uses TERM). A tiny
benchmark level on the CPU, with the suite's conftest, is interrupted while its third case runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = '''
import time
from pathlib import Path


def test_first(benchmark):
    benchmark.pedantic(sum, args=(range(100),), rounds=3)


def test_second(benchmark):
    benchmark.pedantic(sum, args=(range(1000),), rounds=3)


def test_slow(benchmark):
    Path(__file__).with_name("slow-started").touch()
    benchmark.pedantic(time.sleep, args=(120,), rounds=1)
'''


def interrupted_level(tmp_path: Path, sig: signal.Signals, ignore_int: bool = False) -> tuple[int, Path]:
    """Run the tiny level with the benchmark suite's conftest; send ``sig`` once its slow case runs. Returns
    (exit status, the --benchmark-json path)."""
    level = tmp_path / "test_level.py"
    level.write_text(LEVEL)
    out = tmp_path / "level.json"
    cmd = [sys.executable, "-m", "pytest", str(level), "-q", "-p", "no:cacheprovider", "-p", "benchmarks.conftest",
           "--rootdir", str(tmp_path), "--benchmark-only", "--dit-device", "cpu", f"--benchmark-json={out}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")

    def ignore_sigint() -> None:  # as a background job of a non-interactive shell starts
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=ignore_sigint if ignore_int else None)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "slow-started").exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the level never reached its slow case"
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


def test_script_stops_levels_with_int_before_kill():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "timeout --signal=INT --kill-after=$grace" in script


@pytest.mark.parametrize("ignore_int", [False, True], ids=["foreground", "sigint-ignored-at-start"])
def test_interrupted_level_keeps_its_finished_cases(tmp_path, ignore_int):
    """SIGINT: the finished cases are in the JSON (also when the level was started with SIGINT ignored)."""
    returncode, out = interrupted_level(tmp_path, signal.SIGINT, ignore_int)
    assert returncode != 0
    names = [bench["name"] for bench in json.loads(out.read_text())["benchmarks"]]
    assert names == ["test_first", "test_second"]


def test_terminated_level_writes_nothing(tmp_path):
    """SIGTERM (what `timeout` sends by default): no JSON at all, the finished cases are lost."""
    returncode, out = interrupted_level(tmp_path, signal.SIGTERM)
    assert returncode == -signal.SIGTERM and not out.exists()
