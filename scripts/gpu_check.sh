#!/usr/bin/env bash
# One-shot GPU check (at most ~8 minutes on an H100/H200), with whatever CUDA torch is installed:
#   1. the environment (nvidia-smi, versions, compute capability);
#   2. the native extension built in place for this device's architecture (torch untouched);
#   3. the GPU tests (pytest -m gpu), JUnit XML kept;
#   4. benchmarks/gpu_check.py: kernel timings against copy bandwidth (eager and CUDA graphs,
#      batch 32 and 256, float32 and bfloat16, every stage shape), first-call times across batch
#      sizes, a training step under torch.cuda.set_sync_debug_mode("error"), and spanet_small vs
#      spanet_small:reference and convnext_tiny (training with AMP bfloat16, and inference).
# Results go to $OUT (or ./gpu-check-results): gpu_check.json, gpu_check.md (a block for
# benchmarks/RESULTS.md), the logs and tests.xml.
#
#   scripts/gpu_check.sh            # on a GPU machine
#   scripts/gpu_check.sh --smoke    # the same steps on the CPU in under two minutes: no build,
#                                   # Triton's interpreter, tiny sizes (CI runs this)
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --smoke)" >&2; exit 2 ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=${OUT:-gpu-check-results}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, with its in-place build
STATUS=0
step() { echo "== gpu_check: $*" | tee -a "$RESULTS/steps.log"; }

step "environment"
{
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PYTHON" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$RESULTS/environment.log"

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ARCH=""
    TESTS=(tests/spanet_ops/test_triton_kernels.py -k "test_spf_matches_reference and 7-7-1.0 and float32")
else
    ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')") || {
        echo "gpu_check.sh: torch sees no CUDA device (use --smoke on a CPU machine)" >&2; exit 2; }
    TESTS=(tests -m gpu)
fi

step "native extension for sm_${ARCH:-none}"
if [ -n "$ARCH" ]; then
    # In place (spanet_ops/_C*.so in this checkout), against the installed torch, never reinstalling it.
    if SPANET_CUDA_ARCHS="$ARCH" SPANET_BUILD_JOBS=${SPANET_BUILD_JOBS:-$(nproc)} timeout 150 \
        "$PYTHON" setup.py -q build_ext --inplace >"$RESULTS/build.log" 2>&1; then
        echo "built for sm_$ARCH" | tee -a "$RESULTS/steps.log"
    else
        echo "native build failed (see build.log); the Triton kernels and the PyTorch kernels still run" \
            | tee -a "$RESULTS/steps.log"
        STATUS=1
    fi
else
    echo "smoke run: no build (the checkout's extension, if any, is used)" | tee -a "$RESULTS/steps.log"
fi

step "tests: ${TESTS[*]}"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$RESULTS/tests.xml" \
    >"$RESULTS/tests.log" 2>&1
TEST_STATUS=$?
tail -n 3 "$RESULTS/tests.log" | tee -a "$RESULTS/steps.log"
[ "$TEST_STATUS" = 0 ] || STATUS=1

step "measurements"
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
timeout 170 "$PYTHON" benchmarks/gpu_check.py --out "$RESULTS" "${SMOKE_FLAG[@]}" 2>&1 | tee "$RESULTS/measurements.log"
[ "${PIPESTATUS[0]}" = 0 ] || STATUS=1

step "done (status $STATUS): results in $RESULTS"
exit $STATUS
