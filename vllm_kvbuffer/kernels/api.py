"""Public KVBuffer operations: validation, then dispatch to a backend.

Semantics (``docs/kvbuffer-math.md``): q and k are the raw post-conv1d projections,
L2-normalised inside when ``use_qk_l2norm``; ``scale`` defaults to ``head_k_dim ** -0.5``; ``g`` is
the log-space decay (<= 0) and ``beta`` the write strength in (0, ``cache.beta_max``] (1 for a
sigmoid gate, 2 for layers that allow negative eigenvalues); value head h reads key head
``h // (HV // H)``. Outputs equal the token-by-token recurrence over each slot's committed token
stream. A slot's state is flushed as soon as its committed buffer holds ``chunk_size`` tokens; a
slot that never flushed reads no state at all (short-context path).

Backends: ``"torch"`` (exact reference, any device, float64 capable), ``"triton"`` (GPU kernels;
CPU tensors only under ``TRITON_INTERPRET=1``), ``"cpu"`` (native CPU kernels, a C++ extension
built on first use, float64 capable), ``"auto"`` (triton on CUDA, cpu for CPU tensors, torch
otherwise).

All validation happens before anything is written, so a rejected call leaves every slot as it was.
"""

from __future__ import annotations

import math
import os

import torch

from ..envs import BACKENDS
from . import torch_impl
from .cache import META_LEN, META_PENDING, KVBufferCache
from .validation import check, check_slots_tensor, check_tensor, value_checks_enabled

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type == "cpu"


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device`` (the one place it is decided): Triton on
    CUDA, the native kernels on the CPU, the exact torch backend elsewhere."""
    if device.type == "cuda":
        return "triton"
    return "cpu" if device.type == "cpu" else "torch"


def _resolve_backend(backend: str, cache: KVBufferCache) -> str:
    return _resolve_backend_on(backend, cache.device, "the cache")


def _resolve_backend_on(backend: str, device: torch.device, what: str) -> str:
    if backend not in BACKENDS:
        check(False, "backend", f"one of {BACKENDS}", repr(backend))
    if backend == "auto":
        return auto_backend(device)
    if backend == "cpu":
        if device.type != "cpu":
            raise NotImplementedError(f"backend='cpu' needs CPU tensors; {what} is on {device}")
        _cpu_impl().extension()  # a missing compiler surfaces here, not inside a kernel call
    if backend == "triton":
        if not _triton_usable(device):
            raise NotImplementedError(
                f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 for CPU tensors; "
                f"{what} is on {device}")
        from . import triton  # noqa: F401  (import errors surface here, not at package import)
    return backend


_CPU_IMPL = None


def _cpu_impl():
    """The CPU backend's module, imported on first use (it imports no compiler until then)."""
    global _CPU_IMPL
    if _CPU_IMPL is None:
        from . import cpu_impl
        _CPU_IMPL = cpu_impl
    return _CPU_IMPL


def _impl(backend: str):
    if backend == "torch":
        return torch_impl
    if backend == "cpu":
        return _cpu_impl()
    from . import triton
    return triton


def _check_cache(cache) -> None:
    check(isinstance(cache, KVBufferCache), "cache", "a KVBufferCache", type(cache).__name__)


def _resolve_scale(scale, cache: KVBufferCache) -> float:
    if scale is None:
        return cache.head_k_dim ** -0.5
    check(isinstance(scale, (int, float)) and not isinstance(scale, bool)
          and math.isfinite(scale) and scale > 0, "scale", "a positive finite float or None",
          scale)
    return float(scale)


def _bind_qk_l2norm(cache: KVBufferCache, use_qk_l2norm) -> bool:
    check(isinstance(use_qk_l2norm, bool), "use_qk_l2norm", "a bool", use_qk_l2norm)
    if cache.qk_l2norm is None:
        cache.qk_l2norm = use_qk_l2norm
    if cache.qk_l2norm != use_qk_l2norm:
        check(False, "use_qk_l2norm", f"{cache.qk_l2norm} (fixed by the first operation on this "
              f"cache: buffered keys are re-normalised the same way)", use_qk_l2norm)
    return use_qk_l2norm


def _check_token_inputs(cache: KVBufferCache, lead: tuple, q, k, v, g, beta) -> None:
    """``lead`` is the leading shape: ``(N,)``, ``(N, T)`` or ``(T,)``."""
    H, HV, K, V, dev = (cache.num_k_heads, cache.num_v_heads, cache.head_k_dim, cache.head_v_dim,
                        cache.device)
    check_tensor(q, "q", shape=lead + (H, K), dtypes=_FLOAT_DTYPES, device=dev)
    check_tensor(k, "k", shape=lead + (H, K), dtypes=(cache.dtype,), device=dev)
    if q.dtype != k.dtype:
        check(False, "q.dtype", f"k.dtype = {k.dtype}", q.dtype)
    check_tensor(v, "v", shape=lead + (HV, V), dtypes=(k.dtype,), device=dev)
    check_tensor(g, "g", shape=lead + (HV,), dtypes=_FLOAT_DTYPES, device=dev)
    check_tensor(beta, "beta", shape=lead + (HV,), dtypes=_FLOAT_DTYPES, device=dev)
    if value_checks_enabled() and beta.numel():
        lo, hi = float(beta.min()), float(beta.max())   # host sync: value checks only
        check(0.0 <= lo and hi <= cache.beta_max, "beta",
              f"values in [0, beta_max={cache.beta_max}] (the layer's write strength)",
              f"values in [{lo}, {hi}]")


def _check_slot_values(cache: KVBufferCache, slots: torch.Tensor, *, new_tokens: int | None,
                       op: str) -> None:
    """No pending verify tokens, and room for ``new_tokens`` more rows (host sync)."""
    if not value_checks_enabled():
        return
    valid = slots[slots >= 0].long()
    if valid.numel() == 0:
        return
    meta = cache.meta[valid].tolist()
    ids = valid.tolist()
    pending = [s for s, m in zip(ids, meta) if m[META_PENDING] != 0]
    check(not pending, "slots", f"slots without uncommitted verify tokens ({op} needs accept() "
          f"first)", f"pending tokens in slots {pending[:8]}")
    if new_tokens is not None:
        full = [s for s, m in zip(ids, meta) if m[META_LEN] + new_tokens > cache.capacity]
        check(not full, "slots", f"room for {new_tokens} more buffered tokens "
              f"(capacity {cache.capacity})", f"full slots {full[:8]}")


def prefill(cache: KVBufferCache, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, cu_seqlens: torch.Tensor, *,
            scale: float | None = None, use_qk_l2norm: bool = True,
            backend: str = "auto") -> torch.Tensor:
    """Process packed variable-length chunks of N sequences, each continuing its slot.

    Args:
        slots: ``[N]`` int32 slot ids (negative: padding, its tokens are skipped, outputs zero).
        q, k: ``[T, H, K]``; v: ``[T, HV, V]``; g, beta: ``[T, HV]`` (T = total tokens).
        cu_seqlens: ``[N+1]`` int32, sequence i owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``.

    Returns ``o [T, HV, V]`` in v's dtype. Whole chunks are folded into the state; the remainder
    ``(len + L) mod chunk_size`` stays in the buffer. Prefill after decode is legal.
    """
    _check_cache(cache)
    check_tensor(q, "q", shape=(None, cache.num_k_heads, cache.head_k_dim))
    T = q.shape[0]
    check_slots_tensor(slots, cache.num_slots, cache.device)
    N = slots.shape[0]
    _check_token_inputs(cache, (T,), q, k, v, g, beta)
    check_tensor(cu_seqlens, "cu_seqlens", shape=(N + 1,), dtypes=_INDEX_DTYPES,
                 device=cache.device)
    scale = _resolve_scale(scale, cache)
    be = _resolve_backend(backend, cache)
    if value_checks_enabled():
        cu = cu_seqlens.tolist()
        check(cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in zip(cu, cu[1:])),
              "cu_seqlens", f"non-decreasing from 0 to T={T}", cu[:16])
    _check_slot_values(cache, slots, new_tokens=None, op="prefill")
    l2 = _bind_qk_l2norm(cache, use_qk_l2norm)
    return _impl(be).prefill(cache, slots, q, k, v, g, beta, cu_seqlens, scale=scale,
                             use_qk_l2norm=l2)


def decode(cache: KVBufferCache, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, scale: float | None = None,
           use_qk_l2norm: bool = True, backend: str = "auto") -> torch.Tensor:
    """One new token per sequence.

    Args:
        slots: ``[N]`` int32 slot ids (negative: padding, output row zero, nothing written).
        q, k: ``[N, H, K]``; v: ``[N, HV, V]``; g, beta: ``[N, HV]``.

    Returns ``o [N, HV, V]`` in v's dtype. Reads the state once and never writes it, except on the
    step where the slot's buffer reaches ``chunk_size`` (then it is flushed).
    """
    _check_cache(cache)
    check_slots_tensor(slots, cache.num_slots, cache.device)
    N = slots.shape[0]
    _check_token_inputs(cache, (N,), q, k, v, g, beta)
    scale = _resolve_scale(scale, cache)
    be = _resolve_backend(backend, cache)
    _check_slot_values(cache, slots, new_tokens=1, op="decode")
    l2 = _bind_qk_l2norm(cache, use_qk_l2norm)
    return _impl(be).decode(cache, slots, q, k, v, g, beta, scale=scale, use_qk_l2norm=l2)


def verify(cache: KVBufferCache, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, scale: float | None = None,
           use_qk_l2norm: bool = True, backend: str = "auto") -> torch.Tensor:
    """Score T = D + 1 tokens per sequence (last accepted token + D drafts) in parallel.

    Args:
        slots: ``[N]`` int32 slot ids (negative: padding).
        q, k: ``[N, T, H, K]``; v: ``[N, T, HV, V]``; g, beta: ``[N, T, HV]``;
            ``1 <= T <= max_draft_tokens + 1``.

    Returns ``o [N, T, HV, V]``. The T tokens are appended tentatively: follow with
    :func:`accept` before any other operation on these slots. No state is written.
    """
    _check_cache(cache)
    check_slots_tensor(slots, cache.num_slots, cache.device)
    N = slots.shape[0]
    check_tensor(q, "q", shape=(N, None, cache.num_k_heads, cache.head_k_dim))
    T = q.shape[1]
    check(1 <= T <= cache.max_draft_tokens + 1, "q.shape[1] (T)",
          f"1 <= T <= max_draft_tokens + 1 = {cache.max_draft_tokens + 1}", T)
    _check_token_inputs(cache, (N, T), q, k, v, g, beta)
    scale = _resolve_scale(scale, cache)
    be = _resolve_backend(backend, cache)
    _check_slot_values(cache, slots, new_tokens=T, op="verify")
    l2 = _bind_qk_l2norm(cache, use_qk_l2norm)
    return _impl(be).verify(cache, slots, q, k, v, g, beta, scale=scale, use_qk_l2norm=l2)


def accept(cache: KVBufferCache, slots: torch.Tensor, num_accepted: torch.Tensor, *,
           backend: str = "auto") -> None:
    """Commit the first ``num_accepted[i]`` tentative tokens of slot i and drop the rest.

    Args:
        slots: ``[N]`` int32 slot ids that each hold tentative tokens (negative: padding).
        num_accepted: ``[N]`` int32 in ``1..T`` (T of the preceding :func:`verify`).

    A cursor move; slots whose committed buffer reaches ``chunk_size`` are flushed.
    """
    _check_cache(cache)
    check_slots_tensor(slots, cache.num_slots, cache.device)
    N = slots.shape[0]
    check_tensor(num_accepted, "num_accepted", shape=(N,), dtypes=_INDEX_DTYPES,
                 device=cache.device)
    be = _resolve_backend(backend, cache)
    if value_checks_enabled():
        valid = slots >= 0
        ids = slots[valid].tolist()
        acc = num_accepted[valid].tolist()
        pend = cache.meta[slots[valid].long(), META_PENDING].tolist()
        none = [s for s, p in zip(ids, pend) if p == 0]
        check(not none, "slots", "slots with tentative tokens from verify()",
              f"no tentative tokens in slots {none[:8]}")
        bad = [(s, a, p) for s, a, p in zip(ids, acc, pend) if not 1 <= a <= p]
        check(not bad, "num_accepted", "values in 1..T (T tentative tokens of the slot)",
              [f"slot {s}: {a} (T={p})" for s, a, p in bad[:8]])
    l2 = cache.qk_l2norm if cache.qk_l2norm is not None else True
    _impl(be).accept(cache, slots, num_accepted, use_qk_l2norm=l2)


def materialize_state(cache: KVBufferCache, slots: torch.Tensor, *,
                      backend: str = "auto") -> torch.Tensor:
    """The exact recurrent state after each slot's committed tokens (tentative ones excluded).

    Args:
        slots: ``[N]`` int32 slot ids (negative: padding, a zero state is returned).

    Returns ``[N, HV, K, V]`` (fla layout) in float32, float64 for a float64 cache. Read-only.
    The torch backend serves every device except the CPU's ``"cpu"`` backend (``"auto"`` on CPU
    tensors), which has its own kernel.
    """
    _check_cache(cache)
    check_slots_tensor(slots, cache.num_slots, cache.device)
    be = _resolve_backend(backend, cache)
    l2 = cache.qk_l2norm if cache.qk_l2norm is not None else True
    impl = _impl(be) if be == "cpu" else torch_impl
    return impl.materialize_state(cache, slots, use_qk_l2norm=l2)


def gdn_gates(A_log: torch.Tensor, dt_bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
              beta_scale: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's gates from its gate projections, as vLLM's GDN layers compute them:
    ``g = -exp(A_log) * softplus(a + dt_bias)`` (the log-space decay) and
    ``beta = beta_scale * sigmoid(b)`` (``beta_scale`` 2 for layers that allow negative
    eigenvalues).

    Args:
        a, b: ``[N, HV]``; A_log, dt_bias: ``[HV]``.

    Returns ``(g, beta)``, each ``[N, HV]`` in float32 (float64 for float64 ``a``). The ``"cpu"``
    backend computes both in one native call when a and b share a dtype; every other backend
    (and the CPU otherwise) uses torch ops, which CUDA graphs capture.
    """
    check_tensor(a, "a", shape=(None, None), dtypes=_FLOAT_DTYPES)
    N, HV = a.shape
    check_tensor(b, "b", shape=(N, HV), dtypes=_FLOAT_DTYPES, device=a.device)
    check_tensor(A_log, "A_log", shape=(HV,), dtypes=_FLOAT_DTYPES, device=a.device)
    check_tensor(dt_bias, "dt_bias", shape=(HV,), dtypes=_FLOAT_DTYPES, device=a.device)
    check(isinstance(beta_scale, (int, float)) and not isinstance(beta_scale, bool)
          and math.isfinite(beta_scale) and beta_scale > 0, "beta_scale",
          "a positive finite float", beta_scale)
    be = _resolve_backend_on(backend, a.device, "a")
    if be == "cpu" and b.dtype == a.dtype:
        return _cpu_impl().gates(A_log, dt_bias, a, b, beta_scale=float(beta_scale))
    return torch_impl.gates(A_log, dt_bias, a, b, beta_scale=float(beta_scale))
