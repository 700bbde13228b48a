"""Triton kernels for KVBuffer (backend ``"triton"``).

Same semantics as :mod:`.torch_impl` (the exact reference they are tested against):

- ``decode``: one launch for the whole batch; a program owns (sequence, value head, V-tile). It
  reads its tile of ``S0`` once, serving both ``S0^T k`` and ``S0^T q``; the history terms read the
  buffered ``(k, u, G)``; the new entry is appended. On the step where the buffer reaches
  ``chunk_size`` the same program also writes the flushed state tile (fused flush: the tile is
  already in registers). Slots that never flushed read no state.
- ``verify`` / ``prefill``: one block kernel. T tokens per segment are solved in registers
  (``(I + A) U = rhs``, unit lower-triangular, forward substitution); ``verify`` appends one
  tentative segment, ``prefill`` walks the sequence segment by segment with its state tile held in
  registers, folding every full chunk into it and leaving the tail in the buffer.
- ``accept``: a flush kernel for the slots whose committed buffer reaches ``chunk_size``.
- Per-slot ``meta`` (length, pending, has-state) is updated by a tiny kernel *after* the main
  launch: programs of one slot read the old cursor, so none of them may write it.

No host syncs and no data-dependent allocation in decode / verify / accept (CUDA-graph safe).
Negative slot ids are padding: their outputs are zero and nothing is read or written.
Launch configs are fixed per shape (no runtime autotuning of kernels that write state in place).
Gates (``g``, ``beta``), the L2 norm and the scale are applied in-kernel in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cache import META_HAS_STATE, META_LEN, META_PENDING, KVBufferCache

_MODE_DECODE, _MODE_VERIFY, _MODE_ACCEPT = 0, 1, 2
_HIST_BLOCK = 16          # history rows per inner iteration (tl.dot needs >= 16)
# fp32 matrix products inside the kernels. "tf32x3" (three TF32 tensor-core products, error
# about that of fp32 FMA) keeps register use low; plain "ieee" FMA dots hold whole K-strips per
# thread and spill. The interpreter computes every dot in exact fp32 regardless.
DOT_PREC = tl.constexpr("tf32x3")
_L2_EPS = 1e-6


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


# Benchmarks and the tuning script may pin launch parameters here, per kernel kind:
# {"decode": {"BV": .., "num_warps": .., "BLO": ..}, "block": {...}, "flush": {...}}.
CONFIG_OVERRIDE: dict = {}


def launch_config(cache: KVBufferCache, kind: str = "decode") -> dict:
    """Fixed per-shape launch parameters (no runtime autotune for kernels that write state).

    Chosen from register use on sm_90 (ptxas): the decode kernel holds one ``[BV, BK]`` fp32
    state tile per program; BV=16 with 4 warps stays near 128 registers without spills at
    K=V=128, leaving room for several resident programs per SM (the kernel is memory-bound).
    """
    K, V = cache.head_k_dim, cache.head_v_dim
    BK = _pow2(K)
    BV = min(_pow2(V), 16 if BK >= 128 else 32)
    cfg = dict(BK=BK, BV=BV, num_warps=4, BLO=4)
    cfg.update(CONFIG_OVERRIDE.get(kind, {}))
    return cfg


# ------------------------------------------------------------------------------------------------
# Helpers (inlined)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _l2norm_rows(x, USE_L2: tl.constexpr):
    if USE_L2:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1, keep_dims=True) + 1e-6)
    return x


@triton.jit
def _l2norm_vec(x, USE_L2: tl.constexpr):
    if USE_L2:
        x = x * tl.rsqrt(tl.sum(x * x) + 1e-6)
    return x


# ------------------------------------------------------------------------------------------------
# decode: T = 1, fused flush
# ------------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, slots_ptr,
    state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sg_n, sg_h, sb_n, sb_h, so_n, so_h,
    ss_s, ss_h, ss_v, ss_k,
    sbk_s, sbk_j, sbk_h, sbu_s, sbu_j, sbu_h, sbg_s, sbg_j, sm_s,
    scale,
    K: tl.constexpr, V: tl.constexpr, GROUP: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BLH: tl.constexpr, BLO: tl.constexpr,
    USE_L2: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    slot = tl.load(slots_ptr + n)
    o_ptrs = o_ptr + n * so_n + h * so_h + offs_v
    if slot < 0:
        tl.store(o_ptrs, tl.zeros([BV], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=mv)
        return
    slot = tl.cast(slot, tl.int64)
    L = tl.load(meta_ptr + slot * sm_s + 0)
    has = tl.load(meta_ptr + slot * sm_s + 2)

    k_raw = tl.load(k_ptr + n * sk_n + hk * sk_h + offs_k, mask=mk, other=0.0)
    k = _l2norm_vec(k_raw.to(tl.float32), USE_L2)
    q = _l2norm_vec(tl.load(q_ptr + n * sq_n + hk * sq_h + offs_k, mask=mk, other=0.0)
                    .to(tl.float32), USE_L2) * scale
    v = tl.load(v_ptr + n * sv_n + h * sv_h + offs_v, mask=mv, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n * sg_n + h * sg_h).to(tl.float32)
    beta = tl.load(beta_ptr + n * sb_n + h * sb_h).to(tl.float32)

    bg_base = bg_ptr + slot * sbg_s + h
    G_prev = tl.load(bg_base + (L - 1) * sbg_j, mask=L > 0, other=0.0)
    G = G_prev + g
    do_flush = L + 1 == C

    # The state tile is loaded first: the one large read of the step overlaps the history math.
    eG = tl.exp(G)
    s_ptrs = (state_ptr + slot * ss_s + h * ss_h + offs_v[:, None] * ss_v
              + offs_k[None, :] * ss_k)
    ms = mv[:, None] & mk[None, :]
    S0 = tl.zeros([BV, BK], dtype=tl.float32)
    if has != 0:
        S0 = tl.load(s_ptrs, mask=ms, other=0.0).to(tl.float32)

    # History: acc_k = sum_j exp(G - G_j)(k.k_j) u_j, acc_q likewise with q; on a flush step also
    # the rank-L update sum_j exp(G - G_j) u_j k_j^T of the new state tile.
    acc_k = tl.zeros([BV], dtype=tl.float32)
    acc_q = tl.zeros([BV], dtype=tl.float32)
    for j0 in range(0, L, BLO):
        offs_j = j0 + tl.arange(0, BLO)
        mj = offs_j < L
        kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * sbk_j + hk * sbk_h
                     + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        kh = _l2norm_rows(kh.to(tl.float32), USE_L2)
        Gj = tl.load(bg_base + offs_j * sbg_j, mask=mj, other=0.0)
        w = tl.where(mj, tl.exp(G - Gj), 0.0)
        hu = tl.load(bu_ptr + slot * sbu_s + offs_j[:, None] * sbu_j + h * sbu_h
                     + offs_v[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
        wk = w * tl.sum(kh * k[None, :], axis=1)
        wq = w * tl.sum(kh * q[None, :], axis=1)
        acc_k += tl.sum(wk[:, None] * hu, axis=0)
        acc_q += tl.sum(wq[:, None] * hu, axis=0)

    r_k = tl.sum(S0 * k[None, :], axis=1)
    r_q = tl.sum(S0 * q[None, :], axis=1)
    u = beta * (v - eG * r_k - acc_k)
    o = eG * r_q + acc_q + tl.sum(q * k) * u
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=mv)

    # Append (k, u, G) at row L. Row L is read by no program of this launch.
    tl.store(bu_ptr + slot * sbu_s + L * sbu_j + h * sbu_h + offs_v, u, mask=mv)
    if iv == 0:
        tl.store(bg_base + L * sbg_j, G)
        if h % GROUP == 0:
            tl.store(bk_ptr + slot * sbk_s + L * sbk_j + hk * sbk_h + offs_k, k_raw, mask=mk)
    if do_flush:
        # S_C = exp(G) S0 + sum_j exp(G - G_j) u_j k_j^T + u k^T. S0 is still in registers; the
        # history rows are re-read one at a time (L2-resident, C-1 small rows) rather than kept
        # live above: rank-1 FMA updates keep register use at one state tile.
        S_new = eG * S0 + u[:, None] * k[None, :]
        for j in range(0, L):
            kj = tl.load(bk_ptr + slot * sbk_s + j * sbk_j + hk * sbk_h + offs_k, mask=mk,
                         other=0.0).to(tl.float32)
            kj = _l2norm_vec(kj, USE_L2)
            wj = tl.exp(G - tl.load(bg_base + j * sbg_j))
            uj = tl.load(bu_ptr + slot * sbu_s + j * sbu_j + h * sbu_h + offs_v, mask=mv,
                         other=0.0)
            S_new += (wj * uj)[:, None] * kj[None, :]
        tl.store(s_ptrs, S_new.to(state_ptr.dtype.element_ty), mask=ms)


# ------------------------------------------------------------------------------------------------
# verify / prefill: blocks of up to BT tokens with an in-register triangular solve
# ------------------------------------------------------------------------------------------------
@triton.jit
def _block_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, slots_ptr, cu_ptr, gs_ptr,
    state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sb_t, sb_h, so_t, so_h,
    ss_s, ss_h, ss_v, ss_k,
    sbk_s, sbk_j, sbk_h, sbu_s, sbu_j, sbu_h, sbg_s, sbg_j, sm_s,
    scale,
    K: tl.constexpr, V: tl.constexpr, HV: tl.constexpr, GROUP: tl.constexpr, C: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BLH: tl.constexpr,
    USE_L2: tl.constexpr, PREFILL: tl.constexpr,
):
    """Tokens of sequence n are rows ``cu[n]:cu[n+1]`` of the packed (T, heads, dim) inputs.

    PREFILL=False (verify): one tentative segment (T <= BT), no flush, cursor untouched.
    PREFILL=True: segments of at most ``C - L`` tokens; every full chunk is folded into the state
    tile held in registers; the state is written back once at the end if any flush happened.
    """
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
    L = tl.load(meta_ptr + slot * sm_s + 0)
    has = tl.load(meta_ptr + slot * sm_s + 2)
    bg_base = bg_ptr + slot * sbg_s + h
    G_base = tl.load(bg_base + (L - 1) * sbg_j, mask=L > 0, other=0.0)

    s_ptrs = (state_ptr + slot * ss_s + h * ss_h + offs_v[:, None] * ss_v
              + offs_k[None, :] * ss_k)
    ms = mv[:, None] & mk[None, :]
    S = tl.zeros([BV, BK], dtype=tl.float32)
    if has != 0:
        S = tl.load(s_ptrs, mask=ms, other=0.0).to(tl.float32)
    flushed = 0

    lower = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    pos = start
    while pos < end:
        if PREFILL:
            cnt = tl.minimum(end - pos, C - L)
        else:
            cnt = end - pos
        rows = tl.cast(pos + offs_t, tl.int64)
        mt = offs_t < cnt
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        k_raw = tl.load(k_ptr + rows[:, None] * sk_t + hk * sk_h + offs_k[None, :], mask=mtk,
                        other=0.0)
        kt = _l2norm_rows(k_raw.to(tl.float32), USE_L2)
        qt = _l2norm_rows(tl.load(q_ptr + rows[:, None] * sq_t + hk * sq_h + offs_k[None, :],
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
        if PREFILL:
            will_flush = L + cnt == C
        else:
            will_flush = cnt < 0
        for j0 in range(0, L, BLH):
            offs_j = j0 + tl.arange(0, BLH)
            mj = offs_j < L
            kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * sbk_j + hk * sbk_h
                         + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
            kh = _l2norm_rows(kh.to(tl.float32), USE_L2)
            Gj = tl.load(bg_base + offs_j * sbg_j, mask=mj, other=0.0)
            hu = tl.load(bu_ptr + slot * sbu_s + offs_j[:, None] * sbu_j + h * sbu_h
                         + offs_v[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
            dec = tl.where(mj[None, :], tl.exp(G[:, None] - Gj[None, :]), 0.0)   # [BT, BLH]
            kk = tl.dot(kt, tl.trans(kh), input_precision=DOT_PREC) * dec
            qk = tl.dot(qt, tl.trans(kh), input_precision=DOT_PREC) * dec
            acc_k += tl.dot(kk, hu, input_precision=DOT_PREC)
            acc_q += tl.dot(qk, hu, input_precision=DOT_PREC)
            if PREFILL:
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
            # rows 0..L0-1 as history after this program flushed: in prefill they are staged
            # (G per token in gs_ptr) and copied into the buffer by _prefill_commit_kernel.
            brow = L + offs_t
            tl.store(bu_ptr + slot * sbu_s + brow[:, None] * sbu_j + h * sbu_h + offs_v[None, :],
                     U, mask=mtv)
            if iv == 0:
                if PREFILL:
                    tl.store(gs_ptr + rows * HV + h, G, mask=mt)
                else:
                    tl.store(bg_base + brow * sbg_j, G, mask=mt)
                    if h % GROUP == 0:
                        tl.store(bk_ptr + slot * sbk_s + brow[:, None] * sbk_j + hk * sbk_h
                                 + offs_k[None, :], k_raw, mask=mtk)
            L = L + cnt
            G_base = G_end
        pos += cnt
    if flushed != 0:
        tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=ms)


# ------------------------------------------------------------------------------------------------
# accept: flush slots whose committed buffer reaches C
# ------------------------------------------------------------------------------------------------
@triton.jit
def _accept_flush_kernel(
    slots_ptr, acc_ptr, state_ptr, bk_ptr, bu_ptr, bg_ptr, meta_ptr,
    ss_s, ss_h, ss_v, ss_k, sbk_s, sbk_j, sbk_h, sbu_s, sbu_j, sbu_h, sbg_s, sbg_j, sm_s,
    K: tl.constexpr, V: tl.constexpr, GROUP: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BLH: tl.constexpr, USE_L2: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    slot = tl.load(slots_ptr + n)
    if slot < 0:
        return
    slot = tl.cast(slot, tl.int64)
    Lc = tl.load(meta_ptr + slot * sm_s + 0) + tl.load(acc_ptr + n)
    if Lc < C:
        return
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    has = tl.load(meta_ptr + slot * sm_s + 2)
    bg_base = bg_ptr + slot * sbg_s + h
    G_end = tl.load(bg_base + (Lc - 1) * sbg_j)
    s_ptrs = (state_ptr + slot * ss_s + h * ss_h + offs_v[:, None] * ss_v
              + offs_k[None, :] * ss_k)
    ms = mv[:, None] & mk[None, :]
    S = tl.zeros([BV, BK], dtype=tl.float32)
    if has != 0:
        S = tl.load(s_ptrs, mask=ms, other=0.0).to(tl.float32)
    S = tl.exp(G_end) * S
    for j0 in range(0, Lc, BLH):
        offs_j = j0 + tl.arange(0, BLH)
        mj = offs_j < Lc
        kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * sbk_j + hk * sbk_h
                     + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        kh = _l2norm_rows(kh.to(tl.float32), USE_L2)
        Gj = tl.load(bg_base + offs_j * sbg_j, mask=mj, other=0.0)
        hu = tl.load(bu_ptr + slot * sbu_s + offs_j[:, None] * sbu_j + h * sbu_h
                     + offs_v[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
        wj = tl.where(mj, tl.exp(G_end - Gj), 0.0)
        S += tl.dot(tl.trans(hu * wj[:, None]), kh, input_precision=DOT_PREC)
    tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=ms)


# ------------------------------------------------------------------------------------------------
# cursor update, after the main launch
# ------------------------------------------------------------------------------------------------
@triton.jit
def _commit_kernel(slots_ptr, add_ptr, meta_ptr, sm_s, add_const,
                   C: tl.constexpr, MODE: tl.constexpr):
    n = tl.program_id(0)
    slot = tl.load(slots_ptr + n)
    if slot < 0:
        return
    base = meta_ptr + tl.cast(slot, tl.int64) * sm_s
    L = tl.load(base + 0)
    if MODE == 1:       # verify: the T rows after L are tentative
        tl.store(base + 1, add_const)
    else:
        if MODE == 0:   # decode
            add = add_const
        else:            # accept
            add = tl.load(add_ptr + n)
        new = L + add
        if new >= C:
            tl.store(base + 2, 1)
            new = 0
        tl.store(base + 0, new)
        if MODE == 2:
            tl.store(base + 1, 0)


@triton.jit
def _prefill_commit_kernel(slots_ptr, cu_ptr, k_ptr, gs_ptr, bk_ptr, bg_ptr, meta_ptr,
                           sk_t, sk_h, sbk_s, sbk_j, sbk_h, sbg_s, sbg_j, sm_s,
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
    L0 = tl.load(base + 0)
    total = L0 + (end - start)
    if total >= C:
        keep = total % C
        dst0 = 0
        tl.store(base + 2, 1)
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
        tl.store(bk_ptr + slot * sbk_s + row * sbk_j + offs_h[:, None] * sbk_h + offs_k[None, :],
                 kr, mask=mhk)
        gr = tl.load(gs_ptr + tok * HV + offs_hv, mask=offs_hv < HV)
        tl.store(bg_ptr + slot * sbg_s + row * sbg_j + offs_hv, gr, mask=offs_hv < HV)
    tl.store(base + 0, total % C)


# ------------------------------------------------------------------------------------------------
# Python wrappers (same signatures as torch_impl)
# ------------------------------------------------------------------------------------------------
def _cache_strides(cache: KVBufferCache) -> tuple:
    return (*cache.state.stride(), cache.buf_k.stride(0), cache.buf_k.stride(1),
            cache.buf_k.stride(2), cache.buf_u.stride(0), cache.buf_u.stride(1),
            cache.buf_u.stride(2), cache.buf_g.stride(0), cache.buf_g.stride(1),
            cache.meta.stride(0))


def _check_inner_contiguous(cache: KVBufferCache, *tensors: torch.Tensor) -> None:
    """The kernels assume unit stride along the head dim (K or V) and the HV axis of buf_g."""
    for name, t in (("state", cache.state), ("buf_k", cache.buf_k), ("buf_u", cache.buf_u),
                    ("buf_g", cache.buf_g), ("meta", cache.meta)):
        if t.stride(-1) != 1 and name != "state":
            raise ValueError(f"cache.{name}: expected unit stride in the last dim, "
                             f"got strides {t.stride()}")
    for i, t in enumerate(tensors):
        if t.stride(-1) != 1:
            raise ValueError(f"input {i}: expected unit stride in the last dim, got {t.stride()}")


def _slots_i32(slots: torch.Tensor) -> torch.Tensor:
    return slots if slots.dtype == torch.int32 and slots.is_contiguous() else \
        slots.to(torch.int32).contiguous()


def _commit(cache, slots, mode, *, add=None, add_const=0):
    N = slots.shape[0]
    if N == 0:
        return
    _commit_kernel[(N,)](slots, add if add is not None else slots, cache.meta, cache.meta.stride(0),
                         add_const, C=cache.chunk_size, MODE=mode, num_warps=1)


def decode(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    N = slots.shape[0]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    _check_inner_contiguous(cache, q, k, v)
    cfg = launch_config(cache, "decode")
    slots = _slots_i32(slots)
    HV, V = cache.num_v_heads, cache.head_v_dim
    grid = (N, HV, triton.cdiv(V, cfg["BV"]))
    _decode_kernel[grid](
        q, k, v, g, beta, o, slots,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        *_cache_strides(cache), scale,
        K=cache.head_k_dim, V=V, GROUP=HV // cache.num_k_heads, C=cache.chunk_size,
        BK=cfg["BK"], BV=cfg["BV"], BLH=_HIST_BLOCK, BLO=cfg["BLO"],
        USE_L2=use_qk_l2norm, num_warps=cfg["num_warps"],
    )
    _commit(cache, slots, _MODE_DECODE, add_const=1)
    return o


def _run_block(cache, slots, cu, q, k, v, g, beta, o, *, scale, use_qk_l2norm, prefill, BT,
               g_stage=None):
    N = slots.shape[0]
    cfg = launch_config(cache, "block")
    HV, V = cache.num_v_heads, cache.head_v_dim
    grid = (N, HV, triton.cdiv(V, cfg["BV"]))
    _block_kernel[grid](
        q, k, v, g, beta, o, slots, cu, g_stage if g_stage is not None else g,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        *_cache_strides(cache), scale,
        K=cache.head_k_dim, V=V, HV=HV, GROUP=HV // cache.num_k_heads, C=cache.chunk_size,
        BT=BT, BK=cfg["BK"], BV=cfg["BV"], BLH=_HIST_BLOCK, USE_L2=use_qk_l2norm,
        PREFILL=prefill, num_warps=cfg["num_warps"],
    )


def verify(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    N, T = q.shape[:2]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    slots = _slots_i32(slots)
    # Flatten (N, T) to packed rows; these reshapes are views of the caller's contiguous inputs.
    flat = [x.reshape(N * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    _check_inner_contiguous(cache, *flat[:3])
    cu = torch.arange(0, (N + 1) * T, T, dtype=torch.int32, device=q.device)
    _run_block(cache, slots, cu, *flat, o.view(N * T, *o.shape[2:]), scale=scale,
               use_qk_l2norm=use_qk_l2norm, prefill=False, BT=_pow2(T))
    _commit(cache, slots, _MODE_VERIFY, add_const=T)
    return o


def accept(cache, slots, num_accepted, *, use_qk_l2norm):
    N = slots.shape[0]
    if N == 0:
        return
    slots = _slots_i32(slots)
    acc = num_accepted.to(torch.int32).contiguous()
    cfg = launch_config(cache, "flush")
    HV, V = cache.num_v_heads, cache.head_v_dim
    grid = (N, HV, triton.cdiv(V, cfg["BV"]))
    _accept_flush_kernel[grid](
        slots, acc, cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        *_cache_strides(cache),
        K=cache.head_k_dim, V=V, GROUP=HV // cache.num_k_heads, C=cache.chunk_size,
        BK=cfg["BK"], BV=cfg["BV"], BLH=_HIST_BLOCK, USE_L2=use_qk_l2norm,
        num_warps=cfg["num_warps"],
    )
    _commit(cache, slots, _MODE_ACCEPT, add=acc)


def prefill(cache, slots, q, k, v, g, beta, cu_seqlens, *, scale, use_qk_l2norm):
    N = slots.shape[0]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if N == 0 or q.shape[0] == 0:
        return o.zero_()
    _check_inner_contiguous(cache, q, k, v)
    slots = _slots_i32(slots)
    cu = cu_seqlens.to(torch.int32).contiguous()
    H, K, HV = cache.num_k_heads, cache.head_k_dim, cache.num_v_heads
    g_stage = torch.empty(q.shape[0], HV, dtype=cache.acc_dtype, device=q.device)
    _run_block(cache, slots, cu, q, k, v, g, beta, o, scale=scale, use_qk_l2norm=use_qk_l2norm,
               prefill=True, BT=_pow2(cache.chunk_size), g_stage=g_stage)
    _prefill_commit_kernel[(N,)](
        slots, cu, k, g_stage, cache.buf_k, cache.buf_g, cache.meta,
        k.stride(0), k.stride(1), cache.buf_k.stride(0), cache.buf_k.stride(1),
        cache.buf_k.stride(2), cache.buf_g.stride(0), cache.buf_g.stride(1), cache.meta.stride(0),
        H=H, K=K, HV=HV, C=cache.chunk_size, BH=triton.next_power_of_2(H),
        BK=triton.next_power_of_2(K), BHV=triton.next_power_of_2(HV), num_warps=4)
    return o


__all__ = ["accept", "decode", "launch_config", "prefill", "verify",
           "META_LEN", "META_PENDING", "META_HAS_STATE"]
