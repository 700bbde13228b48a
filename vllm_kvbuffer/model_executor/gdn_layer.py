"""KVBuffer Gated DeltaNet layers for vLLM 0.32's GDN layer classes.

A stock GDN layer is *promoted* after the model is built (its parameters, weight loaders and
forward-context entry stay as they are): ``QwenGatedDeltaNetAttention`` (Qwen3-Next, Qwen3.5 dense,
MoE and VL) to :class:`KVBufferGatedDeltaNet`; OLMo Hybrid's ``OlmoHybridGatedDeltaNetAttention``
to the class :mod:`.olmo_hybrid` builds from the same :class:`KVBufferGDNLayerMixin`. The promoted
layer

- appends the KVBuffer states to its cache page (``get_state_shape`` / ``get_state_dtype``, the
  same tuple as the model classmethods: :mod:`.cache_spec`), so vLLM's allocator places the
  buffers beside the recurrent state;
- runs vLLM's own device-agnostic projection path on every platform (Qwen: ``forward_cuda``, i.e.
  input projections, the ``vllm::qwen_gdn_attention_core`` custom op, output projection; OLMo
  Hybrid: its ``forward``, one custom op around the whole layer), and replaces the core that path
  dispatches to (``_forward_core``), which unpacks vLLM's GDN metadata and hands
  the rows to :mod:`.gdn_core` (causal conv with the layer's conv state, gates, and the KVBuffer
  operations on the slot pool): decode-only and uniform speculative batches, the ones vLLM
  captures in FULL CUDA graphs, take its graph-safe paths.

This stays off the stock CPU core (``cpu_gdn_attention_core``), which requires bf16: the KVBuffer
path runs in float32 as well.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from .. import kernels
from ..config import KVBufferSettings
from . import gdn_core
from .cache_spec import cache_from_layer_states, kvbuffer_state_dtypes, kvbuffer_state_shapes
from .gdn_metadata import KVBufferGDNAttentionBackend


class KVBufferGDNLayerMixin:
    """The KVBuffer behaviour of a promoted GDN layer, for any vLLM GDN layer class whose core is
    ``_forward_core(mixed_qkv, b, a, core_attn_out)`` over a ``[q | k | v]`` conv input and
    ``(conv, ssm)`` states (both of vLLM 0.32's). Put it first in the bases; the stock class is
    :attr:`stock_class`."""

    #: The vLLM layer class this KVBuffer class promotes (set by each subclass).
    stock_class: type
    _kvb: KVBufferSettings

    def __init__(self, *args, **kwargs):  # pragma: no cover - promotion only
        raise TypeError(f"{type(self).__name__} is created by promote(), not constructed")

    @classmethod
    def promote(cls, layer, settings: KVBufferSettings) -> None:
        if type(layer) is not cls.stock_class:
            raise TypeError(f"layer: expected a {cls.stock_class.__name__}, got "
                            f"{type(layer).__name__}")
        layer.__class__ = cls
        layer._kvb = settings
        cls._after_promote(layer)

    @classmethod
    def _after_promote(cls, layer) -> None:
        """Per-class fix-ups of a freshly promoted layer."""

    @property
    def beta_scale(self) -> float:
        """The write strength is ``beta_scale * sigmoid(b)``: 2 where the layer allows negative
        eigenvalues (OLMo Hybrid's ``allow_neg_eigval``: beta in (0, 2)), 1 otherwise."""
        return 2.0 if getattr(self, "allow_neg_eigval", False) else 1.0

    # -- cache spec ---------------------------------------------------------------------------
    def get_state_shape(self):
        return tuple(super().get_state_shape()) + kvbuffer_state_shapes(
            tp_size=self.tp_size, num_k_heads=self.num_k_heads, num_v_heads=self.num_v_heads,
            head_k_dim=self.head_k_dim, head_v_dim=self.head_v_dim,
            chunk_size=self._kvb.chunk_size, max_draft_tokens=self.num_spec)

    def get_state_dtype(self):
        return tuple(super().get_state_dtype()) + kvbuffer_state_dtypes(self.model_config.dtype)

    def get_attn_backend(self):
        # vLLM's GDN metadata plus each row's position, from which commits are derived.
        return KVBufferGDNAttentionBackend

    def get_kv_cache_spec(self, vllm_config):
        # One state plus its buffer per request: no per-draft state slots. This is the capacity
        # win of KVBuffer for speculative decoding, and vLLM's own sizing sees it.
        spec = super().get_kv_cache_spec(vllm_config)
        return dataclasses.replace(spec, num_speculative_blocks=0)

    # -- forward ------------------------------------------------------------------------------
    def _backend(self) -> str:
        if self._kvb.backend != "auto":
            return self._kvb.backend
        return kernels.auto_backend(self.conv1d.weight.device)

    def _conv_weight(self) -> torch.Tensor:
        # On some CPUs vLLM repacks a bf16 conv weight in place at load and keeps the plain one.
        w = getattr(self.conv1d, "_cpu_unpacked_conv_weight", None)
        if w is None:
            w = self.conv1d.weight
        return w.reshape(w.shape[0], w.shape[-1])

    def _params(self) -> gdn_core.GDNParams:
        return gdn_core.GDNParams(
            conv_weight=self._conv_weight(), conv_bias=getattr(self.conv1d, "bias", None),
            activation=self.activation, A_log=self.A_log, dt_bias=self.dt_bias,
            num_k_heads=self.num_k_heads // self.tp_size,
            num_v_heads=self.num_v_heads // self.tp_size,
            head_k_dim=self.head_k_dim, head_v_dim=self.head_v_dim, backend=self._backend(),
            beta_scale=self.beta_scale)

    def _forward_core(self, mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                      core_attn_out: torch.Tensor) -> None:
        """Run the KVBuffer core on this step's rows; see :func:`forward_with_metadata`."""
        m = layer_metadata(get_forward_context().attn_metadata, self.prefix)
        if m is None:
            return
        cache = cache_from_layer_states(self.kv_cache, chunk_size=self._kvb.chunk_size,
                                        max_draft_tokens=self.num_spec,
                                        beta_max=self.beta_scale)
        conv_cache = self.kv_cache[0]
        conv_state = conv_cache.transpose(-1, -2) if is_conv_state_dim_first() else conv_cache
        forward_with_metadata(m, cache, conv_state, self._params(), mixed_qkv, b, a,
                              core_attn_out)


class KVBufferGatedDeltaNet(KVBufferGDNLayerMixin, QwenGatedDeltaNetAttention):
    """A promoted ``QwenGatedDeltaNetAttention``; see the module docstring."""

    stock_class = QwenGatedDeltaNetAttention

    @classmethod
    def _after_promote(cls, layer) -> None:
        # The stock __init__ bound the platform forward (on the CPU: the bf16-only C++ core).
        # forward_cuda is vLLM's device-agnostic path through the custom op -> _forward_core.
        layer._forward_method = layer.forward_cuda
        layer.enable_fused_gdn_spec_decode = False


def layer_metadata(attn_metadata, prefix: str):
    """This layer's ``GDNAttentionMetadata`` in the forward context, or None when the step has
    none for it: profile and dummy runs (V1 passes ``attn_metadata=None``; kernel warm-up runs
    may pass a dict without the Mamba groups), as vLLM's own ``_forward_core`` treats them."""
    if not isinstance(attn_metadata, dict):
        return None
    return attn_metadata.get(prefix)


def forward_with_metadata(m, cache, conv_state: torch.Tensor, p: gdn_core.GDNParams,
                          mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                          core_attn_out: torch.Tensor) -> None:
    """Unpack one step's ``GDNAttentionMetadata`` ``m`` and run :mod:`.gdn_core` on its rows,
    writing ``core_attn_out [T, HV, V]`` in place.

    Decode-only and uniform speculative batches take the graph-safe paths: under FULL CUDA
    graphs ``m`` is the object built at capture time (its counts frozen at the padded batch, its
    index tensors views of the builder's persistent buffers refilled at each replay), and rows
    past the real batch point at vLLM's null block (padding). Everything else goes eager.
    """
    if m.num_actual_tokens == 0:
        return
    if m.num_spec_decodes:
        n = m.num_spec_decodes
        spec_idx = (m.spec_token_indx if m.spec_token_indx is not None
                    else torch.arange(m.num_spec_decode_tokens, device=mixed_qkv.device))
        x, bb, aa = mixed_qkv[spec_idx], b[spec_idx], a[spec_idx]
        blocks = m.spec_state_indices_tensor[:, 0]
        T = m.uniform_spec_sequence_length
        if T is not None and m.num_prefills == 0 and m.num_decodes == 0:
            # Rows past num_spec_decodes are vLLM's CUDA-graph padding (null block).
            rows = spec_idx.shape[0] // T
            out = gdn_core.spec_rows_uniform(cache, conv_state, p, blocks[:rows],
                                             m.spec_positions(rows), x, bb, aa, T)
        else:
            out = gdn_core.spec_rows_varlen(cache, conv_state, p, blocks[:n],
                                            m.spec_positions(n),
                                            m.spec_query_start_loc, x, bb, aa)
        core_attn_out[spec_idx] = out.to(core_attn_out.dtype)
    rows = m.num_decodes + m.num_prefills
    if rows:
        if m.non_spec_token_indx is not None:
            idx = m.non_spec_token_indx
        else:
            idx = torch.arange(m.num_decode_tokens + m.num_prefill_tokens,
                               device=mixed_qkv.device)
        x, bb, aa = mixed_qkv[idx], b[idx], a[idx]
        blocks = m.non_spec_state_indices_tensor
        if m.num_prefills == 0 and m.num_spec_decodes == 0:
            out = gdn_core.decode_rows(cache, conv_state, p, blocks[:idx.shape[0]], x, bb, aa)
        else:
            out = gdn_core.varlen_rows(cache, conv_state, p, blocks[:rows],
                                       m.non_spec_query_start_loc, m.num_decodes,
                                       m.has_initial_state, x, bb, aa,
                                       m.non_spec_positions().rows(slice(0, rows)))
        core_attn_out[idx] = out.to(core_attn_out.dtype)
