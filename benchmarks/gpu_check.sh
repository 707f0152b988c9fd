#!/usr/bin/env bash
# GPU check of dit-fast in one shot: the CUDA parity tests, then the GPU-sized benchmark levels in the order forward,
# training step, kernels (with the attention-backend comparison), sampling, then the dispatch-level traffic trace.
# Every step runs under its own `timeout`; the planned step limits add up to at most 420 s (a lent GPU machine has
# about 15 minutes in all, its start included); the run continues past failures and records each step's outcome.
#
#   bash benchmarks/gpu_check.sh              # on a machine with a CUDA GPU, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --dry-run    # print the plan (steps, limits, total), run nothing, write nothing
#
# Writes under $OUT (default benchmarks/results/gpu-<UTC date>), at most 7 files:
#   gpu_check.md    GPU, driver, CUDA, torch/triton versions, date, each step's outcome, then the benchmark report;
#                   rewritten after every step, so a run cut short still leaves the summary of the steps it finished
#   gpu_check.log   every step's full output
#   <level>.json    each benchmark level's pytest-benchmark run (forward, train, kernels, sampling), copied to $OUT
#                   the moment its level ends; traffic.json, the traffic trace (python -m benchmarks.traffic --json)
#
# The kernel compile check (python -m dit_fast.kernels.compile_check) needs no GPU and is not run here: it runs in
# CI (tests/kernels/test_compile_check.py) and on any machine with Triton. Nothing is fetched and nothing installed:
# the checkout imports as it is (`dit_fast/kernels` links to `kernels/`; the repository root goes on PYTHONPATH).
# torch, triton, pytest and pytest-benchmark must be there (the steps that need a missing one fail; the rest run).
# Optional packages (diffusers, flash-attn, xformers) are never needed: the tests step names its files, so no test
# module that imports one is collected, and the benchmark cases that use one skip themselves.
#
# Environment (all optional):
#   OUT                   output folder
#   PYTHON                interpreter (default python3)
#   GPU_CHECK_BUDGET      total seconds for all steps (default 420); each step's limit is capped by what is left
#   GPU_CHECK_TEST_FILES  the CUDA test files (default below); GPU_CHECK_TESTS: their -k expression (default "cuda")
#   GPU_CHECK_BENCH_ARGS  extra options for every benchmark level (e.g. "--dit-batch 8 --dit-sample-steps 100")
#   GPU_CHECK_DRY_RUN=1   the same as --dry-run
#
# Exit status: 0 when every step that ran passed, 1 when any failed or timed out (all steps still run).

set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
TEST_FILES=${GPU_CHECK_TEST_FILES:-tests/kernels/test_cuda.py tests/test_model.py tests/test_attention.py}
TESTS_K=${GPU_CHECK_TESTS:-cuda}
read -r -a TEST_FILES <<< "$TEST_FILES"
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-benchmarks/results/gpu-$STAMP}
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.md
MIN_STEP=10     # a step that would get less than this is skipped
KILL_AFTER=5    # seconds between a step's TERM and KILL
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The plan: per-step limits in seconds, in the order the steps run (most important first). Their sum is at most
# the 420 s budget (tests/test_benchmarks_report.py checks the dry run's total and order). Sizes are the suite's GPU
# defaults (DiT-XL/2 bf16: batch 64 for the model levels; DDIM-50 at batch 4 for sampling) with these cuts: the
# training step leaves out reference+compile (whole-model compilation of an XL/2 training step does not fit the one
# shot; the forward level keeps it), the kernel level times batch 256 only, and the sampling loops run DDPM-100
# instead of 250 (the same per-step rate, and a 2.5x shorter fp32 oracle chain) and no reference+compile (the
# forward level compares the compiled reference). GPU_CHECK_BENCH_ARGS, added last, overrides any of them.
T_ENV=20 T_TESTS=75 T_FORWARD=85 T_TRAIN=80 T_KERNELS=60 T_SAMPLING=55 T_TRAFFIC=30 T_REPORT=15
RESERVE=$T_REPORT  # what every step but the last (the report) leaves of the budget for it
CASE_SHARE=60   # with pytest-timeout installed, one test or benchmark case may take this % of its step's limit: a
                # slow case (a cold whole-model compile) fails alone and a level still writes its JSON

ROWS=()
FAILURES=0
PLANNED=0
REMAINING=$BUDGET
GPU_INFO="not probed"
PY_INFO="not probed"
record() {  # record NAME STATUS SECONDS COMMAND
    ROWS+=("| $1 | $2 | $3 | \`$4\` |")
}

if [[ $DRY_RUN == 1 ]]; then
    echo "[dry-run] budget ${BUDGET}s; output would go to $OUT"
else
    mkdir -p "$OUT" || exit 2
    : >"$LOG"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

write_summary() {  # the summary of every step so far (and the benchmark report once there is one)
    [[ $DRY_RUN == 1 ]] && return 0
    {
        echo "# dit-fast GPU check"
        echo
        echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- GPU (nvidia-smi: name, driver, memory): $GPU_INFO"
        echo "- $PY_INFO"
        echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null \
            || echo ' (with uncommitted changes)')"
        echo "- Budget: ${BUDGET}s of step limits; used: $((SECONDS - START))s"
        echo
        echo "| step | outcome | seconds | command |"
        echo "|---|---|---|---|"
        printf '%s\n' "${ROWS[@]}"
        echo
        if [[ -f $WORK/bench_gpu.md ]]; then
            echo "---"
            echo
            sed 's/^#/##/' "$WORK/bench_gpu.md"
        fi
    } >"$SUMMARY"
}

run_step() {  # run_step NAME LIMIT CMD...: run CMD under `timeout`, log it, record the outcome; returns CMD's status
    local name=$1 limit=$2
    shift 2
    local cmd
    cmd=$(printf '%q ' "$@")
    cmd=${cmd% }
    if ((limit > REMAINING - RESERVE)); then limit=$((REMAINING - RESERVE)); fi
    if ((limit < MIN_STEP)); then
        echo "--- $name: skipped, the ${BUDGET}s budget is spent"
        record "$name" "skipped (budget spent)" 0 "$cmd"
        write_summary
        return 0
    fi
    PLANNED=$((PLANNED + limit))
    if [[ $DRY_RUN == 1 ]]; then
        REMAINING=$((REMAINING - limit))
        echo "[dry-run] $name: timeout ${limit}s $cmd"
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $cmd" | tee -a "$LOG"
    local start=$SECONDS rc status
    timeout --kill-after=$KILL_AFTER "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.out"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        5) status="no tests selected (exit 5)" ;;
        124 | 137) status="**TIMEOUT** after ${limit}s" ;;
        *) status="**FAILED** (exit $rc)" ;;
    esac
    [[ $rc == 0 || $rc == 5 ]] || FAILURES=$((FAILURES + 1))
    local took=$((SECONDS - start))
    REMAINING=$((REMAINING - (took > limit ? took : limit)))
    echo "--- $name: $status in ${took}s" | tee -a "$LOG"
    record "$name" "$status" "$took" "$cmd"
    write_summary
    return "$rc"
}

# 1. The machine: GPU, driver, CUDA, versions; the checkout imports.
ENV_PY='import platform, shutil, subprocess, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
smi = "nvidia-smi missing"
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=10)
    smi = "; ".join(q.stdout.split("\n")).strip("; ") or "nvidia-smi failed: " + q.stderr.strip()
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE VISIBLE"
print("GPU:", smi)
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}; "
      f"torch sees: {cuda}")
import dit_fast.kernels
print("dit_fast imported from", dit_fast.__file__)'
printf '%s\n' "$ENV_PY" >"$WORK/env.py"
run_step env "$T_ENV" "$PYTHON" "$WORK/env.py"
if [[ -f $WORK/env.out ]]; then
    GPU_INFO=$(sed -n 's/^GPU: //p' "$WORK/env.out" | head -1)
    PY_INFO=$(grep -m1 '^Python ' "$WORK/env.out" || echo "$PYTHON could not import torch")
fi

# 2. The CUDA parity tests, from the files that hold them (named, so nothing else is collected).
CASE_TIMEOUT=0  # pytest-timeout (a pytest plugin, loaded by itself when installed) gives --timeout
"$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1 && CASE_TIMEOUT=1
per_test=()
((CASE_TIMEOUT)) && per_test=("--timeout=$((T_TESTS * CASE_SHARE / 100))")
run_step tests "$T_TESTS" "$PYTHON" -m pytest "${TEST_FILES[@]}" -q -p no:cacheprovider -k "$TESTS_K" \
    ${per_test[@]+"${per_test[@]}"}

# 3. The benchmark levels, one pytest session each (a hang or crash loses one level, not all); each level's JSON
#    goes to $OUT the moment the level ends.
JSONS=()
run_level() {  # run_level NAME LIMIT PYTEST-ARGS...
    local name=$1 limit=$2
    shift 2
    local per_case=()
    ((CASE_TIMEOUT)) && per_case=("--timeout=$((limit * CASE_SHARE / 100))")
    run_step "bench $name" "$limit" "$PYTHON" -m pytest "$@" -q -p no:cacheprovider ${per_case[@]+"${per_case[@]}"} \
        --benchmark-only --dit-device cuda --benchmark-json="$WORK/$name.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
    if [[ $DRY_RUN != 1 && -s $WORK/$name.json ]]; then
        cp "$WORK/$name.json" "$OUT/$name.json" && JSONS+=("$OUT/$name.json")
    fi
}
run_level forward "$T_FORWARD" benchmarks/test_bench_model.py -k test_forward
run_level train "$T_TRAIN" benchmarks/test_bench_model.py -k test_train_step \
    --dit-impls reference,dit_fast,dit_fast+compile
run_level kernels "$T_KERNELS" benchmarks/test_bench_kernels.py benchmarks/test_bench_attention.py \
    -k "B256 or attention"
run_level sampling "$T_SAMPLING" benchmarks/test_bench_sampling.py --dit-impls reference,dit_fast,dit_fast+compile \
    --dit-sample-steps 100

# 4. The dispatch-level traffic trace on this GPU (DiT-S/2, batch 2, every implementation and mode), with the
#    roofline PREDICTION for this GPU.
run_step traffic "$T_TRAFFIC" "$PYTHON" -m benchmarks.traffic --device cuda --json "$OUT/traffic.json"
[[ $DRY_RUN != 1 && -s $OUT/traffic.json ]] && JSONS+=("$OUT/traffic.json")

# 5. One report over everything that produced results, folded into gpu_check.md.
if [[ $DRY_RUN == 1 ]]; then
    RESERVE=0 run_step report "$T_REPORT" "$PYTHON" -m benchmarks.report "$OUT/LEVEL.json" --merged \
        "$WORK/bench_gpu.json"
    echo "[dry-run] plan total: ${PLANNED}s of step limits (budget ${BUDGET}s)"
    exit 0
fi
if ((${#JSONS[@]})); then
    RESERVE=0 run_step report "$T_REPORT" "$PYTHON" -m benchmarks.report "${JSONS[@]}" --merged "$WORK/bench_gpu.json"
else
    record report "skipped (no benchmark level produced results)" 0 "-"
fi
write_summary
echo "wrote $SUMMARY; $FAILURES step(s) failed or timed out"
((FAILURES == 0))
