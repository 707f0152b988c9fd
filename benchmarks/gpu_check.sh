#!/usr/bin/env bash
# GPU check of dit-fast: the CUDA parity tests, the kernel compile check and the GPU-sized benchmarks, each step
# time-bounded, the whole run within a time budget (8 minutes by default), continuing past failures and recording
# each step's outcome.
#
#   bash benchmarks/gpu_check.sh                        # on a machine with a CUDA GPU, from anywhere in the repo
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # print the steps and their time limits, run nothing
#
# Writes under $OUT (default benchmarks/results/gpu-<UTC date>):
#   gpu_check.md    GPU, driver, CUDA, torch/triton versions, date, each step's outcome, then the benchmark report
#   gpu_check.log   every step's full output
#   bench_gpu.json  the benchmark levels' pytest-benchmark runs merged; bench_gpu.md / bench_gpu.png its report
#
# Nothing is fetched from the network: torch and triton must be installed. The checkout imports as it is (run from
# the repository root; `dit_fast/kernels` links to `kernels/`); only when `dit_fast.kernels` is still not importable
# is dit-fast installed with `pip install -e . --no-deps --no-build-isolation`. pytest and pytest-benchmark are
# needed for the tests and benchmarks (their steps fail, and the others still run, without them).
#
# Environment (all optional):
#   OUT                   output folder
#   PYTHON                interpreter (default python3)
#   GPU_CHECK_BUDGET      total seconds for all steps (default 470)
#   GPU_CHECK_TESTS       pytest -k expression selecting the GPU tests (default "cuda or gpu")
#   GPU_CHECK_BENCH_ARGS  extra options for every benchmark level (e.g. "--dit-batch 8 --dit-sample-steps 100")
#   GPU_CHECK_DRY_RUN=1   print, run nothing, write nothing
#
# Exit status: 0 when every step that ran passed, 1 when any failed or timed out (all steps still run).

set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET:-470}
TESTS_K=${GPU_CHECK_TESTS:-cuda or gpu}
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-benchmarks/results/gpu-$STAMP}
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.md
RESERVE=20      # seconds kept back at every step for the report and summary
MIN_STEP=15     # a step that would get less than this is skipped
DEADLINE=$((SECONDS + BUDGET))
export PYTHONUNBUFFERED=1

# Per-step limits (seconds); the remaining budget caps each.
T_ENV=30 T_INSTALL=120 T_COMPILE=90 T_TESTS=150 T_REPORT=30
# Benchmark levels, most important first (a level that would start with under 15 s of budget left is skipped):
# name, file, limit (s), then options for that level (whitespace-separated words). Sizes are the suite's GPU defaults
# (DiT-XL/2 bf16 at batch 32 for the model level; DDPM-250 and DDIM-50 at batch 4; all 12 configs at batch 16 in the
# scaling sweep), with cuts to fit the budget: the model level's forward and training step run as separate sessions
# (compiling the XL/2 training step is the slowest part of the check), 5 timed rounds in the sweep, and no
# reference+compile in the sampling loops (the model level compares the compiled reference).
# GPU_CHECK_BENCH_ARGS, added last, overrides any of them.
LEVELS=(
    "model-forward benchmarks/test_bench_model.py 120 -k test_forward"
    "sampling benchmarks/test_bench_sampling.py 120 --dit-impls reference,dit_fast,dit_fast+compile,diffusers"
    "kernels benchmarks/test_bench_kernels.py 90"
    "scaling benchmarks/test_bench_scaling.py 75 --dit-rounds 5"
    "model-train benchmarks/test_bench_model.py 120 -k test_train_step"
)

ROWS=()
FAILURES=0
record() {  # record NAME STATUS SECONDS COMMAND
    ROWS+=("| $1 | $2 | $3 | \`$4\` |")
}

run_step() {  # run_step NAME LIMIT CMD...: run CMD under `timeout`, log it, record the outcome; returns CMD's status
    local name=$1 limit=$2
    shift 2
    local cmd remaining=$((DEADLINE - SECONDS - RESERVE))
    cmd=$(printf '%q ' "$@")
    cmd=${cmd% }
    if ((limit > remaining)); then limit=$remaining; fi
    if ((limit < MIN_STEP)); then
        echo "--- $name: skipped, the ${BUDGET}s budget is spent"
        record "$name" "skipped (budget spent)" 0 "$cmd"
        return 0
    fi
    if [[ $DRY_RUN == 1 ]]; then
        echo "[dry-run] $name: timeout ${limit}s $cmd"
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $cmd" | tee -a "$LOG"
    local start=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        5) status="no tests selected (exit 5)" ;;
        124 | 137) status="**TIMEOUT** after ${limit}s" ;;
        *) status="**FAILED** (exit $rc)" ;;
    esac
    [[ $rc == 0 || $rc == 5 ]] || FAILURES=$((FAILURES + 1))
    echo "--- $name: $status in $((SECONDS - start))s" | tee -a "$LOG"
    record "$name" "$status" "$((SECONDS - start))" "$cmd"
    return "$rc"
}

if [[ $DRY_RUN == 1 ]]; then
    echo "[dry-run] budget ${BUDGET}s; output would go to $OUT"
else
    mkdir -p "$OUT" || exit 2
    : >"$LOG"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

# 1. The machine: GPU, driver, CUDA, versions.
if [[ $DRY_RUN != 1 ]]; then
    if ! GPU_INFO=$(timeout "$T_ENV" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        2>&1); then
        GPU_INFO="nvidia-smi failed or is missing: $GPU_INFO"
    fi
    GPU_INFO=${GPU_INFO//$'\n'/; }  # one line per GPU -> one line
    PY_INFO=$(timeout "$T_ENV" "$PYTHON" -c 'import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE VISIBLE"
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}; "
      f"torch sees: {cuda}")' 2>&1 || echo "$PYTHON could not import torch")
    echo "GPU: $GPU_INFO" | tee -a "$LOG"
    echo "$PY_INFO" | tee -a "$LOG"
fi

# 2. dit-fast importable (installed from this checkout, offline).
if [[ $DRY_RUN == 1 ]] || ! timeout "$T_ENV" "$PYTHON" -c "import dit_fast.kernels" >/dev/null 2>&1; then
    [[ $DRY_RUN == 1 ]] && echo "[dry-run] (install only if dit_fast is not importable)"
    run_step install "$T_INSTALL" "$PYTHON" -m pip install -e . --no-deps --no-build-isolation
fi

# 3. Every kernel compiles for sm_80 and sm_90.
if [[ $DRY_RUN == 1 ]] || timeout "$T_ENV" "$PYTHON" -c "import importlib.util as u, sys
sys.exit(u.find_spec('dit_fast.kernels.compile_check') is None)" >/dev/null 2>&1; then
    run_step compile_check "$T_COMPILE" "$PYTHON" -m dit_fast.kernels.compile_check
else
    record compile_check "skipped (dit_fast.kernels.compile_check not found)" 0 "-"
fi

# 4. The tests with CUDA cases.
run_step tests "$T_TESTS" "$PYTHON" -m pytest tests/ -q -p no:cacheprovider -k "$TESTS_K"

# 5. The benchmark levels, one pytest session each, so a hang or crash loses one level, not all.
JSONS=()
for level in "${LEVELS[@]}"; do
    read -r name file limit level_args <<< "$level"
    read -r -a level_args <<< "${level_args:-}"
    if [[ $DRY_RUN != 1 && ! -f $file ]]; then
        record "bench $name" "skipped ($file not found)" 0 "-"
        continue
    fi
    run_step "bench $name" "$limit" "$PYTHON" -m pytest "$file" -q -p no:cacheprovider --benchmark-only \
        --dit-device cuda --benchmark-json="$WORK/$name.json" ${level_args[@]+"${level_args[@]}"} \
        ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
    [[ -s $WORK/$name.json ]] && JSONS+=("$WORK/$name.json")
done

# 6. One report over every level that produced results.
if [[ $DRY_RUN == 1 ]]; then
    run_step report "$T_REPORT" "$PYTHON" -m benchmarks.report "$WORK/LEVEL.json" --merged "$OUT/bench_gpu.json"
    exit 0
fi
if ((${#JSONS[@]})); then
    RESERVE=0 run_step report "$T_REPORT" "$PYTHON" -m benchmarks.report "${JSONS[@]}" --merged "$OUT/bench_gpu.json"
else
    record report "skipped (no benchmark level produced results)" 0 "-"
fi

{
    echo "# dit-fast GPU check"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- GPU (nvidia-smi: name, driver, memory): $GPU_INFO"
    echo "- $PY_INFO"
    echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null \
        || echo ' (with uncommitted changes)')"
    echo "- Budget: ${BUDGET}s; used: ${SECONDS}s"
    echo
    echo "| step | outcome | seconds | command |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    if [[ -f $OUT/bench_gpu.md ]]; then
        echo "---"
        echo
        sed 's/^#/##/' "$OUT/bench_gpu.md"
    fi
} >"$SUMMARY"
echo "wrote $SUMMARY; $FAILURES step(s) failed or timed out"
((FAILURES == 0))
