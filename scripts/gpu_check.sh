#!/usr/bin/env bash
# The one command of a GPU run, from the repository root, with the machine's own python3 (torch installed,
# dualroute not: it runs from this checkout through PYTHONPATH):
#
#   bash scripts/gpu_check.sh
#
# Steps: nvidia-smi; versions, installed packages and which grouped-matmul kernels dualroute can use;
# tests/test_cuda.py; the CPU test suite (checks this torch / Python; pytest-xdist if installed, else one
# process per test file, 8 at a time); bench layer, bench hf, bench lm and bench generate on the GPU.
# Every step runs under `timeout` (all limits together: under 7 minutes); a failing step does not stop
# the others; the exit status is 1 if any step failed or timed out. Everything printed also goes to
# $OUT/gpu_check.log; the benchmarks write their JSON results next to it.
#
# Environment:
#   OUT               where the log and results go (default /tmp/gpu_out)
#   PYTHON            the interpreter (default python3)
#   GPU_CHECK_DEVICE  the device of the tests and benchmarks (default cuda; cpu to try this script without a GPU)
#   GPU_CHECK_TINY=1  tiny benchmark sizes and a two-file CPU suite, to run every step of this script quickly
#   GPU_CHECK_TIMEOUT_SCALE  multiplies every step's time limit (default 1; e.g. 4 on a slow CPU-only machine)
#
# Try it on a machine without a GPU:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 GPU_CHECK_TIMEOUT_SCALE=4 bash scripts/gpu_check.sh

set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/gpu_out}"
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
TINY="${GPU_CHECK_TINY:-0}"
SCALE="${GPU_CHECK_TIMEOUT_SCALE:-1}"
TAG="${DEVICE%%:*}"  # file-name suffix: cuda or cpu
if ! [[ "$SCALE" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check: GPU_CHECK_TIMEOUT_SCALE must be a positive integer, got '$SCALE'" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export GPU_CHECK_DEVICE="$DEVICE"
if [ "$DEVICE" = cpu ]; then
    export DUALROUTE_TEST_DEVICE=cpu  # tests/test_cuda.py then runs on the CPU instead of skipping
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"

FAILED=()
SUMMARY=()

# step NAME SECONDS COMMAND...: run COMMAND under timeout and record ok / FAIL / TIMEOUT.
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local start=$SECONDS rc=0 status command="$*"
    command=${command//$'\n'/ }
    [ "$limit" -ge 1 ] || limit=1  # timeout 0 would mean no limit at all
    echo
    echo "=== $name (limit ${limit}s): ${command:0:240}"
    timeout --kill-after=2 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
    else
        status="FAIL (exit $rc)"
    fi
    echo "=== $name: $status, $((SECONDS - start))s"
    SUMMARY+=("$(printf '%-22s %s, %ss' "$name" "$status" "$((SECONDS - start))")")
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
    fi
}

ENV_REPORT='
import importlib, os, platform, sys
import torch
print("python", sys.version.split()[0], "on", platform.platform())
cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", cudnn,
      "| float32 matmul precision", torch.get_float32_matmul_precision())
print("CUDA available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
for name in ("transformers", "pytest", "xdist", "hypothesis", "numpy", "safetensors", "tqdm", "tokenizers",
             "matplotlib", "sklearn"):
    try:
        print(f"{name:12s}", getattr(importlib.import_module(name), "__version__", "(no version)"))
    except Exception as e:
        print(f"{name:12s} MISSING ({type(e).__name__}: {e})")
import dualroute
from dualroute import experts
print("dualroute from", os.path.dirname(dualroute.__file__))
device = torch.device(os.environ["GPU_CHECK_DEVICE"])
print("torch._grouped_mm exists:", hasattr(torch, "_grouped_mm"))
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    try:
        usable = experts._grouped_mm_works(device, dtype)
    except Exception as e:  # no such device here: say so, and fail the step at the end
        usable = f"ERROR {type(e).__name__}: {e}"
    print(f"dualroute uses the fused torch._grouped_mm on {device} {str(dtype)[6:]}: {usable}")
torch.empty(1, device=device)  # the device must exist
'

# The CPU suite without pytest-xdist: one pytest per test file, 8 at a time, each file's output in its own log.
# Prints one line per file; exits non-zero if any file failed.
suite_by_file() {
    local dir="$OUT/cpu_suite"
    mkdir -p "$dir"
    printf '%s\n' "$@" | xargs -P 8 -I{} sh -c '
        log="$2/$(basename "$1" .py).log"
        "$0" -m pytest --no-header -p no:cacheprovider -x -m "not slow" "$1" >"$log" 2>&1
        rc=$?
        echo "$(basename "$1"): exit $rc, $(tail -n 1 "$log")"
        exit $rc' "$PY" {} "$dir"
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), device $DEVICE, tiny=$TINY, limits x$SCALE, out $OUT"

    if command -v nvidia-smi >/dev/null; then
        step nvidia-smi 10 nvidia-smi
    elif [ "$TAG" = cuda ]; then
        echo "nvidia-smi: not found"
        FAILED+=(nvidia-smi)
        SUMMARY+=("nvidia-smi             FAIL (not found)")
    else
        echo "nvidia-smi: not found (device $DEVICE: not needed)"
    fi
    step environment 40 "$PY" -c "$ENV_REPORT"

    step "cuda tests" 90 "$PY" -m pytest --no-header -p no:cacheprovider -rfEs \
        --junitxml="$OUT/test_cuda.xml" tests/test_cuda.py

    # The CPU suite: no GPU visible, so it is the same suite as on a CPU-only machine; test_cuda ran above.
    local suite=(tests)
    if [ "$TINY" = 1 ]; then
        suite=(tests/test_bench.py tests/test_cli.py)
    fi
    if "$PY" -c "import xdist" 2>/dev/null; then
        step "cpu suite (xdist)" 110 env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 "$PY" -m pytest --no-header \
            -p no:cacheprovider -n 8 -x -m "not slow" --tb=short -rfE --ignore=tests/test_cuda.py "${suite[@]}"
    else
        echo "pytest-xdist is not installed: one pytest process per test file, 8 at a time (logs in $OUT/cpu_suite)"
        local files=() path file
        for path in "${suite[@]}"; do
            for file in $( [ -d "$path" ] && ls "$path"/test_*.py || echo "$path" ); do
                [ "$file" = tests/test_cuda.py ] || files+=("$file")
            done
        done
        export -f suite_by_file
        export OUT PY
        step "cpu suite (by file)" 110 env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 \
            bash -c 'suite_by_file "$@"' suite_by_file "${files[@]}"
    fi

    local layer=(--tokens 16384 --dim 1024 --hidden 2048)
    local hf=(--tokens 1,16,256,4096,16384 --dim 2048 --hidden 4096 --experts 8 --top-k 2 --budget 2
              --batched-mm-max-gib 8)
    local lm=() generate=()
    if [ "$TINY" = 1 ]; then
        layer=(--tokens 64 --dim 16 --hidden 32 --repeats 1 --decode-repeats 2 --threads 2)
        hf=(--tokens 1,16 --dim 16 --hidden 32 --experts 4 --top-k 2 --budget 0.05 --peak-size 64)
        lm=(--repeats 1 model.n_layers=1 train.batch_size=2 train.seq_len=8)
        generate=(--repeats 1 --new-tokens 2 model.n_layers=1)
    fi
    step "bench layer bf16" 40 "$PY" -m dualroute bench layer --device "$DEVICE" --dtype bfloat16 "${layer[@]}" \
        --json "$OUT/bench_layer_${TAG}.json"
    step "bench hf bf16" 70 "$PY" -m dualroute bench hf --device "$DEVICE" --dtype bfloat16 "${hf[@]}" \
        --json "$OUT/bench_hf_${TAG}.json"
    step "bench lm fp32 parts" 20 "$PY" -m dualroute bench lm --device "$DEVICE" --parts \
        --json "$OUT/bench_lm_${TAG}_float32.json" "${lm[@]}"
    step "bench lm bf16" 15 "$PY" -m dualroute bench lm --device "$DEVICE" --dtype bfloat16 \
        --json "$OUT/bench_lm_${TAG}_bfloat16.json" "${lm[@]}"
    step "bench generate" 25 "$PY" -m dualroute bench generate --device "$DEVICE" \
        --json "$OUT/bench_generate_${TAG}.json" "${generate[@]}"

    echo
    echo "=== summary ($SECONDS s in all)"
    printf '  %s\n' "${SUMMARY[@]}"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "FAILED: ${FAILED[*]}"
        return 1
    fi
    echo "all steps ok"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
