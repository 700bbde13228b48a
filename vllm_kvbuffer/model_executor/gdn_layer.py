"""KVBuffer Gated DeltaNet layer for vLLM 0.32's Qwen3-Next.

A stock ``QwenGatedDeltaNetAttention`` is *promoted* to :class:`KVBufferGatedDeltaNet` after the
model is built (its parameters, weight loaders and forward-context entry stay as they are). The
promoted layer

- appends the KVBuffer states to its cache page (``get_state_shape`` / ``get_state_dtype``, the
  same tuple as the model classmethods: :mod:`.cache_spec`), so vLLM's allocator places the
  buffers beside the recurrent state;
- runs vLLM's own device-agnostic projection path on every platform (``forward_cuda``: input
  projections, the ``vllm::qwen_gdn_attention_core`` custom op, output projection), and replaces
  the core that op dispatches to (``_forward_core``): causal conv with the layer's conv state,
  gates, and the KVBuffer ``prefill`` / ``decode`` operations on the slot pool.

This stays off the stock CPU core (``cpu_gdn_attention_core``), which requires bf16: the KVBuffer
path runs in float32 as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from .. import kernels
from ..config import KVBufferSettings
from .cache_spec import cache_from_layer_states, kvbuffer_state_dtypes, kvbuffer_state_shapes


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_state: torch.Tensor, slots: list[int], cu: list[int],
                         has_initial_state: list[bool], activation: str | None) -> torch.Tensor:
    """Depthwise causal conv over packed sequences, continuing each slot's conv state.

    Args:
        x: ``[T, D]`` packed inputs. weight: ``[D, W]``. bias: ``[D]`` or None.
        conv_state: ``[S, W-1, D]`` view of the layer's conv cache (the last W-1 inputs of each
            slot), updated in place for every sequence with a slot >= 0.
        slots / cu / has_initial_state: per sequence; a sequence without initial state starts
            from zeros (its slot's conv memory may hold anything).

    Returns ``[T, D]`` in x's dtype (activation applied).
    """
    W = weight.shape[-1]
    y = torch.zeros_like(x)
    w = weight.to(torch.float32)[:, None, :]
    b = bias.to(torch.float32) if bias is not None else None
    for i, slot in enumerate(slots):
        start, end = cu[i], cu[i + 1]
        if slot < 0 or start == end:
            continue
        xi = x[start:end].to(torch.float32)
        prev = (conv_state[slot].to(torch.float32) if has_initial_state[i]
                else xi.new_zeros(W - 1, xi.shape[1]))
        full = torch.cat([prev, xi], dim=0)                      # [W-1+n, D]
        yi = F.conv1d(full.t()[None], w, b, groups=xi.shape[1])[0].t()   # [n, D]
        if activation in ("silu", "swish"):
            yi = F.silu(yi)
        y[start:end] = yi.to(x.dtype)
        conv_state[slot] = full[-(W - 1):].to(conv_state.dtype)
    return y


class KVBufferGatedDeltaNet(QwenGatedDeltaNetAttention):
    """A promoted stock layer; see the module docstring. Never constructed directly."""

    _kvb: KVBufferSettings

    def __init__(self, *args, **kwargs):  # pragma: no cover - promotion only
        raise TypeError("KVBufferGatedDeltaNet is created by promote(), not constructed")

    @classmethod
    def promote(cls, layer: QwenGatedDeltaNetAttention, settings: KVBufferSettings) -> None:
        if type(layer) is not QwenGatedDeltaNetAttention:
            raise TypeError(f"layer: expected a QwenGatedDeltaNetAttention, got "
                            f"{type(layer).__name__}")
        layer.__class__ = cls
        layer._kvb = settings
        # The stock __init__ bound the platform forward (on the CPU: the bf16-only C++ core).
        # forward_cuda is vLLM's device-agnostic path through the custom op -> _forward_core.
        layer._forward_method = layer.forward_cuda
        layer.enable_fused_gdn_spec_decode = False

    # -- cache spec ---------------------------------------------------------------------------
    def get_state_shape(self):
        return tuple(super().get_state_shape()) + kvbuffer_state_shapes(
            tp_size=self.tp_size, num_k_heads=self.num_k_heads, num_v_heads=self.num_v_heads,
            head_k_dim=self.head_k_dim, head_v_dim=self.head_v_dim,
            chunk_size=self._kvb.chunk_size, max_draft_tokens=self.num_spec)

    def get_state_dtype(self):
        return tuple(super().get_state_dtype()) + kvbuffer_state_dtypes(self.model_config.dtype)

    # -- forward ------------------------------------------------------------------------------
    def _backend(self) -> str:
        if self._kvb.backend != "auto":
            return self._kvb.backend
        return "triton" if self.conv1d.weight.device.type == "cuda" else "torch"

    def _conv_weight(self) -> torch.Tensor:
        # On some CPUs vLLM repacks a bf16 conv weight in place at load and keeps the plain one.
        w = getattr(self.conv1d, "_cpu_unpacked_conv_weight", None)
        if w is None:
            w = self.conv1d.weight
        return w.reshape(w.shape[0], w.shape[-1])

    def _forward_core(self, mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                      core_attn_out: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if metadata is None:          # profiling run: nothing is bound yet
            return
        m = metadata[self.prefix]
        if m.num_actual_tokens == 0:
            return
        if m.num_spec_decodes or m.spec_sequence_masks is not None:
            raise NotImplementedError("KVBuffer speculative decoding is not wired in yet; the "
                                      "engine should have refused this configuration")
        n_dec, n_pre = m.num_decodes, m.num_prefills
        n_dec_tok, n_tok = m.num_decode_tokens, m.num_decode_tokens + m.num_prefill_tokens
        rows = n_dec + n_pre
        # vLLM pads state indices with its null block 0 (never a request's block).
        idx = m.non_spec_state_indices_tensor[:rows]
        slots = torch.where(idx > 0, idx, -1).to(torch.int32)
        cu = m.non_spec_query_start_loc[: rows + 1].tolist()
        has_init = ([True] * n_dec + m.has_initial_state[n_dec:rows].tolist()
                    if n_pre else [True] * n_dec)

        cache = cache_from_layer_states(self.kv_cache, chunk_size=self._kvb.chunk_size,
                                        max_draft_tokens=self.num_spec)
        # New sequences (and recomputed, preempted ones) start empty: their pages are reused.
        fresh = [s for s, h in zip(slots.tolist(), has_init) if s >= 0 and not h]
        if fresh:
            kernels.reset_slots(cache, torch.tensor(fresh, dtype=torch.int32,
                                                    device=slots.device))

        conv_cache = self.kv_cache[0]
        conv_state = conv_cache.transpose(-1, -2) if is_conv_state_dim_first() else conv_cache
        x = causal_conv1d_varlen(mixed_qkv[:n_tok], self._conv_weight(), self.conv1d.bias,
                                 conv_state, slots.tolist(), cu, has_init, self.activation)
        Hr, HVr = self.num_k_heads // self.tp_size, self.num_v_heads // self.tp_size
        kd, vd = Hr * self.head_k_dim, HVr * self.head_v_dim
        q = x[:, :kd].reshape(n_tok, Hr, self.head_k_dim)
        k = x[:, kd:2 * kd].reshape(n_tok, Hr, self.head_k_dim)
        v = x[:, 2 * kd:2 * kd + vd].reshape(n_tok, HVr, self.head_v_dim)
        # Gates as the stock path computes them, in fp32.
        g = -torch.exp(self.A_log.float()) * F.softplus(a[:n_tok].float() + self.dt_bias.float())
        beta = torch.sigmoid(b[:n_tok].float())

        backend = self._backend()
        out = torch.empty(n_tok, HVr, self.head_v_dim, dtype=v.dtype, device=v.device)
        if n_dec:
            out[:n_dec_tok] = kernels.decode(cache, slots[:n_dec], q[:n_dec_tok], k[:n_dec_tok],
                                             v[:n_dec_tok], g[:n_dec_tok], beta[:n_dec_tok],
                                             backend=backend)
        if n_pre:
            cu_pre = m.non_spec_query_start_loc[n_dec: rows + 1] - n_dec_tok
            out[n_dec_tok:] = kernels.prefill(cache, slots[n_dec:], q[n_dec_tok:],
                                              k[n_dec_tok:], v[n_dec_tok:], g[n_dec_tok:],
                                              beta[n_dec_tok:], cu_pre.to(torch.int32),
                                              backend=backend)
        core_attn_out[:n_tok] = out.to(core_attn_out.dtype)
