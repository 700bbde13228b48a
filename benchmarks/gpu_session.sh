#!/usr/bin/env bash
# One prepared GPU session (H100/H200): environment report, decode benchmark, GPU tests.
# Everything lands in $OUT (default .cache/gpu-out). Optional wheels in .whl/ (e.g.
# flash-linear-attention and fla-core, for the baseline) are installed into /tmp/site first.
# Usage: bash benchmarks/gpu_session.sh [bench-args...]
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.cache/gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

echo "== decode benchmark"
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_decode.py --out "$OUT/decode.json" "$@" \
  2>&1 | tee "$OUT/bench_decode.log" | grep -v Warning
echo "bench exit: ${PIPESTATUS[0]}"

echo "== GPU tests (compiled kernels)"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rA \
  tests/kernels/test_triton_gpu.py tests/kernels/test_triton_interpreted.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests exit: $?"
grep -E "passed|failed|PASSED|FAILED|Error" "$OUT/gpu_tests.log" | tail -25
