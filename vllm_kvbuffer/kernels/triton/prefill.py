"""Prefill: packed variable-length chunks of N sequences, each continuing its slot.

A program owns (sequence n, value head h, V tile) and walks its tokens segment by segment, at
most ``C - L`` tokens each, with its state tile held in registers: T tokens are solved in
registers (``(I + A) U = rhs``, unit lower-triangular, forward substitution), every full chunk is
folded into the tile, and the tile is written back once at the end if any flush happened. The
tail stays in the buffer; its raw keys and decays are copied into the buffer rows by
``_prefill_commit_kernel``, which also moves the cursor, after the main launch (programs of a
slot may still read rows ``0 .. L0-1`` as history after another program flushed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from .common import (COL_HAS_STATE, COL_LEN, DOT_PREC, check_layout, l2norm_rows, slot_strides,
                     slots_i32)

HIST_BLOCK = 16          # history rows per inner iteration (tl.dot needs >= 16)


@triton.jit
def _history_rows(k_base, u_base, g_base, j0, L, offs_k, mk, offs_v, mv,
                  H: tl.constexpr, K: tl.constexpr, HV: tl.constexpr, V: tl.constexpr,
                  BLH: tl.constexpr, USE_L2: tl.constexpr):
    """Buffered rows ``j0 .. j0+BLH-1`` (those < L): normalised keys ``[BLH, BK]``, cumulative
    decays ``[BLH]``, corrected values of the V tile ``[BLH, BV]`` and the row mask."""
    offs_j = j0 + tl.arange(0, BLH)
    mj = offs_j < L
    kh = tl.load(k_base + offs_j[:, None] * (H * K) + offs_k[None, :],
                 mask=mj[:, None] & mk[None, :], other=0.0)
    kh = l2norm_rows(kh.to(tl.float32), USE_L2)
    Gj = tl.load(g_base + offs_j * HV, mask=mj, other=0.0)
    hu = tl.load(u_base + offs_j[:, None] * (HV * V) + offs_v[None, :],
                 mask=mj[:, None] & mv[None, :], other=0.0)
    return kh, Gj, hu, mj


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, slots_ptr, cu_ptr, gs_ptr,
    state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sb_t, sb_h, so_t, so_h,
    ss_s, sbk_s, sbu_s, sbg_s, sm_s,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BLH: tl.constexpr,
    USE_L2: tl.constexpr,
):
    """Tokens of sequence n are rows ``cu[n]:cu[n+1]`` of the packed (T, heads, dim) inputs;
    ``gs_ptr [T, HV]`` stages the decays of the tokens that stay buffered."""
    GROUP: tl.constexpr = HV // H
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk = offs_k < K
    mv = offs_v < V
    start = tl.load(cu_ptr + n)
    end = tl.load(cu_ptr + n + 1)
    slot = tl.load(slots_ptr + n)
    if slot < 0:
        for p0 in range(start, end, BT):
            rows = tl.cast(p0 + offs_t, tl.int64)
            tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_v[None, :],
                     tl.zeros([BT, BV], dtype=tl.float32).to(o_ptr.dtype.element_ty),
                     mask=(rows < end)[:, None] & mv[None, :])
        return
    slot = tl.cast(slot, tl.int64)
    L = tl.load(meta_ptr + slot * sm_s + COL_LEN)
    has = tl.load(meta_ptr + slot * sm_s + COL_HAS_STATE)
    bg_base = bg_ptr + slot * sbg_s + h
    G_base = tl.load(bg_base + (L - 1) * HV, mask=L > 0, other=0.0)

    s_ptrs = state_ptr + slot * ss_s + h * (V * K) + offs_v[:, None] * K + offs_k[None, :]
    ms = mv[:, None] & mk[None, :]
    # A slot that never flushed reads no state.
    mk_s = offs_k < tl.where(has != 0, K, 0)
    S = tl.load(s_ptrs, mask=mv[:, None] & mk_s[None, :], other=0.0).to(tl.float32)
    flushed = 0

    lower = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    pos = start
    while pos < end:
        cnt = tl.minimum(end - pos, C - L)
        rows = tl.cast(pos + offs_t, tl.int64)
        mt = offs_t < cnt
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        k_raw = tl.load(k_ptr + rows[:, None] * sk_t + hk * sk_h + offs_k[None, :], mask=mtk,
                        other=0.0)
        kt = l2norm_rows(k_raw.to(tl.float32), USE_L2)
        qt = l2norm_rows(tl.load(q_ptr + rows[:, None] * sq_t + hk * sq_h + offs_k[None, :],
                                  mask=mtk, other=0.0).to(tl.float32), USE_L2) * scale
        vt = tl.load(v_ptr + rows[:, None] * sv_t + h * sv_h + offs_v[None, :], mask=mtv,
                     other=0.0).to(tl.float32)
        gt = tl.load(g_ptr + rows * sg_t + h * sg_h, mask=mt, other=0.0).to(tl.float32)
        bt = tl.load(beta_ptr + rows * sb_t + h * sb_h, mask=mt, other=0.0).to(tl.float32)
        G = G_base + tl.cumsum(gt, axis=0)                                       # [BT]
        eG = tl.exp(G)

        r_k = tl.dot(kt, tl.trans(S), input_precision=DOT_PREC)                   # [BT, BV]
        r_q = tl.dot(qt, tl.trans(S), input_precision=DOT_PREC)
        acc_k = tl.zeros([BT, BV], dtype=tl.float32)
        acc_q = tl.zeros([BT, BV], dtype=tl.float32)
        upd = tl.zeros([BV, BK], dtype=tl.float32)
        G_end = tl.sum(tl.where(offs_t == cnt - 1, G, 0.0))
        will_flush = L + cnt == C
        for j0 in range(0, L, BLH):
            kh, Gj, hu, mj = _history_rows(bk_ptr + slot * sbk_s + hk * K,
                                           bu_ptr + slot * sbu_s + h * V, bg_base, j0, L,
                                           offs_k, mk, offs_v, mv, H, K, HV, V, BLH, USE_L2)
            dec = tl.where(mj[None, :], tl.exp(G[:, None] - Gj[None, :]), 0.0)   # [BT, BLH]
            kk = tl.dot(kt, tl.trans(kh), input_precision=DOT_PREC) * dec
            qk = tl.dot(qt, tl.trans(kh), input_precision=DOT_PREC) * dec
            acc_k += tl.dot(kk, hu, input_precision=DOT_PREC)
            acc_q += tl.dot(qk, hu, input_precision=DOT_PREC)
            if will_flush:
                wj = tl.where(mj, tl.exp(G_end - Gj), 0.0)
                upd += tl.dot(tl.trans(hu * wj[:, None]), kh, input_precision=DOT_PREC)

        rhs = bt[:, None] * (vt - eG[:, None] * r_k - acc_k)
        dec_b = tl.where(lower, tl.exp(G[:, None] - G[None, :]), 0.0)            # [BT, BT]
        A = tl.where(strict, bt[:, None] * dec_b *
                     tl.dot(kt, tl.trans(kt), input_precision=DOT_PREC), 0.0)
        # Forward substitution: row t of U is final once rows < t are subtracted.
        U = rhs
        for t in range(0, cnt):
            u_t = tl.sum(tl.where(offs_t[:, None] == t, U, 0.0), axis=0)        # [BV]
            a_t = tl.sum(tl.where(offs_t[None, :] == t, A, 0.0), axis=1)        # [BT] (col t)
            U = U - a_t[:, None] * u_t[None, :]
        U = tl.where(mtv, U, 0.0)
        qk_b = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * dec_b
        o = eG[:, None] * r_q + acc_q + tl.dot(qk_b, U, input_precision=DOT_PREC)
        tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_v[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mtv)

        if will_flush:
            w_new = tl.where(mt, tl.exp(G_end - G), 0.0)
            S = tl.exp(G_end) * S + upd + tl.dot(tl.trans(U * w_new[:, None]), kt,
                                                 input_precision=DOT_PREC)
            flushed = 1
            L = 0
            G_base = 0.0
        else:
            # Rows L .. L+cnt-1. buf_u rows of (head, V-tile) belong to this program alone. The
            # k and G rows are shared with the other programs of the slot, which may still read
            # rows 0..L0-1 as history after this program flushed: they are staged (G per token
            # in gs_ptr) and copied into the buffer by _prefill_commit_kernel.
            brow = L + offs_t
            tl.store(bu_ptr + slot * sbu_s + brow[:, None] * (HV * V) + h * V + offs_v[None, :],
                     U, mask=mtv)
            if iv == 0:
                tl.store(gs_ptr + rows * HV + h, G, mask=mt)
            L = L + cnt
            G_base = G_end
        pos += cnt
    if flushed != 0:
        tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=ms)



@triton.jit
def _prefill_commit_kernel(slots_ptr, cu_ptr, k_ptr, gs_ptr, bk_ptr, bg_ptr, meta_ptr,
                           sk_t, sk_h, sbk_s, sbg_s, sm_s,
                           H: tl.constexpr, K: tl.constexpr, HV: tl.constexpr, C: tl.constexpr,
                           BH: tl.constexpr, BK: tl.constexpr, BHV: tl.constexpr):
    """One program per sequence: copy the raw k and staged G of the tokens that stay buffered
    into their rows, then move the cursor (LEN = (L0 + n) mod C; HAS_STATE once a chunk filled)."""
    n = tl.program_id(0)
    slot = tl.load(slots_ptr + n)
    if slot < 0:
        return
    slot = tl.cast(slot, tl.int64)
    base = meta_ptr + slot * sm_s
    start = tl.load(cu_ptr + n)
    end = tl.load(cu_ptr + n + 1)
    L0 = tl.load(base + COL_LEN)
    total = L0 + (end - start)
    if total >= C:
        keep = total % C
        dst0 = 0
        tl.store(base + COL_HAS_STATE, 1)
    else:
        keep = end - start
        dst0 = L0
    offs_h = tl.arange(0, BH)
    offs_k = tl.arange(0, BK)
    offs_hv = tl.arange(0, BHV)
    mhk = (offs_h[:, None] < H) & (offs_k[None, :] < K)
    for r in range(0, keep):
        tok = tl.cast(end - keep + r, tl.int64)
        row = dst0 + r
        kr = tl.load(k_ptr + tok * sk_t + offs_h[:, None] * sk_h + offs_k[None, :], mask=mhk)
        tl.store(bk_ptr + slot * sbk_s + row * (H * K) + offs_h[:, None] * K + offs_k[None, :],
                 kr, mask=mhk)
        gr = tl.load(gs_ptr + tok * HV + offs_hv, mask=offs_hv < HV)
        tl.store(bg_ptr + slot * sbg_s + row * HV + offs_hv, gr, mask=offs_hv < HV)
    tl.store(base + COL_LEN, total % C)


def prefill(cache, slots, q, k, v, g, beta, cu_seqlens, *, scale, use_qk_l2norm):
    """``q, k [T, H, K]``, ``v [T, HV, V]``, ``g, beta [T, HV]``, ``cu_seqlens [N+1]`` ->
    ``o [T, HV, V]``."""
    N = slots.shape[0]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if N == 0 or q.shape[0] == 0:
        return o.zero_()
    check_layout(cache, q, k, v)
    slots = slots_i32(slots)
    cu = cu_seqlens.to(torch.int32).contiguous()
    H, K, HV, V = cache.num_k_heads, cache.head_k_dim, cache.num_v_heads, cache.head_v_dim
    g_stage = torch.empty(q.shape[0], HV, dtype=cache.acc_dtype, device=q.device)
    cfg = tuning.launch_config(cache, "block")
    _prefill_kernel[(N, HV, triton.cdiv(V, cfg["BV"]))](
        q, k, v, g, beta, o, slots, cu, g_stage,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        *slot_strides(cache), scale,
        H=H, HV=HV, K=K, V=V, C=cache.chunk_size, BT=tuning.pow2(cache.chunk_size),
        BK=cfg["BK"], BV=cfg["BV"], BLH=HIST_BLOCK, USE_L2=use_qk_l2norm,
        num_warps=cfg["num_warps"],
    )
    _prefill_commit_kernel[(N,)](
        slots, cu, k, g_stage, cache.buf_k, cache.buf_g, cache.meta,
        k.stride(0), k.stride(1), cache.buf_k.stride(0), cache.buf_g.stride(0),
        cache.meta.stride(0),
        H=H, K=K, HV=HV, C=cache.chunk_size, BH=triton.next_power_of_2(H),
        BK=triton.next_power_of_2(K), BHV=triton.next_power_of_2(HV), num_warps=4)
    return o
