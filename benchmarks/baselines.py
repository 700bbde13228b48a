"""Stock-style baselines for the benchmarks (our own Triton kernels, written for this project).

- :func:`recurrent_pool` — the recurrent Gated DeltaNet step over T tokens per sequence, reading
  each sequence's state from a pool slot and writing states back into pool slots, the way vLLM's
  GDN decode does it (vLLM layout ``[S, HV, V, K]``). With ``write_all=True`` it writes one full
  state per token into its own slot: the stock vLLM / SGLang way of verifying D drafts (1 + D state
  slots per request, a state written after every draft token). flash-linear-attention 0.6's
  ``fused_recurrent_gated_delta_rule`` has no per-token state output and no slot indices, hence
  this kernel; plain decode (T = 1, in place) is what fla's kernel does, and ``bench_decode.py``
  times both side by side.
- :func:`conv_update` / :func:`gdn_gating` — one decode step of the depthwise causal conv1d with a
  per-slot window (``conv_state [S, dim, W-1]``, updated in place, SiLU) and the Qwen3-Next gates
  ``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``. Both layer-stack variants use
  them unchanged; only the core differs.

Each has a float64 torch reference (``*_ref``). Inputs are trusted (benchmark use only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvbuffer.kernels.recurrent import recurrent_gated_delta_rule


@triton.jit
def _recurrent_pool_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, o_ptr, state_ptr, src_ptr, dst_ptr,
    sq_n, sq_t, sq_h, sk_n, sk_t, sk_h, sv_n, sv_t, sv_h, sg_n, sg_t, sb_n, sb_t,
    so_n, so_t, so_h, ss_s, ss_h, ss_v, ss_k, sd_n, scale,
    T: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GROUP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, WRITE_ALL: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    hk = h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    ms = mv[:, None] & mk[None, :]
    tile = h * ss_h + offs_v[:, None] * ss_v + offs_k[None, :] * ss_k
    src = tl.load(src_ptr + n).to(tl.int64)
    S = tl.load(state_ptr + src * ss_s + tile, mask=ms, other=0.0).to(tl.float32)
    for t in tl.static_range(T):
        kt = tl.load(k_ptr + n * sk_n + t * sk_t + hk * sk_h + offs_k, mask=mk, other=0.0)
        kt = kt.to(tl.float32)
        qt = tl.load(q_ptr + n * sq_n + t * sq_t + hk * sq_h + offs_k, mask=mk, other=0.0)
        qt = qt.to(tl.float32)
        if USE_L2:
            kt = kt * tl.rsqrt(tl.sum(kt * kt) + 1e-6)
            qt = qt * tl.rsqrt(tl.sum(qt * qt) + 1e-6)
        qt = qt * scale
        vt = tl.load(v_ptr + n * sv_n + t * sv_t + h * sv_h + offs_v, mask=mv, other=0.0)
        gt = tl.load(g_ptr + n * sg_n + t * sg_t + h).to(tl.float32)
        bt = tl.load(b_ptr + n * sb_n + t * sb_t + h).to(tl.float32)
        S = S * tl.exp(gt)
        u = bt * (vt.to(tl.float32) - tl.sum(S * kt[None, :], axis=1))
        S = S + u[:, None] * kt[None, :]
        o = tl.sum(S * qt[None, :], axis=1)
        tl.store(o_ptr + n * so_n + t * so_t + h * so_h + offs_v, o.to(o_ptr.dtype.element_ty),
                 mask=mv)
        if WRITE_ALL or t == T - 1:
            dst = tl.load(dst_ptr + n * sd_n + t).to(tl.int64)
            tl.store(state_ptr + dst * ss_s + tile, S.to(state_ptr.dtype.element_ty), mask=ms)


def recurrent_pool(state: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                   q, k, v, g, beta, *, scale: float | None = None, use_qk_l2norm: bool = True,
                   write_all: bool = False, BV: int = 16, num_warps: int = 4) -> torch.Tensor:
    """Recurrent GDN over T tokens per sequence with pool-slot state I/O.

    Args:
        state: ``[S, HV, V, K]`` pool (vLLM layout), read at ``src_slots`` and written in place.
        src_slots: ``[N]`` int32, the slot holding each sequence's state before the T tokens.
        dst_slots: ``[N, T]`` int32; with ``write_all`` token t's state goes to ``dst[n, t]``
            (one state per draft token), otherwise only the final state, to ``dst[n, T-1]``.
        q, k: ``[N, T, H, K]``; v: ``[N, T, HV, V]``; g, beta: ``[N, T, HV]`` (fp32 gates).

    Returns ``o [N, T, HV, V]`` in v's dtype.
    """
    N, T, H, K = k.shape
    S, HV, V, _ = state.shape
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    BK = triton.next_power_of_2(K)
    BV = min(BV, triton.next_power_of_2(V))
    _recurrent_pool_kernel[(N, HV, triton.cdiv(V, BV))](
        q, k, v, g, beta, o, state, src_slots, dst_slots,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1),
        beta.stride(0), beta.stride(1), o.stride(0), o.stride(1), o.stride(2),
        *state.stride(), dst_slots.stride(0), K ** -0.5 if scale is None else scale,
        T=T, K=K, V=V, GROUP=HV // H, BK=BK, BV=BV, USE_L2=use_qk_l2norm, WRITE_ALL=write_all,
        num_warps=num_warps)
    return o


def recurrent_pool_ref(state, src_slots, q, k, v, g, beta):
    """float64 reference: ``(o [N,T,HV,V], states [N,T,HV,V,K])`` (the state after each token,
    vLLM layout), from the token-by-token recurrence."""
    N, T = k.shape[:2]
    h0 = state[src_slots.long()].double().transpose(-1, -2)              # [N,HV,K,V]
    os, sts = [], []
    for n in range(N):
        S = h0[n:n + 1]
        per_t = []
        outs = []
        for t in range(T):
            o, S = recurrent_gated_delta_rule(q[n, t:t + 1].double(), k[n, t:t + 1].double(),
                                              v[n, t:t + 1].double(), g[n, t:t + 1].double(),
                                              beta[n, t:t + 1].double(), initial_state=S)
            outs.append(o[0])
            per_t.append(S[0].transpose(-1, -2))
        os.append(torch.stack(outs))
        sts.append(torch.stack(per_t))
    return torch.stack(os), torch.stack(sts)


# ------------------------------------------------------------------------------------------------
# conv1d update (one token, per-slot window) and gates
# ------------------------------------------------------------------------------------------------
@triton.jit
def _conv_update_kernel(x_ptr, w_ptr, bias_ptr, cs_ptr, slots_ptr, y_ptr,
                        sx_n, sc_s, sc_d, sy_n, DIM, W: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    m = offs < DIM
    slot = tl.load(slots_ptr + n).to(tl.int64)
    base = cs_ptr + slot * sc_s + offs * sc_d
    xn = tl.load(x_ptr + n * sx_n + offs, mask=m, other=0.0).to(tl.float32)
    acc = tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
    acc += xn * tl.load(w_ptr + offs * W + (W - 1), mask=m, other=0.0).to(tl.float32)
    prev = xn
    # Walk the window newest-first: column i moves to i-1 and the new input enters at W-2.
    for j in tl.static_range(W - 1):
        i = W - 2 - j
        xi = tl.load(base + i, mask=m, other=0.0)
        acc += xi.to(tl.float32) * tl.load(w_ptr + offs * W + i, mask=m, other=0.0).to(tl.float32)
        tl.store(base + i, prev.to(cs_ptr.dtype.element_ty), mask=m)
        prev = xi.to(tl.float32)
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + n * sy_n + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def conv_update(x, weight, bias, conv_state, slots, *, BD: int = 256):
    """One token per sequence: ``y = silu(conv1d(window ++ x))``; the window shifts in place.

    Args: x ``[N, dim]``; weight ``[dim, W]``; bias ``[dim]``; conv_state ``[S, dim, W-1]``
    (oldest column first); slots ``[N]`` int32. Returns ``y [N, dim]`` in x's dtype.
    """
    N, dim = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    _conv_update_kernel[(N, triton.cdiv(dim, BD))](
        x, weight, bias, conv_state, slots, y, x.stride(0), conv_state.stride(0),
        conv_state.stride(1), y.stride(0), dim, W=W, BD=BD, num_warps=4)
    return y


def conv_update_ref(x, weight, bias, conv_state, slots):
    """float64 reference; returns ``(y, new_windows [N, dim, W-1])`` without writing."""
    win = conv_state[slots.long()].double()                               # [N, dim, W-1]
    full = torch.cat([win, x.double()[:, :, None]], dim=2)                # [N, dim, W]
    y = (full * weight.double()[None]).sum(-1) + bias.double()
    return torch.nn.functional.silu(y), full[:, :, 1:]


@triton.jit
def _gating_kernel(a_ptr, b_ptr, alog_ptr, dt_ptr, g_ptr, beta_ptr, sa_n, sb_n, HV,
                   BH: tl.constexpr):
    n = tl.program_id(0)
    offs = tl.arange(0, BH)
    m = offs < HV
    x = (tl.load(a_ptr + n * sa_n + offs, mask=m, other=0.0).to(tl.float32)
         + tl.load(dt_ptr + offs, mask=m, other=0.0).to(tl.float32))
    sp = tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)
    g = -tl.exp(tl.load(alog_ptr + offs, mask=m, other=0.0).to(tl.float32)) * sp
    beta = tl.sigmoid(tl.load(b_ptr + n * sb_n + offs, mask=m, other=0.0).to(tl.float32))
    tl.store(g_ptr + n * HV + offs, g, mask=m)
    tl.store(beta_ptr + n * HV + offs, beta, mask=m)


def gdn_gating(a, b, A_log, dt_bias):
    """Qwen3-Next gates in fp32: ``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``;
    a, b ``[N, HV]``. Returns ``(g, beta)`` ``[N, HV]`` fp32."""
    N, HV = a.shape
    g = torch.empty(N, HV, dtype=torch.float32, device=a.device)
    beta = torch.empty_like(g)
    _gating_kernel[(N,)](a, b, A_log, dt_bias, g, beta, a.stride(0), b.stride(0), HV,
                         BH=triton.next_power_of_2(HV), num_warps=1)
    return g, beta


def gdn_gating_ref(a, b, A_log, dt_bias):
    g = -torch.exp(A_log.double()) * torch.nn.functional.softplus(a.double() + dt_bias.double())
    return g, torch.sigmoid(b.double())
