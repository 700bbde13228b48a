"""Triton kernels for KVBuffer (backend ``"triton"``), one module per operation.

Same semantics as :mod:`..torch_impl` (the exact reference they are tested against):
:mod:`.decode` (T = 1, fused flush), :mod:`.verify` (T = D + 1 tentative tokens, and accept),
:mod:`.prefill` (variable-length chunks), :mod:`.flush` (fold a committed buffer into the state
after accept); :mod:`.common` holds the named constants, the pool layout and the cursor kernel.
The launch policy (block sizes, warps, pipeline stages, splits) lives in :mod:`..tuning`.

No host syncs and no data-dependent allocation in decode / verify / accept (CUDA-graph safe).
Negative slot ids are padding: their outputs are zero and nothing is read or written.
Launch configs are fixed per shape (no runtime autotuning of kernels that write state in place).
Gates (``g``, ``beta``), the L2 norm and the scale are applied in-kernel in fp32.
"""

from .decode import decode
from .prefill import prefill
from .verify import accept, verify

__all__ = ["accept", "decode", "prefill", "verify"]
