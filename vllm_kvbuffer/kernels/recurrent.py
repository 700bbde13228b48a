"""Token-by-token Gated DeltaNet recurrence: the ground truth every KVBuffer path is tested against.

Decay first, as fla's ``naive_recurrent_gated_delta_rule`` / ``fused_recurrent`` and vLLM's GDN::

    S~  = exp(g_t) S_{t-1}
    u_t = beta_t (v_t - S~^T k_hat_t)
    S_t = S~ + k_hat_t u_t^T
    o_t = S_t^T q_hat_t
"""

from __future__ import annotations

import torch

from .validation import check, check_tensor

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + 1e-6)``, the l2norm fla and vLLM apply to q and k (in x's dtype)."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + L2NORM_EPS)


def expand_k_heads(x: torch.Tensor, num_v_heads: int, head_dim: int = -2) -> torch.Tensor:
    """Map key heads to value heads: value head h reads key head ``h // (HV // H)``."""
    H = x.shape[head_dim]
    if H == num_v_heads:
        return x
    return x.repeat_interleave(num_v_heads // H, dim=head_dim)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               g: torch.Tensor, beta: torch.Tensor, *,
                               cu_seqlens: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None,
                               scale: float | None = None, use_qk_l2norm: bool = True,
                               compute_dtype: torch.dtype | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence token by token over packed variable-length sequences.

    Args:
        q, k: ``[T, H, K]`` raw (post-conv) queries and keys.
        v: ``[T, HV, V]``.
        g: ``[T, HV]`` log-space decay (<= 0). beta: ``[T, HV]`` in (0, 1).
        cu_seqlens: ``[N+1]`` sequence boundaries in the packed token axis (default: one sequence).
        initial_state: ``[N, HV, K, V]`` (fla layout) or None for zeros; not modified.
        scale: query scale, default ``K ** -0.5``.
        use_qk_l2norm: L2-normalise q and k (per head) before use.
        compute_dtype: arithmetic dtype; default float64 if any input is float64, else float32.

    Returns:
        ``(o [T, HV, V], final_state [N, HV, K, V])`` in ``compute_dtype``.
    """
    check_tensor(q, "q", shape=(None, None, None))
    T, H, K = q.shape
    check_tensor(k, "k", shape=(T, H, K))
    check_tensor(v, "v", shape=(T, None, None))
    HV, V = v.shape[1:]
    check_tensor(g, "g", shape=(T, HV))
    check_tensor(beta, "beta", shape=(T, HV))
    check(HV % H == 0, "v.shape[1] (HV)", f"a multiple of H={H}", HV)
    if cu_seqlens is None:
        cu = [0, T]
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        check(cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in zip(cu, cu[1:])),
              "cu_seqlens", f"non-decreasing from 0 to T={T}", cu)
    N = len(cu) - 1
    if compute_dtype is None:
        inputs = (q, k, v, g, beta) + ((initial_state,) if initial_state is not None else ())
        compute_dtype = (torch.float64 if any(t.dtype == torch.float64 for t in inputs)
                         else torch.float32)
    cd = compute_dtype
    scale = K ** -0.5 if scale is None else scale
    qf, kf = q.to(cd), k.to(cd)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = expand_k_heads(qf * scale, HV)
    kf = expand_k_heads(kf, HV)
    vf, gf, bf = v.to(cd), g.to(cd), beta.to(cd)
    o = torch.empty(T, HV, V, dtype=cd, device=q.device)
    if initial_state is None:
        states = torch.zeros(N, HV, K, V, dtype=cd, device=q.device)
    else:
        check_tensor(initial_state, "initial_state", shape=(N, HV, K, V))
        states = initial_state.to(cd).clone()
    for n in range(N):
        S = states[n]
        for t in range(cu[n], cu[n + 1]):
            S = S * torch.exp(gf[t])[:, None, None]
            u = bf[t][:, None] * (vf[t] - torch.einsum("hkv,hk->hv", S, kf[t]))
            S = S + kf[t][:, :, None] * u[:, None, :]
            o[t] = torch.einsum("hkv,hk->hv", S, qf[t])
        states[n] = S
    return o, states
