"""Exact PyTorch implementation of KVBuffer (backend ``"torch"``).

Readable, batched and exact in float64; it is the specification the Triton kernels are tested
against and the path the vLLM layer takes on the CPU. Formulas: ``docs/kvbuffer-math.md``.
Inputs were validated by :mod:`vllm_kvbuffer.kernels.api`; these functions trust them.

Unwritten or stale memory may hold anything (NaN in fresh pools): every read of buffer rows past a
slot's length, or of the state of a slot that never flushed, goes through ``torch.where`` /
``masked_fill`` before it can touch arithmetic, never through a multiplication by zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import META_HAS_STATE, META_LEN, META_PENDING, KVBufferCache
from .recurrent import expand_k_heads, l2norm

_NEG_INF = float("-inf")


def _normalise_qk(cache: KVBufferCache, q: torch.Tensor | None, k: torch.Tensor, scale: float,
                  use_qk_l2norm: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Upcast to the accumulator dtype, L2-normalise, scale q, expand key heads to value heads."""
    acc, HV = cache.acc_dtype, cache.num_v_heads
    kh = k.to(acc)
    kh = expand_k_heads(l2norm(kh) if use_qk_l2norm else kh, HV)
    if q is None:
        return None, kh
    qh = q.to(acc)
    qh = expand_k_heads((l2norm(qh) if use_qk_l2norm else qh) * scale, HV)
    return qh, kh


def _history(cache: KVBufferCache, slots: torch.Tensor, lengths: torch.Tensor, use_qk_l2norm: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The committed buffer of each slot, padded to the capacity B.

    Returns ``(mask [N,B], k_hat [N,B,HV,K], u [N,B,HV,V], G [N,B,HV], G_last [N,HV])``; rows past
    a slot's length are zero (``G`` there is left as stored: always mask it before use).
    """
    B = cache.capacity
    mask = torch.arange(B, device=cache.device)[None, :] < lengths[:, None]
    _, hk = _normalise_qk(cache, None, cache.buf_k[slots], 1.0, use_qk_l2norm)
    hk = torch.where(mask[:, :, None, None], hk, 0.0)
    hu = torch.where(mask[:, :, None, None], cache.buf_u[slots], 0.0)
    hG = cache.buf_g[slots]
    last = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, hG.shape[-1])
    G_last = torch.where(lengths[:, None] > 0, hG.gather(1, last).squeeze(1), 0.0)
    return mask, hk, hu, hG, G_last


def _initial_state(cache: KVBufferCache, slots: torch.Tensor) -> torch.Tensor:
    """``S0 [N, HV, V, K]`` in the accumulator dtype; zero for slots that never flushed."""
    has = cache.meta[slots, META_HAS_STATE] != 0
    return torch.where(has[:, None, None, None], cache.state[slots].to(cache.acc_dtype), 0.0)


def append_block(cache: KVBufferCache, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, scale: float,
                 use_qk_l2norm: bool) -> torch.Tensor:
    """Process T new tokens per slot against ``S0`` and the committed buffer; append them.

    ``slots`` ``[N]`` (long, all valid, distinct); ``q, k [N,T,H,K]``, ``v [N,T,HV,V]``,
    ``g, beta [N,T,HV]``. The new entries are written at positions ``LEN .. LEN+T-1``; ``meta`` is
    not touched (callers decide whether they are committed or tentative). Returns ``o [N,T,HV,V]``
    in the accumulator dtype.

    Within the block the corrected values solve ``(I + A) U = rhs`` (unit lower-triangular), with
    ``A_ts = beta_t exp(G_t - G_s) (k_t . k_s)`` for ``s < t`` and
    ``rhs_t = beta_t (v_t - exp(G_t) S0^T k_t - sum_j exp(G_t - G_j) (k_t . k_j) u_j)``.
    """
    acc = cache.acc_dtype
    N, T = k.shape[:2]
    lengths = cache.meta[slots, META_LEN].long()
    qh, kh = _normalise_qk(cache, q, k, scale, use_qk_l2norm)          # [N,T,HV,K]
    mask, hk, hu, hG, G_last = _history(cache, slots, lengths, use_qk_l2norm)
    G = G_last[:, None, :] + torch.cumsum(g.to(acc), dim=1)            # [N,T,HV]
    bt = beta.to(acc)

    # History terms: decay exp(G_t - G_j) for committed rows j (always <= 1).
    dec_h = torch.exp((G[:, :, None, :] - hG[:, None, :, :])
                      .masked_fill(~mask[:, None, :, None], _NEG_INF))  # [N,T,B,HV]
    kk_h = torch.einsum("nthk,njhk->ntjh", kh, hk) * dec_h
    qk_h = torch.einsum("nthk,njhk->ntjh", qh, hk) * dec_h

    S0 = _initial_state(cache, slots)                                   # [N,HV,V,K]
    eG = torch.exp(G)[..., None]
    r_k = torch.einsum("nhvk,nthk->nthv", S0, kh)
    r_q = torch.einsum("nhvk,nthk->nthv", S0, qh)
    rhs = bt[..., None] * (v.to(acc) - eG * r_k - torch.einsum("ntjh,njhv->nthv", kk_h, hu))

    # Intra-block terms: lower triangle (s <= t) of exp(G_t - G_s).
    tri = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
    dec_b = torch.exp((G[:, :, None, :] - G[:, None, :, :])
                      .masked_fill(~tri[None, :, :, None], _NEG_INF))   # [N,T,T,HV]
    strict = tri.clone().fill_diagonal_(False)
    A = (bt[:, :, None, :] * torch.einsum("nthk,nshk->ntsh", kh, kh) * dec_b)
    A = A.masked_fill(~strict[None, :, :, None], 0.0)
    eye = torch.eye(T, dtype=acc, device=k.device)
    U = torch.linalg.solve_triangular(A.permute(0, 3, 1, 2) + eye, rhs.permute(0, 2, 1, 3),
                                      upper=False, unitriangular=True)
    u = U.permute(0, 2, 1, 3)                                           # [N,T,HV,V]

    qk_b = torch.einsum("nthk,nshk->ntsh", qh, kh) * dec_b
    o = (eG * r_q + torch.einsum("ntjh,njhv->nthv", qk_h, hu)
         + torch.einsum("ntsh,nshv->nthv", qk_b, u))

    pos = lengths[:, None] + torch.arange(T, device=k.device)[None, :]
    rows = slots[:, None]
    cache.buf_k[rows, pos] = k.to(cache.dtype)
    cache.buf_u[rows, pos] = u
    cache.buf_g[rows, pos] = G
    return o


def folded_state(cache: KVBufferCache, slots: torch.Tensor, use_qk_l2norm: bool) -> torch.Tensor:
    """``S = exp(G_L) S0 + sum_{j<L} exp(G_L - G_j) k_hat_j u_j^T`` over committed rows,
    ``[N, HV, V, K]`` in the accumulator dtype (nothing written)."""
    lengths = cache.meta[slots, META_LEN].long()
    mask, hk, hu, hG, G_last = _history(cache, slots, lengths, use_qk_l2norm)
    w = torch.exp((G_last[:, None, :] - hG).masked_fill(~mask[:, :, None], _NEG_INF))  # [N,B,HV]
    S0 = _initial_state(cache, slots)
    return (torch.exp(G_last)[:, :, None, None] * S0
            + torch.einsum("njh,njhv,njhk->nhvk", w, hu, hk))


def flush(cache: KVBufferCache, slots: torch.Tensor, use_qk_l2norm: bool) -> None:
    """Fold every committed buffered token of ``slots`` into the state; empty their buffers."""
    if slots.numel() == 0:
        return
    cache.state[slots] = folded_state(cache, slots, use_qk_l2norm).to(cache.state_dtype)
    cache.meta[slots, META_HAS_STATE] = 1
    cache.meta[slots, META_LEN] = 0


def _flush_full(cache: KVBufferCache, slots: torch.Tensor, use_qk_l2norm: bool) -> None:
    full = cache.meta[slots, META_LEN] >= cache.chunk_size
    flush(cache, slots[full], use_qk_l2norm)


def _scatter_rows(out: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out.zero_()
    out[valid] = rows.to(out.dtype)
    return out


def decode(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    valid = slots >= 0
    sl = slots[valid].long()
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    o = append_block(cache, sl, q[valid, None], k[valid, None], v[valid, None], g[valid, None],
                     beta[valid, None], scale=scale, use_qk_l2norm=use_qk_l2norm)
    cache.meta[sl, META_LEN] += 1
    _flush_full(cache, sl, use_qk_l2norm)
    return _scatter_rows(out, valid, o[:, 0])


def verify(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    valid = slots >= 0
    sl = slots[valid].long()
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    o = append_block(cache, sl, q[valid], k[valid], v[valid], g[valid], beta[valid],
                     scale=scale, use_qk_l2norm=use_qk_l2norm)
    cache.meta[sl, META_PENDING] = q.shape[1]
    return _scatter_rows(out, valid, o)


def accept(cache, slots, num_accepted, *, use_qk_l2norm):
    valid = slots >= 0
    sl = slots[valid].long()
    cache.meta[sl, META_LEN] += num_accepted[valid].to(torch.int32)
    cache.meta[sl, META_PENDING] = 0
    _flush_full(cache, sl, use_qk_l2norm)


def prefill(cache, slots, q, k, v, g, beta, cu_seqlens, *, scale, use_qk_l2norm):
    """Per sequence: fill the buffer up to ``chunk_size``, flush, repeat; the tail stays buffered.

    Every segment is one :func:`append_block` call, so prefill, decode and verify share one exact
    code path; a segment never crosses a flush boundary.
    """
    out = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    C = cache.chunk_size
    cu = cu_seqlens.tolist()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        sl = torch.tensor([slot], dtype=torch.long, device=cache.device)
        pos, end = cu[i], cu[i + 1]
        while pos < end:
            length = int(cache.meta[slot, META_LEN])
            n = min(end - pos, C - length)
            seg = slice(pos, pos + n)
            o = append_block(cache, sl, q[None, seg], k[None, seg], v[None, seg], g[None, seg],
                             beta[None, seg], scale=scale, use_qk_l2norm=use_qk_l2norm)
            out[seg] = o[0].to(out.dtype)
            cache.meta[slot, META_LEN] += n
            _flush_full(cache, sl, use_qk_l2norm)
            pos += n
    return out


def materialize_state(cache, slots, *, use_qk_l2norm):
    valid = slots >= 0
    S = torch.zeros(slots.shape[0], cache.num_v_heads, cache.head_k_dim, cache.head_v_dim,
                    dtype=cache.acc_dtype, device=cache.device)
    S[valid] = folded_state(cache, slots[valid].long(), use_qk_l2norm).transpose(-1, -2)
    return S


def gates(A_log, dt_bias, a, b, *, beta_scale):
    f = torch.promote_types(a.dtype, torch.float32)
    g = -torch.exp(A_log.to(f)) * F.softplus(a.to(f) + dt_bias.to(f))
    beta = torch.sigmoid(b.to(f))
    if beta_scale != 1.0:
        beta = beta * beta_scale
    return g, beta
