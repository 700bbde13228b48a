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
