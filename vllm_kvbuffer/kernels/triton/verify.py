"""Verify (score T = D + 1 tokens per sequence, appended tentatively) and accept.

verify: a program owns (sequence n, value head h, V tile). Its T tokens are solved in registers
(``(I + A) U = rhs``, unit lower-triangular, forward substitution over the constant T); the
history of all ``B`` buffered rows enters as one block of dots (rows past the cursor are dropped
with ``tl.where``), so no loop runs over the buffer length. The slot's state tile is requested
right after the cursor (two dependent round trips). No state is written; the cursor kernel marks
the T rows pending.

accept: commits the first ``num_accepted`` tentative rows; slots whose committed buffer reaches
``C`` are flushed by :mod:`.flush`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from .common import (COL_HAS_STATE, COL_LEN, DOT_PREC, MODE_ACCEPT, MODE_VERIFY, check_layout,
                     commit, l2norm_rows, slot_strides, slots_i32)
from .flush import flush_committed


@triton.jit
def _verify_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, slots_ptr,
    state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sb_t, sb_h, so_t, so_h,
    ss_s, sbk_s, sbu_s, sbg_s, sm_s,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, B: tl.constexpr,
    T: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr,
    USE_L2: tl.constexpr,
):
    """Tokens of sequence n are rows ``n*T .. n*T+T-1`` of the packed (N*T, heads, dim) inputs."""
    GROUP: tl.constexpr = HV // H
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    offs_j = tl.arange(0, BL)
    mk = offs_k < K
    mv = offs_v < V
    mt = offs_t < T
    mb = offs_j < B
    mtk = mt[:, None] & mk[None, :]
    mtv = mt[:, None] & mv[None, :]
    rows = tl.cast(n * T + offs_t, tl.int64)

    # Round trip 1: the slot and the T tokens' inputs.
    slot = tl.load(slots_ptr + n)
    k_raw = tl.load(k_ptr + rows[:, None] * sk_t + hk * sk_h + offs_k[None, :], mask=mtk,
                    other=0.0)
    q_raw = tl.load(q_ptr + rows[:, None] * sq_t + hk * sq_h + offs_k[None, :], mask=mtk,
                    other=0.0)
    vt = tl.load(v_ptr + rows[:, None] * sv_t + h * sv_h + offs_v[None, :], mask=mtv,
                 other=0.0).to(tl.float32)
    gt = tl.load(g_ptr + rows * sg_t + h * sg_h, mask=mt, other=0.0).to(tl.float32)
    bt = tl.load(beta_ptr + rows * sb_t + h * sb_h, mask=mt, other=0.0).to(tl.float32)
    if slot < 0:
        tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_v[None, :],
                 tl.zeros([BT, BV], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=mtv)
        return
    slot = tl.cast(slot, tl.int64)
    # Round trip 2: cursor, state tile and all B buffered rows.
    L = tl.load(meta_ptr + slot * sm_s + COL_LEN)
    has = tl.load(meta_ptr + slot * sm_s + COL_HAS_STATE)
    mk_s = offs_k < tl.where(has != 0, K, 0)   # no state read before a flush
    S = tl.load(state_ptr + slot * ss_s + h * (V * K) + offs_v[:, None] * K + offs_k[None, :],
                mask=mv[:, None] & mk_s[None, :], other=0.0).to(tl.float32)
    kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * (H * K) + hk * K + offs_k[None, :],
                 mask=mb[:, None] & mk[None, :], other=0.0)
    Gj = tl.load(bg_ptr + slot * sbg_s + offs_j * HV + h, mask=mb, other=0.0)
    mj = offs_j < L
    u_base = bu_ptr + slot * sbu_s + h * V
    hu = tl.load(u_base + offs_j[:, None] * (HV * V) + offs_v[None, :],
                 mask=mj[:, None] & mv[None, :], other=0.0)

    kt = l2norm_rows(k_raw.to(tl.float32), USE_L2)
    qt = l2norm_rows(q_raw.to(tl.float32), USE_L2) * scale
    # Rows at or past the cursor may hold anything (NaN included): where, not multiplication.
    G = tl.sum(tl.where(offs_j == L - 1, Gj, 0.0)) + tl.cumsum(gt, axis=0)       # [BT]
    eG = tl.exp(G)
    kh = tl.where(mj[:, None], l2norm_rows(kh.to(tl.float32), USE_L2), 0.0)
    dec = tl.where(mj[None, :], tl.exp(G[:, None] - Gj[None, :]), 0.0)          # [BT, BL]
    kk = tl.dot(kt, tl.trans(kh), input_precision=DOT_PREC) * dec
    qk = tl.dot(qt, tl.trans(kh), input_precision=DOT_PREC) * dec
    r_k = tl.dot(kt, tl.trans(S), input_precision=DOT_PREC)                       # [BT, BV]
    r_q = tl.dot(qt, tl.trans(S), input_precision=DOT_PREC)
    rhs = bt[:, None] * (vt - eG[:, None] * r_k - tl.dot(kk, hu, input_precision=DOT_PREC))
    lower = offs_t[:, None] >= offs_t[None, :]
    dec_b = tl.where(lower, tl.exp(G[:, None] - G[None, :]), 0.0)                 # [BT, BT]
    A = tl.where(offs_t[:, None] > offs_t[None, :],
                 bt[:, None] * dec_b * tl.dot(kt, tl.trans(kt), input_precision=DOT_PREC), 0.0)
    # Forward substitution: row t of U is final once rows < t are subtracted.
    U = rhs
    for t in tl.static_range(T):
        u_t = tl.sum(tl.where(offs_t[:, None] == t, U, 0.0), axis=0)             # [BV]
        a_t = tl.sum(tl.where(offs_t[None, :] == t, A, 0.0), axis=1)             # [BT] (col t)
        U = U - a_t[:, None] * u_t[None, :]
    U = tl.where(mtv, U, 0.0)
    qk_b = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * dec_b
    o = eG[:, None] * r_q + tl.dot(qk, hu, input_precision=DOT_PREC) \
        + tl.dot(qk_b, U, input_precision=DOT_PREC)
    tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_v[None, :],
             o.to(o_ptr.dtype.element_ty), mask=mtv)
    # Tentative rows L .. L+T-1; the rows of u of (head, V tile) belong to this program alone.
    brow = L + offs_t
    tl.store(u_base + brow[:, None] * (HV * V) + offs_v[None, :], U, mask=mtv)
    if iv == 0:
        tl.store(bg_ptr + slot * sbg_s + brow * HV + h, G, mask=mt)
        if h % GROUP == 0:
            tl.store(bk_ptr + slot * sbk_s + brow[:, None] * (H * K) + hk * K + offs_k[None, :],
                     k_raw, mask=mtk)


def verify(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    """``q, k [N, T, H, K]``, ``v [N, T, HV, V]``, ``g, beta [N, T, HV]`` -> ``o [N, T, HV, V]``."""
    N, T = q.shape[:2]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    slots = slots_i32(slots)
    # Flatten (N, T) to packed rows; these reshapes are views of the caller's contiguous inputs.
    q, k, v, g, beta = (x.reshape(N * T, *x.shape[2:]) for x in (q, k, v, g, beta))
    of = o.view(N * T, *o.shape[2:])
    check_layout(cache, q, k, v)
    cfg = tuning.launch_config(cache, "block")
    HV, V = cache.num_v_heads, cache.head_v_dim
    _verify_kernel[(N, HV, triton.cdiv(V, cfg["BV"]))](
        q, k, v, g, beta, of, slots,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), of.stride(0), of.stride(1),
        *slot_strides(cache), scale,
        H=cache.num_k_heads, HV=HV, K=cache.head_k_dim, V=V, B=cache.capacity, T=T,
        BT=tuning.pow2(T), BK=cfg["BK"], BV=cfg["BV"], BL=tuning.pow2(cache.capacity),
        USE_L2=use_qk_l2norm, num_warps=cfg["num_warps"],
    )
    commit(cache, slots, MODE_VERIFY, add_const=T)
    return o


def accept(cache, slots, num_accepted, *, use_qk_l2norm):
    """Commit ``num_accepted [N]`` tentative rows per slot; flush slots that reach ``C``."""
    N = slots.shape[0]
    if N == 0:
        return
    check_layout(cache)
    slots = slots_i32(slots)
    acc = num_accepted.to(torch.int32).contiguous()
    flush_committed(cache, slots, acc, use_qk_l2norm=use_qk_l2norm)
    commit(cache, slots, MODE_ACCEPT, add=acc)
