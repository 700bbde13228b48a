"""Flush after accept: fold a slot's committed buffer into its state when it reaches ``C``.

A program owns (sequence n, value head h, V tile): ``S_C = exp(G_end) S0 + sum_j exp(G_end - G_j)
u_j k_j^T`` as one ``tl.dot`` over all ``B`` buffered rows (rows past the committed length are
dropped with ``tl.where``), so no loop runs over the buffer length. Programs of slots that do not
flush return after reading the cursor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import tuning
from .common import COL_HAS_STATE, COL_LEN, DOT_PREC, l2norm_rows, slot_strides


@triton.jit
def _flush_kernel(
    slots_ptr, acc_ptr, state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    ss_s, sbk_s, sbu_s, sbg_s, sm_s,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, B: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, USE_L2: tl.constexpr,
):
    GROUP: tl.constexpr = HV // H
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    slot = tl.load(slots_ptr + n)
    added = tl.load(acc_ptr + n)
    if slot < 0:
        return
    slot = tl.cast(slot, tl.int64)
    Lc = tl.load(meta_ptr + slot * sm_s + COL_LEN) + added
    has = tl.load(meta_ptr + slot * sm_s + COL_HAS_STATE)
    if Lc < C:
        return
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_j = tl.arange(0, BL)
    mk = offs_k < K
    mv = offs_v < V
    mj = offs_j < Lc
    s_ptrs = state_ptr + slot * ss_s + h * (V * K) + offs_v[:, None] * K + offs_k[None, :]
    mk_s = offs_k < tl.where(has != 0, K, 0)   # no state read before a flush
    S = tl.load(s_ptrs, mask=mv[:, None] & mk_s[None, :], other=0.0).to(tl.float32)
    kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * (H * K) + hk * K + offs_k[None, :],
                 mask=mj[:, None] & mk[None, :], other=0.0)
    Gj = tl.load(bg_ptr + slot * sbg_s + offs_j * HV + h, mask=mj, other=0.0)
    hu = tl.load(bu_ptr + slot * sbu_s + offs_j[:, None] * (HV * V) + h * V + offs_v[None, :],
                 mask=mj[:, None] & mv[None, :], other=0.0)
    G_end = tl.sum(tl.where(offs_j == Lc - 1, Gj, 0.0))
    wj = tl.where(mj, tl.exp(G_end - Gj), 0.0)
    kh = l2norm_rows(kh.to(tl.float32), USE_L2)
    S = tl.exp(G_end) * S + tl.dot(tl.trans(hu * wj[:, None]), kh, input_precision=DOT_PREC)
    tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=mv[:, None] & mk[None, :])


def flush_committed(cache, slots, added, *, use_qk_l2norm):
    """Flush the slots whose committed length plus ``added [N]`` int32 reaches ``C``."""
    N = slots.shape[0]
    cfg = tuning.launch_config(cache, "flush")
    HV, V = cache.num_v_heads, cache.head_v_dim
    _flush_kernel[(N, HV, triton.cdiv(V, cfg["BV"]))](
        slots, added, cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        *slot_strides(cache),
        H=cache.num_k_heads, HV=HV, K=cache.head_k_dim, V=V, B=cache.capacity,
        C=cache.chunk_size, BK=cfg["BK"], BV=cfg["BV"], BL=tuning.pow2(cache.capacity),
        USE_L2=use_qk_l2norm, num_warps=cfg["num_warps"],
    )
