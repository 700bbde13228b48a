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


def make_cyclic_checkpoint(src: str, dst: pathlib.Path, *, layer_scale: float,
                           period: int = 5) -> str:
    """A variant of a tiny checkpoint whose greedy text mostly cycles through groups of
    ``period`` token ids, so that n-gram and MTP drafts are often right (accepted) and, where the
    layers (their outputs scaled by ``layer_scale``) push the text off the cycle, wrong
    (rejected). The LM head maps each token's embedding to its successor in its group; the MTP
    layer (if any) passes the next token's embedding through, so it drafts the successor too."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").exists():
        return str(dst)
    tmp = dst.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    sd = load_file(str(tmp / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    V = emb.shape[0]
    succ = torch.arange(V)
    succ = (succ // period) * period + (succ % period + 1) % period
    succ[succ >= V] = (torch.arange(V)[succ >= V] // period) * period
    head = torch.empty_like(sd["lm_head.weight"])
    head[succ] = emb
    sd["lm_head.weight"] = head.contiguous()
    for k in list(sd):
        if k.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            sd[k] = sd[k] * layer_scale
        if k == "mtp.fc.weight":
            H = sd[k].shape[0]
            fc = torch.zeros_like(sd[k])
            fc[:, :H] = torch.eye(H)
            sd[k] = fc
        if k.startswith("mtp.") and k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] = sd[k] * 0.01
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)
    return str(dst)


@pytest.fixture(scope="session")
def tiny_cyclic_mtp_fp32():
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    src = build_tiny_qwen3_next(ROOT / ".cache" / "models" / "tiny-qwen3-next-mtp-fp32",
                                dtype="float32", mtp=True)
    # layer_scale 4: measured on this checkpoint, 320 tokens, 3 drafts: n-gram and MTP drafts
    # are both partly accepted and partly rejected.
    return make_cyclic_checkpoint(str(src), ROOT / ".cache" / "models" /
                                  "tiny-qwen3-next-mtp-fp32-cyclic-4", layer_scale=4.0)
