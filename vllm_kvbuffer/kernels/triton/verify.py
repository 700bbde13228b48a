"""Verify (score T = D + 1 tokens per sequence, appended tentatively) and accept.

verify: a program owns (sequence n, value head h, V-split) and streams its state tiles through a
loop Triton software-pipelines, like decode. Everything that does not depend on the V tile is
computed once per program before the loop: the normalised tokens, their decays, the products
with the history of all ``B`` buffered rows (rows past the cursor dropped with ``tl.where``, so
no loop runs over the buffer length) and ``X = (I + A)^-1`` of the unit lower-triangular
in-block system, by forward substitution over the constant T. Each tile then needs ``S0^T k_t``
and ``S0^T q_t`` (row reductions) and four small products. No state is written; the cursor
kernel marks the T rows pending.

accept: commits the first ``num_accepted`` tentative rows; slots whose committed buffer reaches
``C`` are flushed by :mod:`.flush`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from .common import (COL_HAS_STATE, COL_LEN, DOT_FMA, L2_EPS, MODE_ACCEPT, MODE_VERIFY,
                     check_layout, commit, l2norm_rows, slot_strides, slots_i32)
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
    TILES: tl.constexpr, USE_L2: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Tokens of sequence n are rows ``n*T .. n*T+T-1`` of the packed (N*T, heads, dim) inputs.
    Program (n, h, sp) handles TILES V tiles of BV rows."""
    GROUP: tl.constexpr = HV // H
    n = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_b = tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    offs_j = tl.arange(0, BL)
    mk = offs_k < K
    mt = offs_t < T
    mtk = mt[:, None] & mk[None, :]
    rows = tl.cast(n * T + offs_t, tl.int64)

    # Round trip 1: the slot and the T tokens' inputs. Padding rows (slot < 0) take the same
    # path with every pool access masked off (no branch to sink these loads behind).
    k_raw = tl.load(k_ptr + rows[:, None] * sk_t + hk * sk_h + offs_k[None, :], mask=mtk,
                    other=0.0)
    q_raw = tl.load(q_ptr + rows[:, None] * sq_t + hk * sq_h + offs_k[None, :], mask=mtk,
                    other=0.0)
    gt = tl.load(g_ptr + rows * sg_t + h * sg_h, mask=mt, other=0.0).to(tl.float32)
    bt = tl.load(beta_ptr + rows * sb_t + h * sb_h, mask=mt, other=0.0).to(tl.float32)
    slot = tl.load(slots_ptr + n)
    live = slot >= 0
    slot = tl.cast(tl.maximum(slot, 0), tl.int64)
    # Round trip 2: the cursor and all B buffered rows (their addresses need only the slot).
    L = tl.load(meta_ptr + slot * sm_s + COL_LEN, mask=live, other=0)
    has = tl.load(meta_ptr + slot * sm_s + COL_HAS_STATE, mask=live, other=0)
    mb = offs_j < tl.where(live, B, 0)
    kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * (H * K) + hk * K + offs_k[None, :],
                 mask=mb[:, None] & mk[None, :], other=0.0)
    Gj = tl.load(bg_ptr + slot * sbg_s + offs_j * HV + h, mask=mb, other=0.0)

    # Everything that does not depend on the V tile, once per program.
    kt = k_raw.to(tl.float32)
    qt = q_raw.to(tl.float32)
    # Per-token factors of the L2 norm (and the scale for q).
    k_inv = tl.full([BT], 1.0, tl.float32)
    q_inv = tl.full([BT], scale, tl.float32)
    if USE_L2:
        k_inv = tl.rsqrt(tl.sum(kt * kt, axis=1) + L2_EPS)
        q_inv = tl.rsqrt(tl.sum(qt * qt, axis=1) + L2_EPS) * scale
    kt = kt * k_inv[:, None]
    qt = qt * q_inv[:, None]
    mj = offs_j < L
    # Rows at or past the cursor may hold anything (NaN included): where, not multiplication.
    G = tl.sum(tl.where(offs_j == L - 1, Gj, 0.0)) + tl.cumsum(gt, axis=0)       # [BT]
    eG = tl.exp(G)
    kh = tl.where(mj[:, None], l2norm_rows(kh.to(tl.float32), USE_L2), 0.0)
    dec = tl.where(mj[None, :], tl.exp(G[:, None] - Gj[None, :]), 0.0)          # [BT, BL]
    # Products with the T token rows as row reductions: a [T, K] x [K, *] tensor-core product
    # would hold the whole [T, K] block in every warp (255 registers and spills).
    kk = tl.zeros([BT, BL], dtype=tl.float32)      # k_t . k_j (history)
    qk = tl.zeros([BT, BL], dtype=tl.float32)      # q_t . k_j
    kkt = tl.zeros([BT, BT], dtype=tl.float32)     # k_t . k_s (block)
    qkt = tl.zeros([BT, BT], dtype=tl.float32)     # q_t . k_s
    for r in tl.static_range(T):
        sel = offs_t[:, None] == r
        k_r = tl.sum(tl.where(sel, kt, 0.0), axis=0)                              # [BK]
        q_r = tl.sum(tl.where(sel, qt, 0.0), axis=0)
        kk = tl.where(sel, tl.sum(kh * k_r[None, :], axis=1)[None, :], kk)
        qk = tl.where(sel, tl.sum(kh * q_r[None, :], axis=1)[None, :], qk)
        kkt = tl.where(sel, tl.sum(kt * k_r[None, :], axis=1)[None, :], kkt)
        qkt = tl.where(sel, tl.sum(kt * q_r[None, :], axis=1)[None, :], qkt)
    kk = kk * dec
    qk = qk * dec
    lower = offs_t[:, None] >= offs_t[None, :]
    dec_b = tl.where(lower, tl.exp(G[:, None] - G[None, :]), 0.0)                 # [BT, BT]
    A = tl.where(offs_t[:, None] > offs_t[None, :], bt[:, None] * dec_b * kkt, 0.0)
    qk_b = qkt * dec_b
    # X = (I + A)^-1 by forward substitution on the identity (unit lower-triangular, T steps),
    # once per program: each tile then solves with one product U = X rhs.
    X = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)
    for r in tl.static_range(T):
        x_r = tl.sum(tl.where(offs_t[:, None] == r, X, 0.0), axis=0)            # row r
        a_r = tl.sum(tl.where(offs_t[None, :] == r, A, 0.0), axis=1)            # column r
        X = X - a_r[:, None] * x_r[None, :]
    mk_s = offs_k < tl.where(has != 0, K, 0)       # a slot that never flushed reads no state
    s_base = state_ptr + slot * ss_s + h * (V * K)
    u_base = bu_ptr + slot * sbu_s + h * V
    brow = L + offs_t

    for t in tl.range(0, TILES, num_stages=NUM_STAGES):
        offs_v = (sp * TILES + t) * BV + offs_b
        mv = offs_v < V
        mtv = mt[:, None] & mv[None, :]
        S = tl.load(s_base + offs_v[:, None] * K + offs_k[None, :],
                    mask=mv[:, None] & mk_s[None, :], other=0.0).to(tl.float32)
        hu = tl.load(u_base + offs_j[:, None] * (HV * V) + offs_v[None, :],
                     mask=mj[:, None] & mv[None, :], other=0.0)
        vt = tl.load(v_ptr + rows[:, None] * sv_t + h * sv_h + offs_v[None, :], mask=mtv,
                     other=0.0).to(tl.float32)
        # S0^T k_t and S0^T q_t as row reductions of the tile (a [T, K] x [K, BV] tensor-core
        # product would hold the whole k/q block in every warp: 255 registers and spills).
        r_k = tl.zeros([BT, BV], dtype=tl.float32)
        r_q = tl.zeros([BT, BV], dtype=tl.float32)
        for r in tl.static_range(T):
            sel = offs_t[:, None] == r
            # Token r's k and q re-read (L1) each tile: kept live across the loop they would
            # cost T * 2 * BK / threads registers.
            k_r = tl.load(k_ptr + (n * T + r) * sk_t + hk * sk_h + offs_k, mask=mk,
                          other=0.0).to(tl.float32) * tl.sum(tl.where(offs_t == r, k_inv, 0.0))
            q_r = tl.load(q_ptr + (n * T + r) * sq_t + hk * sq_h + offs_k, mask=mk,
                          other=0.0).to(tl.float32) * tl.sum(tl.where(offs_t == r, q_inv, 0.0))
            r_k = tl.where(sel, tl.sum(S * k_r[None, :], axis=1)[None, :], r_k)
            r_q = tl.where(sel, tl.sum(S * q_r[None, :], axis=1)[None, :], r_q)
        rhs = bt[:, None] * (vt - eG[:, None] * r_k - tl.dot(kk, hu, input_precision=DOT_FMA))
        U = tl.where(mtv, tl.dot(X, rhs, input_precision=DOT_FMA), 0.0)
        o = eG[:, None] * r_q + tl.dot(qk, hu, input_precision=DOT_FMA) \
            + tl.dot(qk_b, U, input_precision=DOT_FMA)
        o = tl.where(live, o, 0.0)
        tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_v[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mtv)
        # Tentative rows L .. L+T-1; the rows of u of (head, V tile) belong to this program.
        tl.store(u_base + brow[:, None] * (HV * V) + offs_v[None, :], U,
                 mask=mt[:, None] & (offs_v < tl.where(live, V, 0))[None, :])
    if live & (sp == 0):
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
    cfg = tuning.launch_config(cache, "verify", batch=N)
    HV, V = cache.num_v_heads, cache.head_v_dim
    nv = triton.cdiv(V, cfg["BV"])
    tiles = triton.cdiv(nv, min(cfg["splits"], nv))
    _verify_kernel[(N, HV, triton.cdiv(nv, tiles))](
        q, k, v, g, beta, of, slots,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), of.stride(0), of.stride(1),
        *slot_strides(cache), scale,
        H=cache.num_k_heads, HV=HV, K=cache.head_k_dim, V=V, B=cache.capacity, T=T,
        BT=tuning.pow2(T), BK=cfg["BK"], BV=cfg["BV"], BL=tuning.pow2(cache.capacity),
        TILES=tiles, USE_L2=use_qk_l2norm, NUM_STAGES=cfg["num_stages"],
        num_warps=cfg["num_warps"], **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
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
