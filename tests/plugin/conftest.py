"""Fixtures for real-engine tests: tiny checkpoints and a one-engine-per-process runner."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = pathlib.Path(__file__).with_name("engine_run.py")


@pytest.fixture(scope="session")
def tiny_fp32():
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    return str(build_tiny_qwen3_next(ROOT / ".cache" / "models" / "tiny-qwen3-next-fp32",
                                     dtype="float32"))


@pytest.fixture(scope="session")
def tiny_bf16():
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    return str(build_tiny_qwen3_next(ROOT / ".cache" / "models" / "tiny-qwen3-next",
                                     dtype="bfloat16"))


def run_engine(spec: dict, *, env: dict | None = None, expect_ok: bool = True,
               timeout: int = 600):
    """Run one engine in a subprocess; return its parsed outputs (or the failed process)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    proc.info = result["info"]
    return result["outputs"], proc
