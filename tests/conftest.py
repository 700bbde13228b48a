"""Test-session defaults: keep caches in the project, and make torch deterministic enough."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CACHE = ROOT / ".cache"
for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TRITON_CACHE_DIR", "triton"),
                 ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("XDG_CACHE_HOME", "xdg"),
                 ("HF_HOME", "hf"), ("TMPDIR", "tmp")):
    if var not in os.environ:
        os.environ[var] = str(_CACHE / sub)
        (_CACHE / sub).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Triton kernels run interpreted on machines without a GPU. The flag must be set before any
# kernel is decorated, i.e. before vllm_kvbuffer.kernels.triton_impl is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
