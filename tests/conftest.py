"""Test-session defaults: caches and temp files inside the project; Triton interpreted on CPU."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_kvbuffer.tools.local_env import apply_local_env  # noqa: E402

apply_local_env(ROOT)

# Triton kernels run interpreted on machines without a GPU. The flag must be set before any
# kernel is decorated, i.e. before vllm_kvbuffer.kernels.triton_impl is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
