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

import dataclasses

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from .. import kernels
from ..config import KVBufferSettings
from .cache_spec import cache_from_layer_states, kvbuffer_state_dtypes, kvbuffer_state_shapes

# meta column the layer owns (the kernels never touch it): the conv window's offset.
META_CONV = 3


def causal_conv1d_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       cu: list[int], windows: list[torch.Tensor | None],
                       activation: str | None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Depthwise causal conv over packed sequences, each continuing its own input window.

    Args:
        x: ``[T, D]`` packed inputs. weight: ``[D, W]``. bias: ``[D]`` or None.
        cu: sequence boundaries in x. windows: per sequence the ``[W-1, D]`` inputs that precede
            it (None: padding row, skipped).

    Returns ``(y [T, D]`` in x's dtype with the activation applied, per sequence the full input
    ``[W-1+n, D]`` in fp32 (to take the next window from))``.
    """
    y = torch.zeros_like(x)
    w = weight.to(torch.float32)[:, None, :]
    b = bias.to(torch.float32) if bias is not None else None
    fulls: list[torch.Tensor | None] = []
    for i, prev in enumerate(windows):
        start, end = cu[i], cu[i + 1]
        if prev is None:
            fulls.append(None)
            continue
        full = torch.cat([prev.to(torch.float32), x[start:end].to(torch.float32)], dim=0)
        if end > start:
            yi = F.conv1d(full.t()[None], w, b, groups=x.shape[1])[0].t()
            if activation in ("silu", "swish"):
                yi = F.silu(yi)
            y[start:end] = yi.to(x.dtype)
        fulls.append(full)
    return y, fulls


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

    def get_kv_cache_spec(self, vllm_config):
        # One state plus its buffer per request: no per-draft state slots. This is the capacity
        # win of KVBuffer for speculative decoding, and vLLM's own sizing sees it.
        spec = super().get_kv_cache_spec(vllm_config)
        return dataclasses.replace(spec, num_speculative_blocks=0)

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

    # The conv cache holds W-1+D input columns per slot (vLLM's shape). Its committed window is
    # the W-1 columns from the offset kept in meta[:, META_CONV]; a verify step stores
    # ``full[drop:]`` and marks the slot pending as ``-(drop + 1)``, and the accept at the start
    # of the next step turns that into offset ``m - drop`` (m: tokens accepted).
    def _window(self, conv_state, meta, slot: int, has_initial_state: bool, W: int):
        if not has_initial_state:
            return conv_state.new_zeros(W - 1, conv_state.shape[-1])
        off = int(meta[slot, META_CONV])
        if off < 0:
            raise RuntimeError(f"slot {slot}: conv window read while a verify is pending")
        return conv_state[slot, off:off + W - 1]

    def _store_window(self, conv_state, meta, slot: int, full: torch.Tensor, W: int) -> None:
        conv_state[slot, :W - 1] = full[-(W - 1):].to(conv_state.dtype)
        meta[slot, META_CONV] = 0

    def _qkv_gates(self, x, b, a):
        n = x.shape[0]
        Hr, HVr = self.num_k_heads // self.tp_size, self.num_v_heads // self.tp_size
        kd, vd = Hr * self.head_k_dim, HVr * self.head_v_dim
        q = x[:, :kd].reshape(n, Hr, self.head_k_dim)
        k = x[:, kd:2 * kd].reshape(n, Hr, self.head_k_dim)
        v = x[:, 2 * kd:2 * kd + vd].reshape(n, HVr, self.head_v_dim)
        # Gates as the stock path computes them, in fp32.
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        beta = torch.sigmoid(b.float())
        return q, k, v, g, beta

    def _forward_core(self, mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                      core_attn_out: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if metadata is None:          # profiling run: nothing is bound yet
            return
        m = metadata[self.prefix]
        if m.num_actual_tokens == 0:
            return
        cache = cache_from_layer_states(self.kv_cache, chunk_size=self._kvb.chunk_size,
                                        max_draft_tokens=self.num_spec)
        conv_cache = self.kv_cache[0]
        conv_state = conv_cache.transpose(-1, -2) if is_conv_state_dim_first() else conv_cache
        W = self.conv1d.weight.shape[-1]
        weight = self._conv_weight()
        backend = self._backend()
        meta = cache.meta

        if m.num_spec_decodes:
            spec_idx = (m.spec_token_indx if m.spec_token_indx is not None
                        else torch.arange(m.num_spec_decode_tokens, device=mixed_qkv.device))
            out = self._spec_rows(m, cache, conv_state, meta, W, weight, backend,
                                  mixed_qkv[spec_idx], b[spec_idx], a[spec_idx])
            core_attn_out[spec_idx] = out.to(core_attn_out.dtype)
        rows = m.num_decodes + m.num_prefills
        if rows:
            if m.non_spec_token_indx is not None:
                idx = m.non_spec_token_indx
            else:
                idx = torch.arange(m.num_decode_tokens + m.num_prefill_tokens,
                                   device=mixed_qkv.device)
            out = self._non_spec_rows(m, cache, conv_state, meta, W, weight, backend,
                                      mixed_qkv[idx], b[idx], a[idx])
            core_attn_out[idx] = out.to(core_attn_out.dtype)

    def _non_spec_rows(self, m, cache, conv_state, meta, W, weight, backend, x, b, a):
        n_dec, n_pre, n_dec_tok = m.num_decodes, m.num_prefills, m.num_decode_tokens
        rows = n_dec + n_pre
        # vLLM pads state indices with its null block 0 (never a request's block).
        blocks = m.non_spec_state_indices_tensor[:rows]
        slots = torch.where(blocks > 0, blocks, -1).to(torch.int32)
        slot_list = slots.tolist()
        cu = m.non_spec_query_start_loc[: rows + 1].tolist()
        has_init = ([True] * n_dec + m.has_initial_state[n_dec:rows].tolist()
                    if n_pre else [True] * n_dec)
        # New sequences (and recomputed, preempted ones) start empty: their pages are reused.
        fresh = [s for s, h in zip(slot_list, has_init) if s >= 0 and not h]
        if fresh:
            kernels.reset_slots(cache, torch.tensor(fresh, dtype=torch.int32,
                                                    device=slots.device))
        windows = [None if s < 0 else self._window(conv_state, meta, s, h, W)
                   for s, h in zip(slot_list, has_init)]
        y, fulls = causal_conv1d_rows(x, weight, self.conv1d.bias, cu, windows, self.activation)
        for s, full in zip(slot_list, fulls):
            if full is not None:
                self._store_window(conv_state, meta, s, full, W)
        q, k, v, g, beta = self._qkv_gates(y, b, a)
        out = torch.empty_like(v)
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
        return out

    def _spec_rows(self, m, cache, conv_state, meta, W, weight, backend, x, b, a):
        """Last accepted token + drafts: commit the previous step's accepted prefix, then score
        the new tokens tentatively with ``verify`` (no state written, no per-draft slots)."""
        n = m.num_spec_decodes
        blocks = m.spec_state_indices_tensor[:n, 0]
        slots = torch.where(blocks > 0, blocks, -1).to(torch.int32)
        slot_list = slots.tolist()
        # 1. Commit what the sampler accepted last step (accepted drafts + 1) in slots that
        #    still hold tentative tokens; the others come straight from a prefill.
        accepted = m.num_accepted_tokens[:n].to(torch.int32)
        pending = [i for i, s in enumerate(slot_list) if s >= 0 and int(meta[s, 1]) > 0]
        if pending:
            rows = torch.tensor(pending, dtype=torch.long, device=slots.device)
            acc = accepted[rows]
            kernels.accept(cache, slots[rows], acc, backend=backend)
            for i, mi in zip(pending, acc.tolist()):
                s = slot_list[i]
                drop = -int(meta[s, META_CONV]) - 1
                meta[s, META_CONV] = mi - drop
        # 2. Conv: each row continues its committed window; keep the inputs so that any accepted
        #    prefix can become the next window (store full[drop:] in the W-1+D columns).
        cu = m.spec_query_start_loc[: n + 1].tolist()
        windows = [None if s < 0 else self._window(conv_state, meta, s, True, W)
                   for s in slot_list]
        y, fulls = causal_conv1d_rows(x, weight, self.conv1d.bias, cu, windows, self.activation)
        cap = conv_state.shape[1]
        for s, full in zip(slot_list, fulls):
            if full is None:
                continue
            drop = full.shape[0] - min(full.shape[0], cap)
            kept = full[drop:]
            conv_state[s, :kept.shape[0]] = kept.to(conv_state.dtype)
            meta[s, META_CONV] = -(drop + 1)
        # 3. Verify, grouped by query length (rows may carry different numbers of drafts).
        q, k, v, g, beta = self._qkv_gates(y, b, a)
        out = torch.zeros_like(v)
        lens = [cu[i + 1] - cu[i] for i in range(n)]
        for T in sorted(set(lens)):
            members = [i for i in range(n) if lens[i] == T and slot_list[i] >= 0]
            if not members or T == 0:
                continue
            tok = torch.tensor([cu[i] + t for i in members for t in range(T)],
                               dtype=torch.long, device=x.device)
            grp = torch.tensor(members, dtype=torch.long, device=x.device)
            o = kernels.verify(cache, slots[grp],
                               *(t[tok].reshape(len(members), T, *t.shape[1:])
                                 for t in (q, k, v, g, beta)),
                               backend=backend)
            out[tok] = o.reshape(len(members) * T, *o.shape[2:])
        return out
