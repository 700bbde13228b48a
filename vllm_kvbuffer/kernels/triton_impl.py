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

from . import tuning
from .cache import KVBufferCache

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
# {"decode": {"BV": .., "num_warps": .., "splits": .., "flush_dot": ..}, "block": {...}, ...}.
CONFIG_OVERRIDE: dict = {}


def tuning_shape(cache: KVBufferCache, kind: str) -> dict:
    """The shape keys a tuned config is chosen by (see :mod:`.tuning`)."""
    shape = dict(H=cache.num_k_heads, HV=cache.num_v_heads, K=cache.head_k_dim,
                 V=cache.head_v_dim, state_dtype=str(cache.state_dtype).replace("torch.", ""))
    if kind == "decode":
        shape["C"] = cache.chunk_size
    return shape


def launch_config(cache: KVBufferCache, kind: str = "decode", batch: int | None = None) -> dict:
    """Fixed per-shape launch parameters (no runtime autotune for kernels that write state).

    decode: one program per (sequence, value head) streams the head's state in ``[BV, BK]``
    tiles; at small batch the V tiles are split over ``splits`` programs to fill the GPU (the
    choice depends on the batch *shape*, never on data, so it is CUDA-graph safe). BV=16 with
    4 warps and the in-loop rank-1 flush (``flush_dot=False``) was the fastest of the configs
    timed on an H100 (benchmarks/results/h100-run2, batch 8 and 128, C=16, fp32 state).
    """
    K, V = cache.head_k_dim, cache.head_v_dim
    BK = _pow2(K)
    if kind == "decode":
        BV = min(_pow2(V), 16)
        nv = -(-V // BV)
        programs = (batch or 1) * cache.num_v_heads
        cfg = dict(BK=BK, BV=BV, num_warps=4, num_stages=1, flush_dot=False,
                   splits=nv if programs < 2048 else 1)
    else:
        BV = min(_pow2(V), 16 if BK >= 128 else 32)
        cfg = dict(BK=BK, BV=BV, num_warps=4)
    # Per-device tuned configs (benchmarks/tune.py) refine the defaults; overrides win over both.
    cfg.update(tuning.lookup(kind, tuning_shape(cache, kind), batch, cache.device))
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


@triton.jit
def _state_tile(s_ptrs, ms, has, BV: tl.constexpr, BK: tl.constexpr):
    """fp32 ``[BV, BK]`` tile of ``S0``; zero, without reading memory, if the slot never flushed."""
    S = tl.zeros([BV, BK], dtype=tl.float32)
    if has != 0:
        S = tl.load(s_ptrs, mask=ms, other=0.0).to(tl.float32)
    return S


@triton.jit
def _history_rows(k_base, u_base, g_base, s_kj, s_uj, s_gj, j0, L, offs_k, mk, offs_v, mv,
                  BLH: tl.constexpr, USE_L2: tl.constexpr):
    """Buffered rows ``j0 .. j0+BLH-1`` (those < L): normalised keys ``[BLH, BK]``, cumulative
    decays ``[BLH]``, corrected values of the V tile ``[BLH, BV]`` and the row mask."""
    offs_j = j0 + tl.arange(0, BLH)
    mj = offs_j < L
    kh = tl.load(k_base + offs_j[:, None] * s_kj + offs_k[None, :],
                 mask=mj[:, None] & mk[None, :], other=0.0)
    kh = _l2norm_rows(kh.to(tl.float32), USE_L2)
    Gj = tl.load(g_base + offs_j * s_gj, mask=mj, other=0.0)
    hu = tl.load(u_base + offs_j[:, None] * s_uj + offs_v[None, :],
                 mask=mj[:, None] & mv[None, :], other=0.0)
    return kh, Gj, hu, mj


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
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, TILES: tl.constexpr,
    USE_L2: tl.constexpr, FLUSH_DOT: tl.constexpr,
):
    """Program (sequence n, value head h, V-split s) handles TILES V-tiles of BV rows.

    The per-step work that does not depend on the V-tile (normalised q and k, the history
    weights ``exp(G - G_j) (k . k_j)`` and ``exp(G - G_j) (q . k_j)``) is computed once, with all
    history rows loaded in one shot; the loop then streams the state tiles, which Triton
    software-pipelines. Dependent memory round trips per program: slot -> cursor -> everything.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_b = tl.arange(0, BV)
    offs_j = tl.arange(0, BL)
    mk = offs_k < K
    slot = tl.load(slots_ptr + n)
    if slot < 0:
        for t in range(TILES):
            offs_v = (sp * TILES + t) * BV + offs_b
            tl.store(o_ptr + n * so_n + h * so_h + offs_v,
                     tl.zeros([BV], dtype=tl.float32).to(o_ptr.dtype.element_ty),
                     mask=offs_v < V)
        return
    slot = tl.cast(slot, tl.int64)
    L = tl.load(meta_ptr + slot * sm_s + 0)
    has = tl.load(meta_ptr + slot * sm_s + 2)
    # Columns of the state to read: all K if the slot has a state, none otherwise (a slot that
    # never flushed reads no state: the short-context path).
    mk_s = offs_k < tl.where(has != 0, K, 0)
    mj = offs_j < L
    s_base = state_ptr + slot * ss_s + h * ss_h
    u_base = bu_ptr + slot * sbu_s + h * sbu_h

    # Issue the first state tile (the step's big read) before anything that waits on it; each
    # loop iteration below prefetches the next tile (manual double buffering).
    offs_v = sp * TILES * BV + offs_b
    mv = offs_v < V
    S_cur = tl.load(s_base + offs_v[:, None] * ss_v + offs_k[None, :] * ss_k,
                    mask=mv[:, None] & mk_s[None, :], other=0.0)
    hu_cur = tl.load(u_base + offs_j[:, None] * sbu_j + offs_v[None, :],
                     mask=mj[:, None] & mv[None, :], other=0.0)

    k_raw = tl.load(k_ptr + n * sk_n + hk * sk_h + offs_k, mask=mk, other=0.0)
    k = _l2norm_vec(k_raw.to(tl.float32), USE_L2)
    q = _l2norm_vec(tl.load(q_ptr + n * sq_n + hk * sq_h + offs_k, mask=mk, other=0.0)
                    .to(tl.float32), USE_L2) * scale
    g = tl.load(g_ptr + n * sg_n + h * sg_h).to(tl.float32)
    beta = tl.load(beta_ptr + n * sb_n + h * sb_h).to(tl.float32)
    bg_base = bg_ptr + slot * sbg_s + h
    G_prev = tl.load(bg_base + (L - 1) * sbg_j, mask=L > 0, other=0.0)
    G = G_prev + g
    eG = tl.exp(G)
    qk_self = tl.sum(q * k)
    do_flush = L + 1 == C

    # History weights for all buffered rows at once (rows >= L get zero weight): computed once
    # per (sequence, head), shared by every V tile.
    kh = tl.load(bk_ptr + slot * sbk_s + offs_j[:, None] * sbk_j + hk * sbk_h + offs_k[None, :],
                 mask=mj[:, None] & mk[None, :], other=0.0)
    kh = _l2norm_rows(kh.to(tl.float32), USE_L2)
    Gj = tl.load(bg_base + offs_j * sbg_j, mask=mj, other=0.0)
    w = tl.where(mj, tl.exp(G - Gj), 0.0)
    wk = w * tl.sum(kh * k[None, :], axis=1)
    wq = w * tl.sum(kh * q[None, :], axis=1)

    for t in range(TILES):
        offs_v = (sp * TILES + t) * BV + offs_b
        mv = offs_v < V
        ms = mv[:, None] & mk[None, :]
        offs_n = offs_v + BV
        mn = (offs_n < V) & (offs_n < (sp + 1) * TILES * BV)   # next tile is this program's
        S_nxt = tl.load(s_base + offs_n[:, None] * ss_v + offs_k[None, :] * ss_k,
                        mask=mn[:, None] & mk_s[None, :], other=0.0)
        hu_nxt = tl.load(u_base + offs_j[:, None] * sbu_j + offs_n[None, :],
                         mask=mj[:, None] & mn[None, :], other=0.0)
        S0 = S_cur.to(tl.float32)
        v = tl.load(v_ptr + n * sv_n + h * sv_h + offs_v, mask=mv, other=0.0).to(tl.float32)
        r_k = tl.sum(S0 * k[None, :], axis=1)
        r_q = tl.sum(S0 * q[None, :], axis=1)
        u = beta * (v - eG * r_k - tl.sum(wk[:, None] * hu_cur, axis=0))
        o = eG * r_q + tl.sum(wq[:, None] * hu_cur, axis=0) + qk_self * u
        tl.store(o_ptr + n * so_n + h * so_h + offs_v, o.to(o_ptr.dtype.element_ty), mask=mv)
        # Append u at row L (read by no other program of this launch).
        tl.store(u_base + L * sbu_j + offs_v, u, mask=mv)
        if FLUSH_DOT:
            if do_flush:
                # S_C = exp(G) S0 + sum_{j<L} exp(G - G_j) u_j k_j^T + u k^T, S0 still in registers.
                S_new = eG * S0 + u[:, None] * k[None, :]
                S_new += tl.dot(tl.trans(hu_cur * w[:, None]), kh, input_precision=DOT_PREC)
                tl.store(s_base + offs_v[:, None] * ss_v + offs_k[None, :] * ss_k,
                         S_new.to(state_ptr.dtype.element_ty), mask=ms)
        S_cur = S_nxt
        hu_cur = hu_nxt
    if sp == 0:
        tl.store(bg_base + L * sbg_j, G)
        if h % GROUP == 0:
            tl.store(bk_ptr + slot * sbk_s + L * sbk_j + hk * sbk_h + offs_k, k_raw, mask=mk)
    if not FLUSH_DOT:
        if do_flush:
            # Second pass over this program's tiles (flush steps only, 1 in C): rank-1 updates
            # keep register use at one state tile; the tiles were just read and sit in L2.
            tl.debug_barrier()
            for t in range(TILES):
                offs_v = (sp * TILES + t) * BV + offs_b
                mv = offs_v < V
                ms = mv[:, None] & mk[None, :]
                s_ptrs = (state_ptr + slot * ss_s + h * ss_h + offs_v[:, None] * ss_v
                          + offs_k[None, :] * ss_k)
                S_new = eG * tl.load(s_ptrs, mask=mv[:, None] & mk_s[None, :],
                                     other=0.0).to(tl.float32)
                u = tl.load(bu_ptr + slot * sbu_s + L * sbu_j + h * sbu_h + offs_v, mask=mv,
                            other=0.0)
                S_new += u[:, None] * k[None, :]
                for j in range(0, L):
                    kj = tl.load(bk_ptr + slot * sbk_s + j * sbk_j + hk * sbk_h + offs_k,
                                 mask=mk, other=0.0).to(tl.float32)
                    kj = _l2norm_vec(kj, USE_L2)
                    wj = tl.exp(G - tl.load(bg_base + j * sbg_j))
                    uj = tl.load(bu_ptr + slot * sbu_s + j * sbu_j + h * sbu_h + offs_v,
                                 mask=mv, other=0.0)
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
    S = _state_tile(s_ptrs, ms, has, BV, BK)
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
            kh, Gj, hu, mj = _history_rows(bk_ptr + slot * sbk_s + hk * sbk_h,
                                           bu_ptr + slot * sbu_s + h * sbu_h, bg_base, sbk_j,
                                           sbu_j, sbg_j, j0, L, offs_k, mk, offs_v, mv, BLH,
                                           USE_L2)
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
    S = _state_tile(s_ptrs, ms, has, BV, BK)
    S = tl.exp(G_end) * S
    for j0 in range(0, Lc, BLH):
        kh, Gj, hu, mj = _history_rows(bk_ptr + slot * sbk_s + hk * sbk_h,
                                       bu_ptr + slot * sbu_s + h * sbu_h, bg_base, sbk_j, sbu_j,
                                       sbg_j, j0, Lc, offs_k, mk, offs_v, mv, BLH, USE_L2)
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
    cfg = launch_config(cache, "decode", batch=N)
    slots = _slots_i32(slots)
    HV, V = cache.num_v_heads, cache.head_v_dim
    nv = triton.cdiv(V, cfg["BV"])
    splits = min(cfg["splits"], nv)
    tiles = triton.cdiv(nv, splits)
    _decode_kernel[(N, HV, triton.cdiv(nv, tiles))](
        q, k, v, g, beta, o, slots,
        cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        *_cache_strides(cache), scale,
        K=cache.head_k_dim, V=V, GROUP=HV // cache.num_k_heads, C=cache.chunk_size,
        BK=cfg["BK"], BV=cfg["BV"], BL=_pow2(cache.capacity), TILES=tiles,
        USE_L2=use_qk_l2norm, FLUSH_DOT=cfg["flush_dot"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
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


__all__ = ["CONFIG_OVERRIDE", "accept", "decode", "launch_config", "prefill", "verify"]
