#!/usr/bin/env bash
# GPU check of dit-fast in one shot: set-up, the CUDA parity tests, then the GPU-sized benchmark levels in the order
# forward, trainer step, kernels (with the attention-backend comparison), CUDA-graph sampling, then bf16 against FP8.
# Every step runs under its own `timeout`; the planned step limits add up to at most 420 s, set-up included (a lent GPU
# machine has about 15 minutes in all, its start included); time a step leaves unused passes to the next; the run
# continues past failures and records each step's outcome.
#
#   bash benchmarks/gpu_check.sh              # on a machine with a CUDA GPU, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --dry-run    # print the plan (steps, limits, total), run nothing, write nothing
#
# Writes under $OUT (default benchmarks/results/gpu-<UTC date>):
#   gpu_check.md    GPU, driver, CUDA, torch/triton versions, date, each step's outcome, the benchmark report and the
#                   profiler tables; rewritten after every step, so a run cut short still leaves what it finished
#   gpu_check.log   every step's full output
#   <level>.json    each benchmark level's pytest-benchmark run (forward, train, kernels, sampling), copied to $OUT
#                   the moment its level ends; fp8.json (python -m benchmarks.fp8_check); profiles.md
#
# A level that runs out of time is stopped with SIGINT 10 s before its limit (KILL at the limit):
# pytest-benchmark writes the cases it finished to the level's JSON on an interrupt (it writes nothing on TERM or KILL;
# tests/test_gpu_check.py proves both), so a slow last case costs that case, not the level.
#
# Set-up (the first step, timed): `pip install` of pytest, pytest-benchmark and pytest-timeout (none depends on torch)
# and `pip install --no-deps torchao` (FP8; --no-deps: the box's torch is never replaced). dit_fast is imported from
# this checkout (the repository root goes on PYTHONPATH; `dit_fast/kernels` links to `kernels/`); the env step fails
# when it is imported from anywhere else. Optional packages (diffusers, flash-attn, xformers) are never needed.
# The kernel compile check (python -m dit_fast.kernels.compile_check) needs no GPU and runs in CI, not here.
#
# Environment (all optional):
#   OUT                   output folder
#   PYTHON                interpreter (default python3)
#   GPU_CHECK_BUDGET      total seconds for all steps (default 420); each step's limit is capped by what is left
#   GPU_CHECK_SETUP=0     skip the set-up step (the packages are there)
#   GPU_CHECK_TEST_FILES  the CUDA test files (default below); GPU_CHECK_TESTS: their -k expression (default "cuda")
#   GPU_CHECK_BENCH_ARGS  extra options for every benchmark level (e.g. "--dit-batch 8 --dit-ddim-steps 20")
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
SETUP=${GPU_CHECK_SETUP:-1}
# Every test file with a CUDA test (tests/test_diffusers_pipeline.py skips itself without diffusers).
TEST_FILES=${GPU_CHECK_TEST_FILES:-tests/kernels/test_cuda.py tests/kernels/test_linear_gelu.py tests/test_model.py \
tests/test_attention.py tests/test_sample_paths.py tests/test_diffusers_pipeline.py}
TESTS_K=${GPU_CHECK_TESTS:-cuda}
read -r -a TEST_FILES <<< "$TEST_FILES"
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-benchmarks/results/gpu-$STAMP}
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.md
MIN_STEP=10     # a step that would get less than this is skipped
GRACE=10        # a step gets SIGINT this many seconds (at most a fifth of its limit) before its limit, to write what
                # it finished; KILL at the limit
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The plan: per-step limits in seconds, in the order the steps run (most important first). Their sum is at most the
# 420 s budget (tests/test_benchmarks_report.py checks the dry run's total and order). Sizes: DiT-XL/2 bf16; the
# forward level at batch 64 (reference and DiTFast, eager and block-compiled, profiled); the trainer step at batch 32
# and 64; the kernel level at batch 256 only; CUDA-graph sampling at batch 8, DDIM-20, guidance 1.5; FP8 against bf16
# (forward and trainer step). Every compile is regional (one block graph shared by all blocks: seconds, where a
# whole-model compile of XL/2 takes 40-70 s). GPU_CHECK_BENCH_ARGS, added last, overrides any of them.
T_SETUP=40 T_ENV=15 T_TESTS=75 T_FORWARD=60 T_TRAIN=80 T_KERNELS=40 T_SAMPLING=40 T_FP8=45 T_REPORT=15
RESERVE=$T_REPORT  # what every step but the last (the report) leaves of the budget for it
CASE_SHARE=60   # with pytest-timeout installed, one test or benchmark case may take this % of its step's limit: a
                # slow case (a cold compile) fails alone and a level still writes its JSON
BANKED=0        # seconds earlier steps left unused, added to the next step's limit

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
        if [[ -s $OUT/profiles.md ]]; then
            echo
            sed 's/^#/##/' "$OUT/profiles.md"
        fi
    } >"$SUMMARY"
}

run_step() {  # run_step NAME LIMIT CMD...: run CMD under `timeout`, log it, record the outcome; returns CMD's status
    local name=$1 limit=$2
    shift 2
    local cmd
    cmd=$(printf '%q ' "$@")
    cmd=${cmd% }
    limit=$((limit + BANKED))
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
    local start=$SECONDS rc status grace=$((limit / 5 < GRACE ? limit / 5 : GRACE))
    timeout --signal=INT --kill-after=$grace $((limit - grace)) "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.out"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        5) status="no tests selected (exit 5)" ;;
        124) status="**TIMEOUT** after $((limit - grace))s (interrupted; finished cases kept)" ;;
        137) status="**TIMEOUT** after ${limit}s (killed)" ;;
        *) status="**FAILED** (exit $rc)" ;;
    esac
    [[ $rc == 0 || $rc == 5 ]] || FAILURES=$((FAILURES + 1))
    local took=$((SECONDS - start))
    REMAINING=$((REMAINING - took))
    BANKED=$((limit > took ? limit - took : 0))
    echo "--- $name: $status in ${took}s" | tee -a "$LOG"
    record "$name" "$status" "$took" "$cmd"
    write_summary
    return "$rc"
}

# 0. Set-up: what the steps need, installed (timed, as every step) without touching torch.
SETUP_SH='set -e
"$1" -c "import torch; print(\"torch\", torch.__version__, \"before set-up\")"
"$1" -m pip install --quiet --disable-pip-version-check pytest pytest-benchmark pytest-timeout
"$1" -m pip install --quiet --disable-pip-version-check --no-deps torchao
"$1" -c "import torch, pytest, pytest_benchmark, pytest_timeout; print(\"torch\", torch.__version__, \"after set-up;\",
      \"pytest\", pytest.__version__)"
"$1" -c "import torchao; print(\"torchao\", torchao.__version__)" || echo "torchao does not import: FP8 steps skip"'
printf '%s\n' "$SETUP_SH" >"$WORK/setup.sh"
if [[ $SETUP == 1 ]]; then
    run_step setup "$T_SETUP" bash "$WORK/setup.sh" "$PYTHON"
fi

# 1. The machine: GPU, driver, CUDA, versions; dit_fast imports from this checkout.
ENV_PY='import os, platform, shutil, subprocess, torch
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
cap = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
print("GPU:", smi)
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}; "
      f"torch sees: {cuda}, compute capability {cap}")
import dit_fast.kernels
print("dit_fast imported from", dit_fast.__file__)
assert os.path.realpath(dit_fast.__file__).startswith(os.path.realpath(os.getcwd()) + os.sep), "not this checkout"'
printf '%s\n' "$ENV_PY" >"$WORK/env.py"
run_step env "$T_ENV" "$PYTHON" "$WORK/env.py"
if [[ -f $WORK/env.out ]]; then
    GPU_INFO=$(sed -n 's/^GPU: //p' "$WORK/env.out" | head -1)
    PY_INFO=$(grep -m1 '^Python ' "$WORK/env.out" || echo "$PYTHON could not import torch")
fi

# 2. The CUDA parity tests, from the files that hold them (named, so nothing else is collected).
CASE_TIMEOUT=0  # pytest-timeout (a pytest plugin, loaded by itself when installed) gives --timeout
if [[ $DRY_RUN == 1 ]] || "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then CASE_TIMEOUT=1; fi
per_test=()
((CASE_TIMEOUT)) && per_test=("--timeout=$((T_TESTS * CASE_SHARE / 100))")
run_step tests "$T_TESTS" "$PYTHON" -m pytest "${TEST_FILES[@]}" -q -p no:cacheprovider -k "$TESTS_K" \
    ${per_test[@]+"${per_test[@]}"}

# 3. The benchmark levels, one pytest session each (a hang or crash loses one level, not all); each level's JSON
#    goes to $OUT the moment the level ends (also when it was interrupted: it holds the finished cases).
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
run_level forward "$T_FORWARD" benchmarks/test_bench_model.py -k test_forward --dit-profile \
    --dit-impls reference,reference+compile,dit_fast,dit_fast+compile
run_level train "$T_TRAIN" benchmarks/test_bench_train.py --dit-profile --dit-rounds 5
run_level kernels "$T_KERNELS" benchmarks/test_bench_kernels.py benchmarks/test_bench_attention.py \
    -k "B256 or attention"
run_level sampling "$T_SAMPLING" benchmarks/test_bench_cuda_graph.py --dit-profile --dit-ddim-steps 20

# 4. FP8 (torchao float8 rowwise linears) against bf16, forward and trainer step, each against fp32; its JSON is
#    written after every case.
run_step fp8 "$T_FP8" "$PYTHON" -m benchmarks.fp8_check --json "$OUT/fp8.json"

# 5. One report over every level that produced results, and the profiler tables, folded into gpu_check.md.
REPORT_SH='set -e
out=$1; merged=$2; py=$3; shift 3
"$py" -m benchmarks.report "$@" --merged "$merged"
"$py" -m benchmarks.profiling "$@" >"$out/profiles.md"'
printf '%s\n' "$REPORT_SH" >"$WORK/report.sh"
if [[ $DRY_RUN == 1 ]]; then
    RESERVE=0 run_step report "$T_REPORT" bash "$WORK/report.sh" "$OUT" "$WORK/bench_gpu.json" "$PYTHON" \
        "$OUT/LEVEL.json"
    echo "[dry-run] plan total: ${PLANNED}s of step limits (budget ${BUDGET}s)"
    exit 0
fi
if ((${#JSONS[@]})); then
    RESERVE=0 run_step report "$T_REPORT" bash "$WORK/report.sh" "$OUT" "$WORK/bench_gpu.json" "$PYTHON" \
        "${JSONS[@]}"
else
    record report "skipped (no benchmark level produced results)" 0 "-"
fi
write_summary
echo "wrote $SUMMARY; $FAILURES step(s) failed or timed out"
((FAILURES == 0))
