"""Options, session fixtures and hooks of the benchmark suite.

- ``--dit-*`` options size a run (``pytest benchmarks/ --help`` lists them under "dit-fast benchmarks");
- ``bench_settings``: the resolved ``benchmarks.common.BenchSettings``;
- ``matmul_ceiling``: the run's ``benchmarks.common.MatmulCeiling`` in the run's dtype (the fastest GEMM route over
  the model level's linear shapes), measured once per session so every case's "fraction of ceiling" is a ratio of
  one run;
- ``profile_case``: ``profile_case(benchmark, fn)`` stores a ``torch.profiler`` summary of ``fn`` in the case's
  ``extra_info["profile"]`` when the run has ``--dit-profile`` (``benchmarks.profiling``), else does nothing;
- an interrupted session keeps what it finished: SIGINT always interrupts (also where a shell started the run in the
  background, ignoring SIGINT), and the JSON holds exactly the cases whose test finished (pytest-benchmark alone
  writes no JSON at all when the interrupted case had no timed round yet), so a level stopped by ``timeout
  --signal=INT`` (gpu_check.sh) keeps its finished cases;
- the JSON's ``machine_info`` gains the CPU model, GPU, driver and package versions (``environment_info``);
- with ``--benchmark-json=RUN.json`` the Markdown report (``RUN.md``) and plot (``RUN.png``) are written next to it
  at the end of the session (``benchmarks.report``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import (
    IMPLS,
    BenchSettings,
    MatmulCeiling,
    environment_info,
    measure_matmul_ceiling,
    settings_from_config,
)
from benchmarks.profiling import profile_summary
from benchmarks.report import write_report

_START_KEY = pytest.StashKey[float]()
_FINISHED_KEY = pytest.StashKey[set[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dit-fast benchmarks", "sizing of the dit-fast benchmark suite (benchmarks/)")
    group.addoption("--dit-device", default="auto",
                    help="device to benchmark: auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    group.addoption("--dit-dtype", default="auto",
                    help="compute dtype: auto (fp32 on cpu, bf16 on cuda), fp32, bf16, fp16; parity is always "
                         "checked against the fp32 reference")
    group.addoption("--dit-config", default=None,
                    help="model config of the model and sampling levels, e.g. DiT-XL/2 (default: DiT-S/2 on cpu, "
                         "DiT-XL/2 on cuda)")
    group.addoption("--dit-batch", type=int, default=None,
                    help="batch size of every level (default per level and device; see benchmarks/README.md)")
    group.addoption("--dit-rounds", type=int, default=None,
                    help="timed rounds per case, after one warm-up round (default per level and device)")
    group.addoption("--dit-sample-steps", type=int, default=None,
                    help="DDPM steps of the guided sampling case (default 6 on cpu, 250 on cuda)")
    group.addoption("--dit-ddim-steps", type=int, default=None,
                    help="DDIM steps of the guided sampling case (default 3 on cpu, 50 on cuda)")
    group.addoption("--dit-scaling-configs", default=None,
                    help="comma-separated configs of the scaling sweep (default DiT-S/8,DiT-S/4,DiT-S/2,DiT-B/8 on "
                         "cpu, all 12 on cuda)")
    group.addoption("--dit-impls", default=None,
                    help=f"comma-separated implementations to run (default all: {','.join(IMPLS)})")
    group.addoption("--dit-profile", action="store_true",
                    help="store a torch.profiler summary of each model-level case in its extra_info (a few more "
                         "calls per case; python -m benchmarks.profiling RUN.json prints them)")


def pytest_configure(config: pytest.Config) -> None:
    settings_from_config(config)  # bad options fail before collection, with the option's name
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited from a background job: make INT interrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def bench_settings(pytestconfig: pytest.Config) -> BenchSettings:
    return settings_from_config(pytestconfig)


@pytest.fixture(scope="session")
def matmul_ceiling(bench_settings: BenchSettings) -> MatmulCeiling:
    size = bench_settings.sizing("model")  # the ceiling's GEMM shapes: the model level's linears
    return measure_matmul_ceiling(bench_settings.device, bench_settings.dtype, size.config, size.batch)


@pytest.fixture(scope="session")
def profile_case(pytestconfig: pytest.Config, bench_settings: BenchSettings
                 ) -> Callable[[Any, Callable[[], Any]], None]:
    def profile(benchmark: Any, fn: Callable[[], Any]) -> None:
        if pytestconfig.getoption("dit_profile"):
            benchmark.extra_info["profile"] = profile_summary(fn, bench_settings.device)

    return profile


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    settings = settings_from_config(config)
    machine_info["dit_fast"] = environment_info(settings.device) | {"dtype": settings.dtype_name}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_START_KEY] = time.time()
    session.config.stash[_FINISHED_KEY] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    yield
    if call.when == "call" and not isinstance(call.excinfo and call.excinfo.value, KeyboardInterrupt):
        item.config.stash.setdefault(_FINISHED_KEY, set()).add(item.nodeid)  # the test body ran to its end


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_generate_json(config: pytest.Config, benchmarks: list[Any], include_data: bool,
                                   machine_info: dict[str, Any], commit_info: dict[str, Any]) -> None:
    """Keep, in the JSON, the cases whose test finished: a case cut short by an interrupt is dropped (in place;
    returning None lets pytest-benchmark's own hook write the rest)."""
    finished = config.stash.get(_FINISHED_KEY, set())
    benchmarks[:] = [bench for bench in benchmarks if bench.fullname in finished and bench.stats.data]


def pytest_sessionfinish(session: pytest.Session) -> None:
    # pytest-benchmark writes --benchmark-json in its own (wrapping) sessionfinish, before this one runs; a file
    # older than this session is a previous run's (this one ran no benchmark) and gets no report.
    json_path = session.config.getoption("benchmark_json", None)
    started = session.config.stash.get(_START_KEY, 0.0)
    if json_path is None or not Path(json_path).is_file() or Path(json_path).stat().st_mtime < started:
        return
    markdown, plot = write_report(Path(json_path))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"dit-fast benchmark report: {markdown}" + (f" and {plot}" if plot else " (no plot)"))
