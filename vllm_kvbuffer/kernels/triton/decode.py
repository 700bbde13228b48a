"""Decode: one new token per sequence, one launch for the whole batch (fused flush).

A program owns (sequence n, value head h, V-split sp) and streams its ``TILES`` state tiles of
``[BV, BK]`` through a plain loop that Triton software-pipelines (``NUM_STAGES`` tiles in shared
memory, async copies), each tile serving both ``S0^T k`` and ``S0^T q``. Everything that does not
depend on the V tile (normalised q and k, the decay, the history weights of all buffered rows) is
computed once per program before the loop. The loads that need no slot (q, k, g, beta, and v for
all the program's tiles) are issued first; the buffered keys and decays of all ``B`` rows need
only the slot (rows past the cursor are dropped with ``tl.where``, never used), so the program
waits for two dependent round trips (slot, then cursor) before the first state tile is requested.

On the step where the buffer reaches ``C`` (1 in C steps) a second pass over the program's tiles,
just read and still in L2, writes the flushed state: one ``tl.dot`` over the buffered rows and
the new one per tile, no loop over the rows. Keeping the flush out of the streaming loop keeps
that loop at 96 registers (five programs per SM at fp32 K = V = 128). A slot that never flushed
reads no state. Negative slot ids are padding: outputs zero, nothing read or written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from .common import (COL_HAS_STATE, COL_LEN, DOT_PREC, MODE_DECODE, check_layout, commit,
                     l2norm_rows, l2norm_vec, slot_strides, slots_i32)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, slots_ptr,
    state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sg_n, sg_h, sb_n, sb_h, so_n, so_h,
    ss_s, sbk_s, sbu_s, sbg_s, sm_s,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, B: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, TILES: tl.constexpr,
    USE_L2: tl.constexpr, NUM_STAGES: tl.constexpr, TILES_P2: tl.constexpr,
):
    GROUP: tl.constexpr = HV // H
    n = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_b = tl.arange(0, BV)
    offs_j = tl.arange(0, BL)
    mk = offs_k < K

    # Round trip 1: the slot, together with every load indexed by the batch row. Padding rows
    # (slot < 0) take the same path with every pool access masked off: no branch lets the
    # compiler sink these loads behind the slot's arrival.
    slot = tl.load(slots_ptr + n)
    k_raw = tl.load(k_ptr + n * sk_n + hk * sk_h + offs_k, mask=mk, other=0.0)
    q_raw = tl.load(q_ptr + n * sq_n + hk * sq_h + offs_k, mask=mk, other=0.0)
    g = tl.load(g_ptr + n * sg_n + h * sg_h).to(tl.float32)
    beta = tl.load(beta_ptr + n * sb_n + h * sb_h).to(tl.float32)
    # This program's values for all its tiles, [TILES, BV]: one load before the loop instead of a
    # 2-byte load per tile that the pipeliner leaves in the iteration that consumes it.
    offs_tt = tl.arange(0, TILES_P2)
    offs_va = (sp * TILES + offs_tt[:, None]) * BV + offs_b[None, :]
    v_all = tl.load(v_ptr + n * sv_n + h * sv_h + offs_va,
                    mask=(offs_tt[:, None] < TILES) & (offs_va < V), other=0.0).to(tl.float32)
    live = slot >= 0
    slot = tl.cast(tl.maximum(slot, 0), tl.int64)
    # Round trip 2: the cursor, and all B buffered rows (their addresses need only the slot).
    L = tl.load(meta_ptr + slot * sm_s + COL_LEN, mask=live, other=0)
    has = tl.load(meta_ptr + slot * sm_s + COL_HAS_STATE, mask=live, other=0)
    mb = offs_j < tl.where(live, B, 0)
    kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * (H * K) + hk * K + offs_k[None, :],
                 mask=mb[:, None] & mk[None, :], other=0.0)
    Gj = tl.load(bg_ptr + slot * sbg_s + offs_j * HV + h, mask=mb, other=0.0)

    k = l2norm_vec(k_raw.to(tl.float32), USE_L2)
    q = l2norm_vec(q_raw.to(tl.float32), USE_L2) * scale
    qk_self = tl.sum(q * k)
    mj = offs_j < L
    # Rows at or past the cursor may hold anything (NaN included): where, not multiplication.
    G = tl.sum(tl.where(offs_j == L - 1, Gj, 0.0)) + g
    eG = tl.exp(G)
    w = tl.where(mj, tl.exp(G - Gj), 0.0)
    kh = tl.where(mj[:, None], l2norm_rows(kh.to(tl.float32), USE_L2), 0.0)
    wk = w * tl.sum(kh * k[None, :], axis=1)
    wq = w * tl.sum(kh * q[None, :], axis=1)
    do_flush = live & (L + 1 == C)
    # A slot that never flushed reads no state: all K columns masked off.
    mk_s = offs_k < tl.where(has != 0, K, 0)
    s_base = state_ptr + slot * ss_s + h * (V * K)
    u_base = bu_ptr + slot * sbu_s + h * V

    for t in tl.range(0, TILES, num_stages=NUM_STAGES):
        offs_v = (sp * TILES + t) * BV + offs_b
        mv = offs_v < V
        S0 = tl.load(s_base + offs_v[:, None] * K + offs_k[None, :],
                     mask=mv[:, None] & mk_s[None, :], other=0.0).to(tl.float32)
        hu = tl.load(u_base + offs_j[:, None] * (HV * V) + offs_v[None, :],
                     mask=mj[:, None] & mv[None, :], other=0.0)
        v = tl.sum(tl.where(offs_tt[:, None] == t, v_all, 0.0), axis=0)
        r_k = tl.sum(S0 * k[None, :], axis=1)
        r_q = tl.sum(S0 * q[None, :], axis=1)
        u = beta * (v - eG * r_k - tl.sum(wk[:, None] * hu, axis=0))
        o = eG * r_q + tl.sum(wq[:, None] * hu, axis=0) + qk_self * u
        o = tl.where(live, o, 0.0)
        tl.store(o_ptr + n * so_n + h * so_h + offs_v, o.to(o_ptr.dtype.element_ty), mask=mv)
        # Append u at row L (read by no other program of this launch).
        tl.store(u_base + L * (HV * V) + offs_v, u, mask=offs_v < tl.where(live, V, 0))
    if do_flush:
        # Flush steps only (1 in C): a second pass over this program's tiles, which were just
        # read and sit in L2. S_C = exp(G) S0 + sum_{j<=L} exp(G - G_j) u_j k_j^T as one dot over
        # the buffered rows, the new row L (u just stored, k in registers) included.
        tl.debug_barrier()
        mn = offs_j <= L
        wn = tl.where(offs_j == L, 1.0, w)
        # The keys are read again (L2) rather than kept live across the streaming loop, whose
        # programs per SM are bounded by registers.
        kn = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * (H * K) + hk * K + offs_k[None, :],
                     mask=(offs_j < L)[:, None] & mk[None, :], other=0.0)
        kn = l2norm_rows(kn.to(tl.float32), USE_L2)
        kn = tl.where((offs_j == L)[:, None], k[None, :], kn)
        for t in range(TILES):
            offs_v = (sp * TILES + t) * BV + offs_b
            mv = offs_v < V
            s_ptrs = s_base + offs_v[:, None] * K + offs_k[None, :]
            S0 = tl.load(s_ptrs, mask=mv[:, None] & mk_s[None, :], other=0.0).to(tl.float32)
            hu = tl.load(u_base + offs_j[:, None] * (HV * V) + offs_v[None, :],
                         mask=mn[:, None] & mv[None, :], other=0.0)
            S_new = eG * S0 + tl.dot(tl.trans(hu * wn[:, None]), kn, input_precision=DOT_PREC)
            tl.store(s_ptrs, S_new.to(state_ptr.dtype.element_ty),
                     mask=mv[:, None] & mk[None, :])
    if live & (sp == 0):
        tl.store(bg_ptr + slot * sbg_s + L * HV + h, G)
        if h % GROUP == 0:
            tl.store(bk_ptr + slot * sbk_s + L * (H * K) + hk * K + offs_k, k_raw, mask=mk)


def decode(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    """``q, k [N, H, K]``, ``v [N, HV, V]``, ``g, beta [N, HV]`` -> ``o [N, HV, V]``."""
    N = slots.shape[0]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    check_layout(cache, q, k, v)
    cfg = tuning.launch_config(cache, "decode", batch=N)
    slots = slots_i32(slots)
    H, HV, K, V = cache.num_k_heads, cache.num_v_heads, cache.head_k_dim, cache.head_v_dim
    nv = triton.cdiv(V, cfg["BV"])
    tiles = triton.cdiv(nv, min(cfg["splits"], nv))
    _decode_kernel[(N, HV, triton.cdiv(nv, tiles))](
        q, k, v, g, beta, o, slots,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        *slot_strides(cache), scale,
        H=H, HV=HV, K=K, V=V, B=cache.capacity, C=cache.chunk_size, BK=cfg["BK"], BV=cfg["BV"],
        BL=tuning.pow2(cache.capacity), TILES=tiles, USE_L2=use_qk_l2norm,
        NUM_STAGES=cfg["num_stages"], TILES_P2=triton.next_power_of_2(tiles),
        num_warps=cfg["num_warps"],
    )
    commit(cache, slots, MODE_DECODE, add_const=1)
    return o
