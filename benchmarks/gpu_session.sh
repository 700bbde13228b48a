#!/usr/bin/env bash
# One prepared GPU session (H100/H200), about 8 minutes: environment report, every benchmark of
# issue 6 at the issue's shapes (decode, short context, verify, layer stack), the tuner, and the
# GPU tests. Everything lands in $OUT (default .cache/gpu-out): JSON, logs, PNGs (if matplotlib is
# there; otherwise draw them later with python -m benchmarks.plot), and the tuned configs JSON (copy it
# into vllm_kvbuffer/kernels/configs/ to ship it).
# Wheels: .whl/*.whl (flash-linear-attention, fla-core: the fla baseline) are installed into
# /tmp/site; .whl/extra/sglang-*.whl is NOT installed: benchmarks/replayssm.py loads SGLang's
# ReplaySSM kernel module from it. Carry the .whl folder with the run.
# Each step has its own time limit (seconds, overridable) and saves JSON as it goes, so a step
# cut short keeps its finished rows.
# Usage: bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.cache/gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export KVB_CACHE="${KVB_CACHE:-/tmp/kvb-cache}"
T0=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
  ls .whl/extra/ 2>&1
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, t=$(( $(date +%s) - T0 ))s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit: $?"
  grep -v -i warning "$OUT/$name.log" | tail -n "${TAIL:-8}"
}

# The kernels' static structure compiled by this machine's Triton (issue 12 audit: registers,
# state loads in flight, round trips), beside the timings it explains.
step audit "${AUDIT_TIMEOUT:-90}" python3 -m vllm_kvbuffer.kernels.audit --out "$OUT/audit.json"
step decode "${DECODE_TIMEOUT:-150}" python3 -m benchmarks.bench_decode --plot \
  --out "$OUT/decode.json" --tp 1 --batch 1,8,64,256,512 --chunk 8,16,32,64 --state-dtype fp32,bf16
step decode_tp4 "${DECODE4_TIMEOUT:-35}" python3 -m benchmarks.bench_decode --plot \
  --out "$OUT/decode_tp4.json" --tp 4 --batch 64,512 --chunk 16,64 --state-dtype fp32
step short_context "${SHORT_TIMEOUT:-35}" python3 -m benchmarks.bench_short_context --plot \
  --out "$OUT/short_context.json" --batch 1,8,64,256,512 --length 4,16,48
step verify "${VERIFY_TIMEOUT:-50}" python3 -m benchmarks.bench_verify --plot \
  --out "$OUT/verify.json" --batch 1,8,64,256 --drafts 1,2,4,8
step layer_stack "${STACK_TIMEOUT:-60}" python3 -m benchmarks.bench_layer_stack --plot \
  --out "$OUT/layer_stack.json" --batch 1,16,64,256
step tune "${TUNE_TIMEOUT:-70}" python3 -m benchmarks.tune --batch 8,128 --tp 1,4 \
  --out "$OUT/tuned_configs.json"
echo "== GPU tests (t=$(( $(date +%s) - T0 ))s)"
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider -rA \
  tests/kernels/test_triton_gpu.py tests/kernels/test_triton_interpreted.py \
  tests/kernels/test_triton_compile.py \
  tests/model_executor/test_gdn_core_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests exit: $?"
grep -E "passed|failed|PASSED|FAILED|Error" "$OUT/gpu_tests.log" | tail -25
echo "== done in $(( $(date +%s) - T0 ))s"
