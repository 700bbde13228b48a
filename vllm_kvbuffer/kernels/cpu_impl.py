"""Native CPU kernels for KVBuffer (backend ``"cpu"``), compiled with numba.

Same semantics and in-place pool updates as :mod:`.torch_impl` (the exact reference); inputs were
validated by :mod:`vllm_kvbuffer.kernels.api`. Formulas: ``shared/design/kvbuffer-math.md``.

Layout of the work: one parallel loop over (sequence, value head) pairs. A pair owns the state block
``state[slot, h]`` (``[V, K]``, key-minor rows) and the ``u``/``G`` buffer rows of its head, so
pairs never write the same memory; raw keys (shared by the value heads of a key head) and meta rows
are stored after the parallel loop. Everything in the buffered form is separable over value rows
``v``: one pass over the state block computes ``S0^T k_hat`` and ``S0^T q_hat`` for every new token
(four rows per iteration, so each key vector load feeds several rows), the corrected values and
outputs follow from small per-pair coefficient tables, and a flush re-reads the block (still in the
core's L2) to write ``exp(G_m) S0 + sum_j exp(G_m - G_j) k_hat_j u_j^T`` in the state's dtype.

Pools are passed as flat views of their memory plus element strides (the tensors may be strided
views into padded vLLM pages; nothing is copied or reshaped); bf16 and fp16 tensors are viewed as
16-bit integers and widened to fp32 inside the kernels. ``u``, ``G`` and every accumulator are
fp32 (float64 for a float64 cache). Reassociation and FMA contraction are allowed so that dot
products vectorise; NaN/inf semantics are kept (no ``nnan``/``ninf``), and memory the algorithm
must not read (buffer rows past a slot's length, the state of a slot that never flushed) is never
read at all.

Compilation: numba compiles each kernel once per dtype combination and caches the machine code in
``NUMBA_CACHE_DIR`` (the project's ``.cache/numba`` in development, see
:mod:`vllm_kvbuffer.tools.local_env`); without it, numba's own default is used (``__pycache__``
beside this file when writable, else the user's cache directory). Threads: numba runs as many
threads as torch (``torch.get_num_threads()``, which vLLM's CPU worker sets to its bound cores).
"""

from __future__ import annotations

import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .. import envs  # the settings table: one parser for every VLLM_KVBUFFER* variable
from .cache import META_HAS_STATE, META_LEN, META_PENDING, KVBufferCache
from .validation import check

# Reassociation lets LLVM vectorise the dot products; no nnan/ninf, so NaN and inf still propagate.
_FASTMATH = {"reassoc", "contract", "nsz"}
_NJIT = {"cache": True, "fastmath": _FASTMATH, "nogil": True}
L2NORM_EPS = 1e-6


# -- 16-bit floats: bit views, widened / rounded inside the kernels --------------------------------
@intrinsic
def _bf16_to_f32(typingctx, x):
    """bf16 bits (uint16) -> float32: the bits are the top half of the float32."""
    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def _f16_to_f32(typingctx, x):
    """fp16 bits (int16) -> float32."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def _f32_to_f16(typingctx, x):
    """float32 -> fp16 bits (int16), round to nearest even."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(x), codegen


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


def _ld(x):
    """Widen one stored element to its arithmetic type (fp32, or float64 for float64)."""


@overload(_ld)
def _ld_impl(x):
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    if x == types.int16:
        return lambda x: _f16_to_f32(x)
    if x in (types.float32, types.float64):
        return lambda x: x
    return None


@njit(**_NJIT)
def _f32_to_bf16(x):
    # Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN.
    b = _f32_bits(np.float32(x))
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return np.uint16(b >> np.uint32(16))


def _st(a, i, x):
    """``a[i] = x`` rounded to ``a``'s storage dtype."""


@overload(_st)
def _st_impl(a, i, x):
    dt = a.dtype
    if dt == types.uint16:
        def impl(a, i, x):
            a[i] = _f32_to_bf16(x)
    elif dt == types.int16:
        def impl(a, i, x):
            a[i] = _f32_to_f16(np.float32(x))
    elif dt == types.float32:
        def impl(a, i, x):
            a[i] = np.float32(x)
    elif dt == types.float64:
        def impl(a, i, x):
            a[i] = np.float64(x)
    else:
        return None
    return impl


# -- shared pieces of the kernels ------------------------------------------------------------------
# Element strides, one int64 array per call (see _strides): state, buf_k, buf_u, buf_g, meta, then
# for token kernels q, k, v, g, beta, out as (token, head) pairs.
_S_STATE, _S_BK, _S_BU, _S_BG, _S_META = 0, 3, 6, 9, 12
_S_Q, _S_K, _S_V, _S_G, _S_B, _S_O = 14, 16, 18, 20, 22, 24


# Hot loops index 1-D contiguous slices (``row[kk]``), never ``flat[offset + kk]``: with a slice
# LLVM sees unit-stride, non-aliasing accesses and vectorises (measured 5x on the state pass).
@njit(**_NJIT)
def _load_key(dst, src, l2, mult):
    """``dst[:] = mult * l2norm(src)`` (or without the norm) in dst's dtype; ``src`` 1-D."""
    ss = dst.dtype.type(0.0)
    for kk in range(dst.shape[0]):
        x = dst.dtype.type(_ld(src[kk]))
        dst[kk] = x
        ss += x * x
    f = dst.dtype.type(mult)
    if l2:
        f = f / np.sqrt(ss + dst.dtype.type(L2NORM_EPS))
    for kk in range(dst.shape[0]):
        dst[kk] *= f


@njit(**_NJIT)
def _widen_row(dst, src):
    for kk in range(dst.shape[0]):
        dst[kk] = _ld(src[kk])


@njit(**_NJIT)
def _store_row(dst, src):
    for kk in range(src.shape[0]):
        _st(dst, kk, src[kk])


@njit(**_NJIT)
def _state_dots(state, base, rs, V, K, vecs, nvec, out):
    """``out[i, v] = state[base + v*rs : +K] . vecs[i]`` for the ``nvec`` (even) vectors: four
    rows and two vectors per iteration, so that every element loaded feeds several FMAs."""
    z = out.dtype.type(0.0)
    v0 = 0
    while v0 + 4 <= V:
        o = base + v0 * rs
        r0 = state[o:o + K]
        r1 = state[o + rs:o + rs + K]
        r2 = state[o + 2 * rs:o + 2 * rs + K]
        r3 = state[o + 3 * rs:o + 3 * rs + K]
        for i in range(0, nvec, 2):
            x = vecs[i]
            y = vecs[i + 1]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = z
            for kk in range(K):
                s0 = _ld(r0[kk])
                s1 = _ld(r1[kk])
                s2 = _ld(r2[kk])
                s3 = _ld(r3[kk])
                a0 += s0 * x[kk]
                a1 += s1 * x[kk]
                a2 += s2 * x[kk]
                a3 += s3 * x[kk]
                b0 += s0 * y[kk]
                b1 += s1 * y[kk]
                b2 += s2 * y[kk]
                b3 += s3 * y[kk]
            out[i, v0] = a0
            out[i, v0 + 1] = a1
            out[i, v0 + 2] = a2
            out[i, v0 + 3] = a3
            out[i + 1, v0] = b0
            out[i + 1, v0 + 1] = b1
            out[i + 1, v0 + 2] = b2
            out[i + 1, v0 + 3] = b3
        v0 += 4
    for v in range(v0, V):
        r = state[base + v * rs:base + v * rs + K]
        for i in range(nvec):
            x = vecs[i]
            a = z
            for kk in range(K):
                a += _ld(r[kk]) * x[kk]
            out[i, v] = a


@njit(**_NJIT)
def _fold_rows(state, base, rs, V, K, has, KH, U, G, m, row, dst, dbase, drs, dks):
    """Fold the first ``m`` buffered rows into the state block at ``base``:
    ``S_m = exp(G_m) S0 + sum_{j<m} exp(G_m - G_j) k_hat_j u_j^T``, row by row, written to ``dst``
    at ``dbase + v*drs + k*dks`` (the state block itself when flushing, a fla-layout output for
    materialize_state). ``S0`` is zero and never read when ``has`` is false."""
    acc = row.dtype.type
    Gm = G[m - 1] if m > 0 else acc(0.0)
    eGm = np.exp(Gm)
    w = np.empty(max(m, 1), row.dtype)
    for j in range(m):
        w[j] = np.exp(Gm - G[j])
    v0 = 0
    if dks == 1:
        # Four rows per pass over the buffered keys: each key element loaded feeds four FMAs.
        rows = np.empty((4, K), row.dtype)
        r0, r1, r2, r3 = rows[0], rows[1], rows[2], rows[3]
        while v0 + 4 <= V:
            o = base + v0 * rs
            if has:
                s0 = state[o:o + K]
                s1 = state[o + rs:o + rs + K]
                s2 = state[o + 2 * rs:o + 2 * rs + K]
                s3 = state[o + 3 * rs:o + 3 * rs + K]
                for kk in range(K):
                    r0[kk] = eGm * _ld(s0[kk])
                    r1[kk] = eGm * _ld(s1[kk])
                    r2[kk] = eGm * _ld(s2[kk])
                    r3[kk] = eGm * _ld(s3[kk])
            else:
                rows[:] = 0.0
            for j in range(m):
                kj = KH[j]
                c0 = w[j] * U[j, v0]
                c1 = w[j] * U[j, v0 + 1]
                c2 = w[j] * U[j, v0 + 2]
                c3 = w[j] * U[j, v0 + 3]
                for kk in range(K):
                    x = kj[kk]
                    r0[kk] += c0 * x
                    r1[kk] += c1 * x
                    r2[kk] += c2 * x
                    r3[kk] += c3 * x
            for i in range(4):
                d = dbase + (v0 + i) * drs
                _store_row(dst[d:d + K], rows[i])
            v0 += 4
    for v in range(v0, V):
        if has:
            src = state[base + v * rs:base + v * rs + K]
            for kk in range(K):
                row[kk] = eGm * _ld(src[kk])
        else:
            row[:] = 0.0
        for j in range(m):
            c = w[j] * U[j, v]
            kj = KH[j]
            for kk in range(K):
                row[kk] += c * kj[kk]
        d = dbase + v * drs
        if dks == 1:
            _store_row(dst[d:d + K], row)
        else:
            for kk in range(K):
                _st(dst, d + kk * dks, row[kk])


# -- decode / verify / prefill ---------------------------------------------------------------------
@njit(**_NJIT)
def _tokens_pair(n, h, slots, cu, commit, C, scale, l2, ratio, K, V, B,
                 q, k, v, g, beta, out, state, bk, bu, bg, meta, st):
    """Sequence ``n``, value head ``h`` of :func:`_tokens_kernel`."""
    acc = bu.dtype
    s = slots[n]
    t_lo = cu[n]
    t_hi = cu[n + 1]
    if s < 0:
        for t in range(t_lo, t_hi):
            ob = t * st[_S_O] + h * st[_S_O + 1]
            out[ob:ob + V] = 0
        return
    kh = h // ratio
    L = meta[s * st[_S_META] + META_LEN * st[_S_META + 1]]
    has = meta[s * st[_S_META] + META_HAS_STATE * st[_S_META + 1]] != 0
    sbase = s * st[_S_STATE] + h * st[_S_STATE + 1]
    rs = st[_S_STATE + 2]
    KH = np.empty((B, K), acc)            # normalised keys: history rows, then new tokens
    U = np.empty((B, V), acc)             # corrected values
    G = np.empty(B, acc)                  # cumulative log-decay since the last flush
    nmax = B if not commit else C
    QB = np.empty((2 * nmax, K), acc)     # rows 0..n-1: new keys, n..2n-1: scaled queries
    R = np.empty((2 * nmax, V), acc)      # S0^T k_hat, S0^T q_hat per new token
    orow = np.empty(V, acc)
    frow = np.empty(K, acc)
    for j in range(L):
        kb = s * st[_S_BK] + j * st[_S_BK + 1] + kh * st[_S_BK + 2]
        _load_key(KH[j], bk[kb:kb + K], l2, 1.0)
        ub = s * st[_S_BU] + j * st[_S_BU + 1] + h * st[_S_BU + 2]
        U[j, :] = bu[ub:ub + V]
        G[j] = bg[s * st[_S_BG] + j * st[_S_BG + 1] + h * st[_S_BG + 2]]
    pos = t_lo
    while pos < t_hi:
        nseg = min(t_hi - pos, C - L) if commit else t_hi - pos
        Gp = G[L - 1] if L > 0 else acc.type(0.0)
        for t in range(nseg):
            tok = pos + t
            i = L + t
            kb = tok * st[_S_K] + kh * st[_S_K + 1]
            _load_key(QB[t], k[kb:kb + K], l2, 1.0)
            qb = tok * st[_S_Q] + kh * st[_S_Q + 1]
            _load_key(QB[nseg + t], q[qb:qb + K], l2, scale)
            KH[i, :] = QB[t]
            Gp = Gp + acc.type(_ld(g[tok * st[_S_G] + h * st[_S_G + 1]]))
            G[i] = Gp
        if has:
            _state_dots(state, sbase, rs, V, K, QB, 2 * nseg, R)
        for t in range(nseg):
            tok = pos + t
            i = L + t
            eG = np.exp(G[i])
            bt = acc.type(_ld(beta[tok * st[_S_B] + h * st[_S_B + 1]]))
            vb = tok * st[_S_V] + h * st[_S_V + 1]
            _widen_row(orow, v[vb:vb + V])
            if has:
                rk = R[t]
                for vv in range(V):
                    orow[vv] -= eG * rk[vv]
            # u_i = beta_i (v_i - exp(G_i) S0^T k_i - sum_{j<i} exp(G_i - G_j)(k_i.k_j) u_j):
            # forward substitution of the block's unit lower-triangular system.
            ki = KH[i]
            for j in range(i):
                kj = KH[j]
                d = acc.type(0.0)
                for kk in range(K):
                    d += ki[kk] * kj[kk]
                c = np.exp(G[i] - G[j]) * d
                uj = U[j]
                for vv in range(V):
                    orow[vv] -= c * uj[vv]
            ui = U[i]
            for vv in range(V):
                ui[vv] = bt * orow[vv]
            # o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j)(q_i.k_j) u_j
            if has:
                rq = R[nseg + t]
                for vv in range(V):
                    orow[vv] = eG * rq[vv]
            else:
                orow[:] = 0.0
            qi = QB[nseg + t]
            for j in range(i + 1):
                kj = KH[j]
                d = acc.type(0.0)
                for kk in range(K):
                    d += qi[kk] * kj[kk]
                c = np.exp(G[i] - G[j]) * d
                uj = U[j]
                for vv in range(V):
                    orow[vv] += c * uj[vv]
            ob = tok * st[_S_O] + h * st[_S_O + 1]
            _store_row(out[ob:ob + V], orow)
            ub = s * st[_S_BU] + i * st[_S_BU + 1] + h * st[_S_BU + 2]
            bu[ub:ub + V] = ui
            bg[s * st[_S_BG] + i * st[_S_BG + 1] + h * st[_S_BG + 2]] = G[i]
        L += nseg
        pos += nseg
        if commit and L >= C:
            _fold_rows(state, sbase, rs, V, K, has, KH, U, G, L, frow, state, sbase, rs, 1)
            has = True
            L = 0


@njit(parallel=True, **_NJIT)
def _tokens_kernel(slots, cu, commit, C, scale, l2, ratio, HV, K, V, B,
                   q, k, v, g, beta, out, state, bk, bu, bg, meta, st):
    """Tokens ``cu[n]:cu[n+1]`` continue slot ``slots[n]``.

    ``commit``: committed tokens (decode, prefill): split at flush boundaries, a slot whose buffer
    reaches ``C`` is flushed and its meta row updated. Otherwise (verify) the tokens form one
    tentative block and ``PENDING`` is set to ``cu[n+1] - cu[n]``. Padding slots (< 0): outputs
    zero, nothing else touched.
    """
    N = slots.shape[0]
    for p in prange(N * HV):
        _tokens_pair(p // HV, p % HV, slots, cu, commit, C, scale, l2, ratio, K, V, B,
                     q, k, v, g, beta, out, state, bk, bu, bg, meta, st)
    _tokens_finish(slots, cu, commit, C, ratio, HV, K, k, bk, meta, st)


@njit(**_NJIT)
def _tokens_finish(slots, cu, commit, C, ratio, HV, K, k, bk, meta, st):
    N = slots.shape[0]
    # Raw keys and meta rows last: the value heads sharing a key head read its history rows
    # above, and a prefill that flushes reuses those rows for its tail.
    H = HV // ratio
    for n in range(N):
        s = slots[n]
        if s < 0:
            continue
        mb = s * st[_S_META]
        L = meta[mb + META_LEN * st[_S_META + 1]]
        flushed = False
        pos = cu[n]
        while pos < cu[n + 1]:
            nseg = min(cu[n + 1] - pos, C - L) if commit else cu[n + 1] - pos
            if pos + nseg == cu[n + 1] and not (commit and L + nseg >= C):
                # Only rows that stay buffered are stored (flushed rows are dead).
                for t in range(nseg):
                    for kh in range(H):
                        kb = s * st[_S_BK] + (L + t) * st[_S_BK + 1] + kh * st[_S_BK + 2]
                        kin = (pos + t) * st[_S_K] + kh * st[_S_K + 1]
                        bk[kb:kb + K] = k[kin:kin + K]
            L += nseg
            pos += nseg
            if commit and L >= C:
                L = 0
                flushed = True
        if commit:
            meta[mb + META_LEN * st[_S_META + 1]] = L
            if flushed:
                meta[mb + META_HAS_STATE * st[_S_META + 1]] = 1
        else:
            meta[mb + META_PENDING * st[_S_META + 1]] = cu[n + 1] - cu[n]


# -- accept (flush) / materialize_state -----------------------------------------------------------
@njit(parallel=True, **_NJIT)
def _fold_kernel(slots, lengths, l2, ratio, HV, K, V, state, bk, bu, bg, meta, st, dst, dst_st,
                 to_state):
    """Fold the first ``lengths[n]`` buffered rows of slot ``slots[n]`` into its state.

    ``to_state``: flush into the pool (pairs with ``lengths[n] < 0`` are skipped); otherwise write
    ``dst[n, h, k, v]`` (strides ``dst_st``) and leave the pool alone (padding: zero block).
    """
    N = slots.shape[0]
    for p in prange(N * HV):
        _fold_pair(p // HV, p % HV, slots, lengths, l2, ratio, K, V, state, bk, bu, bg, meta, st,
                   dst, dst_st, to_state)
    if to_state:
        # HAS_STATE last: every pair above read whether its slot had a state before the fold.
        for n in range(N):
            if slots[n] >= 0 and lengths[n] >= 0:
                meta[slots[n] * st[_S_META] + META_HAS_STATE * st[_S_META + 1]] = 1


@njit(**_NJIT)
def _fold_pair(n, h, slots, lengths, l2, ratio, K, V, state, bk, bu, bg, meta, st, dst, dst_st,
               to_state):
    acc = bu.dtype
    s = slots[n]
    m = lengths[n]
    if s < 0 or m < 0:
        if not to_state:
            for kk in range(K):
                for vv in range(V):
                    dst[n * dst_st[0] + h * dst_st[1] + kk * dst_st[2] + vv * dst_st[3]] = 0.0
        return
    kh = h // ratio
    has = meta[s * st[_S_META] + META_HAS_STATE * st[_S_META + 1]] != 0
    KH = np.empty((max(m, 1), K), acc)
    U = np.empty((max(m, 1), V), acc)
    G = np.empty(max(m, 1), acc)
    frow = np.empty(K, acc)
    for j in range(m):
        kb = s * st[_S_BK] + j * st[_S_BK + 1] + kh * st[_S_BK + 2]
        _load_key(KH[j], bk[kb:kb + K], l2, 1.0)
        ub = s * st[_S_BU] + j * st[_S_BU + 1] + h * st[_S_BU + 2]
        U[j, :] = bu[ub:ub + V]
        G[j] = bg[s * st[_S_BG] + j * st[_S_BG + 1] + h * st[_S_BG + 2]]
    sbase = s * st[_S_STATE] + h * st[_S_STATE + 1]
    rs = st[_S_STATE + 2]
    if to_state:
        _fold_rows(state, sbase, rs, V, K, has, KH, U, G, m, frow, state, sbase, rs, 1)
    else:
        _fold_rows(state, sbase, rs, V, K, has, KH, U, G, m, frow, dst,
                   n * dst_st[0] + h * dst_st[1], dst_st[3], dst_st[2])


@njit(**_NJIT)
def _accept_lengths(slots, num_accepted, C, meta, st, lengths):
    """Commit the accepted tokens: ``lengths[n]`` = rows to flush (or -1), meta rows updated as
    after the flush the caller runs next."""
    for n in range(slots.shape[0]):
        lengths[n] = -1
        s = slots[n]
        if s < 0:
            continue
        mb = s * st[_S_META]
        L = meta[mb + META_LEN * st[_S_META + 1]] + num_accepted[n]
        meta[mb + META_PENDING * st[_S_META + 1]] = 0
        if L >= C:
            lengths[n] = L
            meta[mb + META_LEN * st[_S_META + 1]] = 0
        else:
            meta[mb + META_LEN * st[_S_META + 1]] = L


# -- torch -> numpy glue ---------------------------------------------------------------------------
_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}


def _flat(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy array over ``t``'s memory (no copy); index with ``t``'s element strides."""
    if t.numel() == 0:      # nothing will be indexed; keep the kernel's argument types
        t = torch.empty(1, dtype=t.dtype)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    if t.dtype in _BITS:
        flat = flat.view(_BITS[t.dtype])
    return flat.numpy()


def _check_unit_inner(t: torch.Tensor, name: str) -> None:
    check(t.shape[-1] <= 1 or t.stride(-1) == 1, f"{name}.stride(-1)",
          "1 (unit stride in the last dim)", t.stride(-1))


_POOL_VIEWS: dict = {}


def _pool(cache: KVBufferCache):
    """Flat views and strides of the pool tensors, memoised per memory layout (vLLM builds a new
    KVBufferCache over the same pages on every forward)."""
    ts = (cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta)
    key = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in ts)
    hit = _POOL_VIEWS.get(key)
    if hit is not None:
        return hit
    for t, name in zip(ts, ("state", "buf_k", "buf_u", "buf_g")):
        _check_unit_inner(t, f"cache.{name}")
    st = [*cache.state.stride()[:3], *cache.buf_k.stride()[:3], *cache.buf_u.stride()[:3],
          *cache.buf_g.stride(), *cache.meta.stride()]
    hit = (tuple(_flat(t) for t in ts), st)
    if len(_POOL_VIEWS) > 64:
        _POOL_VIEWS.clear()
    _POOL_VIEWS[key] = hit
    return hit


# Below this many state elements touched per call, one thread: waking the pool costs more than
# the work, and on a busy machine a parallel region waits for its slowest (descheduled) thread.
_SERIAL_BELOW = 1 << 16


@njit(parallel=True, cache=True)
def _touch_pool(x):
    for i in prange(x.shape[0]):
        x[i] = i


_POOL_STARTED = False


def _start_pool() -> None:
    """Start numba's worker threads able to run on every core this process's threads use.

    vLLM's CPU worker binds each torch OpenMP thread to one core, the calling thread included;
    threads started later inherit the caller's one-core mask, so numba's workers would all share
    that core. The workers are started once, under the union of the masks of the process's
    threads (the cores vLLM gave this rank), and the caller's own mask is restored.
    """
    global _POOL_STARTED
    if _POOL_STARTED:
        return
    _POOL_STARTED = True
    if numba.config.THREADING_LAYER == "default" and not os.environ.get("NUMBA_THREADING_LAYER"):
        # numba's OpenMP layer is a second OpenMP runtime beside torch's: both pools spin-wait
        # on the same cores after each parallel region and stall each other (measured here up to
        # 10x slower calls). The workqueue layer's workers sleep between regions.
        numba.config.THREADING_LAYER = "workqueue"
    n = numba.config.NUMBA_NUM_THREADS
    mine = union = None
    try:
        mine = os.sched_getaffinity(0)
        union = set(mine)
        for tid in os.listdir("/proc/self/task"):
            try:
                union |= os.sched_getaffinity(int(tid))
            except OSError:           # a thread that just exited
                pass
        if union != mine:
            os.sched_setaffinity(0, union)
    except (AttributeError, OSError):  # not Linux: nothing is bound
        mine = None
    try:
        numba.set_num_threads(n)
        _touch_pool(np.zeros(4 * n))
    finally:
        if mine is not None and union != mine:
            os.sched_setaffinity(0, mine)


def _set_threads(work: int) -> None:
    # vLLM's CPU worker sizes (and binds) torch's OpenMP pool to its cores: use as many, unless
    # VLLM_KVBUFFER_CPU_THREADS says otherwise.
    n = envs.get("VLLM_KVBUFFER_CPU_THREADS") or torch.get_num_threads()
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if work < _SERIAL_BELOW:
        n = 1
    # Even a one-thread call of a parallel kernel starts numba's threading layer: start it here.
    _start_pool()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def _acc_input(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t if t.dtype == acc else t.to(acc)


def _run_tokens(cache: KVBufferCache, slots: torch.Tensor, cu: np.ndarray, q, k, v, g, beta,
                out: torch.Tensor, *, commit: bool, scale: float, use_qk_l2norm: bool) -> None:
    """Inputs are packed token-major: ``q, k [T, H, K]``, ``v [T, HV, V]``, ``g, beta [T, HV]``,
    ``out [T, HV, V]``."""
    (state, bk, bu, bg, meta), pst = _pool(cache)
    acc = cache.acc_dtype
    g, beta = _acc_input(g, acc), _acc_input(beta, acc)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_unit_inner(t, name)
    st = np.array(pst + [q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                         v.stride(1), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
                         out.stride(0), out.stride(1)], dtype=np.int64)
    _set_threads(slots.shape[0] * cache.num_v_heads * cache.head_k_dim * cache.head_v_dim)
    _tokens_kernel(slots.numpy().astype(np.int64), cu, commit, cache.chunk_size, float(scale),
                   use_qk_l2norm, cache.num_v_heads // cache.num_k_heads, cache.num_v_heads,
                   cache.head_k_dim, cache.head_v_dim, cache.capacity,
                   _flat(q), _flat(k), _flat(v), _flat(g), _flat(beta), _flat(out),
                   state, bk, bu, bg, meta, st)


def _flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[N, T, ...]`` -> ``[N*T, ...]`` (a view for the layouts callers produce)."""
    return x.reshape((x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))


def decode(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cu = np.arange(slots.shape[0] + 1, dtype=np.int64)
    _run_tokens(cache, slots, cu, q, k, v, g, beta, out, commit=True, scale=scale,
                use_qk_l2norm=use_qk_l2norm)
    return out


def verify(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    N, T = q.shape[:2]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cu = np.arange(N + 1, dtype=np.int64) * T
    _run_tokens(cache, slots, cu, *(_flat_tokens(x) for x in (q, k, v, g, beta)),
                out.view((N * T,) + tuple(v.shape[2:])), commit=False, scale=scale,
                use_qk_l2norm=use_qk_l2norm)
    return out


def prefill(cache, slots, q, k, v, g, beta, cu_seqlens, *, scale, use_qk_l2norm):
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _run_tokens(cache, slots, cu_seqlens.numpy().astype(np.int64), q, k, v, g, beta, out,
                commit=True, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return out


def accept(cache, slots, num_accepted, *, use_qk_l2norm):
    (state, bk, bu, bg, meta), pst = _pool(cache)
    st = np.array(pst, dtype=np.int64)
    sl = slots.numpy().astype(np.int64)
    lengths = np.empty(sl.shape[0], dtype=np.int64)
    _accept_lengths(sl, num_accepted.numpy().astype(np.int64), cache.chunk_size, meta, st,
                    lengths)
    if (lengths >= 0).any():
        # LEN is already 0 for the slots to flush; the fold sets HAS_STATE after reading it.
        _set_threads(sl.shape[0] * cache.num_v_heads * cache.head_k_dim * cache.head_v_dim)
        _fold_kernel(sl, lengths, use_qk_l2norm, cache.num_v_heads // cache.num_k_heads,
                     cache.num_v_heads, cache.head_k_dim, cache.head_v_dim, state, bk, bu, bg,
                     meta, st, bu, st, True)


def materialize_state(cache, slots, *, use_qk_l2norm):
    (state, bk, bu, bg, meta), pst = _pool(cache)
    st = np.array(pst, dtype=np.int64)
    N = slots.shape[0]
    out = torch.empty(N, cache.num_v_heads, cache.head_k_dim, cache.head_v_dim,
                      dtype=cache.acc_dtype)
    sl = slots.numpy().astype(np.int64)
    lengths = np.full(N, -1, dtype=np.int64)
    valid = sl >= 0
    lengths[valid] = cache.meta[torch.from_numpy(sl[valid]), META_LEN].numpy()
    _set_threads(N * cache.num_v_heads * cache.head_k_dim * cache.head_v_dim)
    _fold_kernel(sl, lengths, use_qk_l2norm, cache.num_v_heads // cache.num_k_heads,
                 cache.num_v_heads, cache.head_k_dim, cache.head_v_dim, state, bk, bu, bg, meta,
                 st, _flat(out), np.array(out.stride(), dtype=np.int64), False)
    return out


def numba_cache_dir() -> str | None:
    """Where compiled kernels are cached (None: numba's default beside this module)."""
    return os.environ.get("NUMBA_CACHE_DIR") or None
