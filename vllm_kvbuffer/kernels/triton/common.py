"""Shared pieces of the Triton kernels: named constants, in-kernel helpers, pool layout, commit.

Pool layout seen by the kernels: every pool tensor (``state [S, HV, V, K]``, ``buf_k [S, B, H, K]``,
``buf_u [S, B, HV, V]``, ``buf_g [S, B, HV]``, ``meta [S, 4]``) is contiguous inside a slot and
only its slot stride is free (vLLM pads pages between slots, never inside one). The kernels take
that one stride per tensor; the strides inside a slot follow from the shape, as compile-time
constants, so address arithmetic folds and state loads can be 128-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cache import META_HAS_STATE, META_LEN, META_PENDING, KVBufferCache

# meta columns, as kernel constants.
COL_LEN = tl.constexpr(META_LEN)
COL_PENDING = tl.constexpr(META_PENDING)
COL_HAS_STATE = tl.constexpr(META_HAS_STATE)
# What the cursor kernel does after a main launch.
MODE_DECODE = tl.constexpr(0)     # LEN += 1 (flush at C)
MODE_VERIFY = tl.constexpr(1)     # PENDING = T, LEN unchanged
MODE_ACCEPT = tl.constexpr(2)     # LEN += accepted (flush at C), PENDING = 0
# fp32 matrix products inside the kernels. "tf32x3" (three TF32 tensor-core products, error
# about that of fp32 FMA) keeps register use low; plain "ieee" FMA dots hold whole K-strips per
# thread and spill. The interpreter computes every dot in exact fp32 regardless.
DOT_PREC = tl.constexpr("tf32x3")
# Small products (16 x 32 operands) in plain fp32 FMA: exact, and without the tensor-core operand
# layouts that replicate a [16, K] block in every warp.
DOT_FMA = tl.constexpr("ieee")
L2_EPS = tl.constexpr(1e-6)


@triton.jit
def l2norm_rows(x, USE_L2: tl.constexpr):
    if USE_L2:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1, keep_dims=True) + L2_EPS)
    return x


@triton.jit
def l2norm_vec(x, USE_L2: tl.constexpr):
    if USE_L2:
        x = x * tl.rsqrt(tl.sum(x * x) + L2_EPS)
    return x


_POOL = ("state", "buf_k", "buf_u", "buf_g", "meta")


def slot_strides(cache: KVBufferCache) -> tuple:
    """``(state, buf_k, buf_u, buf_g, meta)`` slot strides, in elements."""
    return tuple(getattr(cache, name).stride(0) for name in _POOL)


def check_layout(cache: KVBufferCache, *inputs: torch.Tensor) -> None:
    """Pool tensors contiguous inside a slot; inputs with unit stride in their last dim."""
    for name in _POOL:
        t = getattr(cache, name)
        want, acc = [], 1
        for size in reversed(t.shape[1:]):
            want.append(acc)
            acc *= size
        want = want[::-1]
        got = list(t.stride()[1:])
        if any(w != g for w, g, size in zip(want, got, t.shape[1:]) if size > 1):
            raise ValueError(f"cache.{name}: expected contiguous slots (strides {tuple(want)} "
                             f"inside a slot; only the slot stride may be padded), got strides "
                             f"{t.stride()}")
    for i, t in enumerate(inputs):
        if t.stride(-1) != 1:
            raise ValueError(f"input {i}: expected unit stride in the last dim, got {t.stride()}")


def slots_i32(slots: torch.Tensor) -> torch.Tensor:
    return slots if slots.dtype == torch.int32 and slots.is_contiguous() else \
        slots.to(torch.int32).contiguous()


@triton.jit
def _commit_kernel(slots_ptr, add_ptr, meta_ptr, sm_s, add_const,
                   C: tl.constexpr, MODE: tl.constexpr):
    """Cursor update after a main launch: programs of one slot read the old cursor there, so
    none of them may write it."""
    n = tl.program_id(0)
    slot = tl.load(slots_ptr + n)
    if slot < 0:
        return
    base = meta_ptr + tl.cast(slot, tl.int64) * sm_s
    L = tl.load(base + COL_LEN)
    if MODE == MODE_VERIFY:       # the T rows after L are tentative
        tl.store(base + COL_PENDING, add_const)
    else:
        if MODE == MODE_DECODE:
            add = add_const
        else:
            add = tl.load(add_ptr + n)
        new = L + add
        if new >= C:
            tl.store(base + COL_HAS_STATE, 1)
            new = 0
        tl.store(base + COL_LEN, new)
        if MODE == MODE_ACCEPT:
            tl.store(base + COL_PENDING, 0)


def commit(cache: KVBufferCache, slots: torch.Tensor, mode, *, add=None, add_const: int = 0):
    N = slots.shape[0]
    if N == 0:
        return
    _commit_kernel[(N,)](slots, add if add is not None else slots, cache.meta, cache.meta.stride(0),
                         add_const, C=cache.chunk_size, MODE=getattr(mode, "value", mode),
                         num_warps=1)
