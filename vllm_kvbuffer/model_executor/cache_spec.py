"""The KVBuffer tensors as extra states of vLLM's GDN cache page.

vLLM 0.32 gives a Mamba-like layer one page per block and slices it, in the order of
``get_state_shape()`` / ``get_state_dtype()``, into one view per state
(``MambaBase.bind_kv_cache``). The stock GDN layer has two states, ``(conv, ssm)``; KVBuffer
appends four, so that vLLM's own allocator places the buffer beside the state:

    (B, HVr, V)  buf_u  float32   corrected values
    (B, HVr)     buf_g  float32   cumulative log-decay
    (8,)         meta   int32     [LEN, PENDING, HAS_STATE, CONV, VERIFY_POS, 0, 0, 0]
    (B, Hr, K)   buf_k  model dtype  raw keys

with ``B = chunk_size + max_draft_tokens``, ``Hr = H / tp``, ``HVr = HV / tp``. The 4-byte states
come right after the stock pair and the 2-byte ``buf_k`` last, so every state starts at a byte
offset that is a multiple of its element size (``Tensor.view(dtype)`` on the int8 page requires
it). The model classmethods that size the page and the layer must both use these functions.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import torch

from ..kernels.cache import META_COLS, KVBufferCache
from ..kernels.validation import check, check_int

NUM_STOCK_STATES = 2   # (conv, ssm) of vLLM's GDN layer


def kvbuffer_state_shapes(*, tp_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                          head_v_dim: int, chunk_size: int, max_draft_tokens: int = 0
                          ) -> tuple[tuple[int, ...], ...]:
    """Shapes appended after vLLM's ``(conv, ssm)`` GDN states, per TP rank."""
    for name, val, lo in (("tp_size", tp_size, 1), ("num_k_heads", num_k_heads, 1),
                          ("num_v_heads", num_v_heads, 1), ("head_k_dim", head_k_dim, 1),
                          ("head_v_dim", head_v_dim, 1), ("chunk_size", chunk_size, 1),
                          ("max_draft_tokens", max_draft_tokens, 0)):
        check_int(name, val, minimum=lo)
    check(num_k_heads % tp_size == 0, "num_k_heads", f"divisible by tp_size={tp_size}",
          num_k_heads)
    check(num_v_heads % tp_size == 0, "num_v_heads", f"divisible by tp_size={tp_size}",
          num_v_heads)
    B = chunk_size + max_draft_tokens
    Hr, HVr = num_k_heads // tp_size, num_v_heads // tp_size
    return ((B, HVr, head_v_dim), (B, HVr), (META_COLS,), (B, Hr, head_k_dim))


def kvbuffer_state_dtypes(model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """dtypes matching :func:`kvbuffer_state_shapes` (``model_dtype``: dtype of k after conv)."""
    return (torch.float32, torch.float32, torch.int32, model_dtype)


def state_byte_offsets(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype]
                       ) -> list[int]:
    """Byte offset of each state in a page, as ``MambaBase.bind_kv_cache`` lays them out."""
    offsets, off = [], 0
    for shape, dt in zip(shapes, dtypes):
        offsets.append(off)
        off += prod(shape) * torch.empty((), dtype=dt).element_size()
    return offsets


def check_page_layout(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype],
                      page_size: int | None = None) -> None:
    """Every state must start at a multiple of its element size, and so must the page stride."""
    check(len(shapes) == len(dtypes), "dtypes", f"{len(shapes)} entries (one per shape)",
          len(dtypes))
    for i, (off, dt) in enumerate(zip(state_byte_offsets(shapes, dtypes), dtypes)):
        esz = torch.empty((), dtype=dt).element_size()
        check(off % esz == 0, f"state {i} byte offset", f"a multiple of {esz} ({dt})", off)
        if page_size is not None:
            check(page_size % esz == 0, "page size", f"a multiple of {esz} ({dt})", page_size)


def cache_from_layer_states(kv_cache: Sequence[torch.Tensor], *, chunk_size: int,
                            max_draft_tokens: int = 0, beta_max: float = 1.0) -> KVBufferCache:
    """A :class:`KVBufferCache` over a KVBuffer GDN layer's bound ``self.kv_cache``.

    ``kv_cache`` is ``(conv, ssm, buf_u, buf_g, meta, buf_k)``, each ``[num_blocks, *shape]`` and
    strided by the (padded) page. No copy: the cache's tensors are these views, so slot ids are
    vLLM's block ids. ``beta_max``: the layer's bound on beta (:class:`KVBufferCache`).
    """
    check(len(kv_cache) == NUM_STOCK_STATES + 4, "kv_cache",
          f"{NUM_STOCK_STATES + 4} states (conv, ssm, buf_u, buf_g, meta, buf_k)", len(kv_cache))
    _, ssm, buf_u, buf_g, meta, buf_k = kv_cache
    return KVBufferCache(state=ssm, buf_k=buf_k, buf_u=buf_u, buf_g=buf_g, meta=meta,
                         chunk_size=chunk_size, max_draft_tokens=max_draft_tokens,
                         beta_max=beta_max)
