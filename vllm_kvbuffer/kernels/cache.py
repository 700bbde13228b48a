"""The KVBuffer slot pool: per-request linear-attention state plus a buffer of recent tokens.

Shape letters (used across the package): N sequences in a batch, T tokens, H key heads, HV value
heads, K / V key / value head dims, S pool slots, B buffer capacity, L buffered (committed) tokens,
C flush interval (``chunk_size``), D draft tokens.

A slot holds

- ``state   [S, HV, V, K]``  the recurrent state ``S0`` at the slot's last flush, stored transposed
  (value-major, key-minor) exactly like vLLM 0.32 lays out the GDN SSM state, so a vLLM cache page
  can be used in place. Only meaningful once ``has_state`` is set: a slot that never flushed has
  an implicit zero state and its state memory is never read (it may hold anything).
- ``buf_k   [S, B, H, K]``   raw (un-normalised) keys of the buffered tokens, in the model dtype;
  kernels re-normalise them in fp32 exactly like the stock path does for fresh keys.
- ``buf_u   [S, B, HV, V]``  the corrected values ``u_j = beta_j (v_j - S~_{j-1}^T k_hat_j)``, fp32
  (fp64 for a float64 cache): they never change until the next flush.
- ``buf_g   [S, B, HV]``     cumulative log-decay ``G_j`` since the last flush, same dtype as buf_u.
- ``meta    [S, 8]`` int32   ``[LEN, PENDING, HAS_STATE, reserved...]``: committed buffered
  tokens, tentative (verified, not yet accepted) tokens stored after them, and whether ``state``
  is valid. The kernels never touch columns 3-7 (the vLLM layer keeps its conv-window offset and
  the position of the pending verify there; eight columns keep the next state of a vLLM page at
  a 16-byte offset); :func:`reset_slots` zeroes all eight.

``B = chunk_size + max_draft_tokens``: a slot flushes as soon as its committed length reaches
``chunk_size``, so at most ``chunk_size - 1`` committed tokens wait when ``D + 1`` tentative ones
are appended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .validation import check, check_int, check_slots_tensor

META_LEN = 0
META_PENDING = 1
META_HAS_STATE = 2
META_COLS = 8

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulator_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """dtype of the cached ``u`` and ``G`` and of all accumulation: fp64 for a float64 cache."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


@dataclass
class KVBufferCache:
    """A pool of KVBuffer slots (see the module docstring for the layout).

    The tensors may be strided views (for example into a vLLM cache page padded beyond their
    size): every kernel takes strides from the tensors and never copies or reshapes the pool.
    """

    state: torch.Tensor
    buf_k: torch.Tensor
    buf_u: torch.Tensor
    buf_g: torch.Tensor
    meta: torch.Tensor
    chunk_size: int
    max_draft_tokens: int = 0
    # Whether q/k are L2-normalised inside the kernels; fixed by the first operation on the pool
    # because buffered raw keys are re-normalised later and must be treated the same way.
    qk_l2norm: bool | None = field(default=None)
    # Upper bound of the write strength beta the layer produces: 1 for sigmoid(b) (Qwen3-Next,
    # Qwen3.5), 2 where the layer allows negative eigenvalues (OLMo Hybrid: beta = 2 sigmoid(b)).
    # The value checks of the operations hold beta to (0, beta_max]; the math holds for any beta.
    beta_max: float = 1.0

    def __post_init__(self) -> None:
        check(self.state.dim() == 4, "state", "4-D [S, HV, V, K]", tuple(self.state.shape))
        S, HV, V, K = self.state.shape
        check(self.buf_k.dim() == 4, "buf_k", "4-D [S, B, H, K]", tuple(self.buf_k.shape))
        _, B, H, _ = self.buf_k.shape
        check_int("chunk_size", self.chunk_size, minimum=1)
        check(self.beta_max in (1.0, 2.0), "beta_max", "1.0 (sigmoid gate) or 2.0 (negative "
              "eigenvalues allowed)", self.beta_max)
        check_int("max_draft_tokens", self.max_draft_tokens, minimum=0)
        check(B == self.chunk_size + self.max_draft_tokens, "buf_k.shape[1]",
              f"chunk_size + max_draft_tokens = {self.chunk_size + self.max_draft_tokens}", B)
        check(tuple(self.buf_k.shape) == (S, B, H, K), "buf_k.shape", (S, B, H, K),
              tuple(self.buf_k.shape))
        check(tuple(self.buf_u.shape) == (S, B, HV, V), "buf_u.shape", (S, B, HV, V),
              tuple(self.buf_u.shape))
        check(tuple(self.buf_g.shape) == (S, B, HV), "buf_g.shape", (S, B, HV),
              tuple(self.buf_g.shape))
        check(tuple(self.meta.shape) == (S, META_COLS), "meta.shape", (S, META_COLS),
              tuple(self.meta.shape))
        check(HV % H == 0, "num_v_heads", f"a multiple of num_k_heads={H}", HV)
        check(self.state.dtype in SUPPORTED_STATE_DTYPES, "state.dtype",
              f"one of {SUPPORTED_STATE_DTYPES}", self.state.dtype)
        check(self.buf_k.dtype in SUPPORTED_DTYPES, "buf_k.dtype", f"one of {SUPPORTED_DTYPES}",
              self.buf_k.dtype)
        acc = accumulator_dtype(self.state.dtype)
        check(self.buf_u.dtype == acc, "buf_u.dtype", acc, self.buf_u.dtype)
        check(self.buf_g.dtype == acc, "buf_g.dtype", acc, self.buf_g.dtype)
        check(self.meta.dtype == torch.int32, "meta.dtype", torch.int32, self.meta.dtype)
        for name in ("buf_k", "buf_u", "buf_g", "meta"):
            t = getattr(self, name)
            check(t.device == self.state.device, f"{name}.device", self.state.device, t.device)

    # Sizes, named as in the rest of the package.
    @property
    def num_slots(self) -> int:
        return self.state.shape[0]

    @property
    def num_k_heads(self) -> int:
        return self.buf_k.shape[2]

    @property
    def num_v_heads(self) -> int:
        return self.state.shape[1]

    @property
    def head_k_dim(self) -> int:
        return self.state.shape[3]

    @property
    def head_v_dim(self) -> int:
        return self.state.shape[2]

    @property
    def capacity(self) -> int:
        return self.buf_k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.buf_k.dtype

    @property
    def state_dtype(self) -> torch.dtype:
        return self.state.dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        return self.buf_u.dtype

    @property
    def device(self) -> torch.device:
        return self.state.device


def allocate_cache(num_slots: int, *, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                   head_v_dim: int, chunk_size: int = 16, max_draft_tokens: int = 0,
                   dtype: torch.dtype = torch.float32, state_dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", beta_max: float = 1.0) -> KVBufferCache:
    """Allocate a pool of ``num_slots`` empty KVBuffer slots.

    Args:
        num_slots: S, the number of slots in the pool.
        num_k_heads / num_v_heads: H and HV (HV a multiple of H; value head h reads key head
            ``h // (HV // H)``).
        head_k_dim / head_v_dim: K and V.
        chunk_size: C, the flush interval in committed tokens.
        max_draft_tokens: D, the most draft tokens one ``verify`` call may carry (T <= D + 1).
        dtype: the model dtype; buffered raw keys are stored in it, so ``k`` passed to the
            operations must have this dtype.
        state_dtype: dtype of the recurrent state (fp32 recommended; float64 for exactness tests).
        device: where the pool lives.
        beta_max: the layer's bound on beta, 1 (sigmoid gate) or 2 (negative eigenvalues
            allowed, beta = 2 sigmoid(b)); the value checks hold beta to it.

    Every slot starts empty (as after :func:`reset_slots`). The state and buffer memory is filled
    with NaN so that any read of memory the algorithm must not read shows up in the outputs.
    """
    for name, val, lo in (("num_slots", num_slots, 1), ("num_k_heads", num_k_heads, 1),
                          ("num_v_heads", num_v_heads, 1), ("head_k_dim", head_k_dim, 1),
                          ("head_v_dim", head_v_dim, 1), ("chunk_size", chunk_size, 1),
                          ("max_draft_tokens", max_draft_tokens, 0)):
        check_int(name, val, minimum=lo)
    check(num_v_heads % num_k_heads == 0, "num_v_heads",
          f"a multiple of num_k_heads={num_k_heads}", num_v_heads)
    check(dtype in SUPPORTED_DTYPES, "dtype", f"one of {SUPPORTED_DTYPES}", dtype)
    check(state_dtype in SUPPORTED_STATE_DTYPES, "state_dtype",
          f"one of {SUPPORTED_STATE_DTYPES}", state_dtype)
    device = torch.device(device)
    B = chunk_size + max_draft_tokens
    acc = accumulator_dtype(state_dtype)
    nan = float("nan")
    return KVBufferCache(
        state=torch.full((num_slots, num_v_heads, head_v_dim, head_k_dim), nan,
                         dtype=state_dtype, device=device),
        buf_k=torch.full((num_slots, B, num_k_heads, head_k_dim), nan, dtype=dtype,
                         device=device),
        buf_u=torch.full((num_slots, B, num_v_heads, head_v_dim), nan, dtype=acc, device=device),
        buf_g=torch.full((num_slots, B, num_v_heads), nan, dtype=acc, device=device),
        meta=torch.zeros((num_slots, META_COLS), dtype=torch.int32, device=device),
        chunk_size=chunk_size,
        max_draft_tokens=max_draft_tokens,
        beta_max=beta_max,
    )


def reset_slots(cache: KVBufferCache, slots: torch.Tensor) -> None:
    """Empty the given slots: no committed or tentative tokens and no state.

    Args:
        slots: ``[N]`` int32/int64 slot ids; negative ids are padding and skipped.

    Only the slots' ``meta`` rows are written: a slot without ``HAS_STATE`` never reads its state
    memory, so nothing else needs clearing (this is what makes reuse of a vLLM page safe).
    """
    check_slots_tensor(slots, cache.num_slots, cache.device, name="slots", allow_duplicates=True)
    idx = slots[slots >= 0].long()
    if idx.numel():
        cache.meta[idx] = 0
