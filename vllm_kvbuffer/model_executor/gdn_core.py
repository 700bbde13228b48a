"""The KVBuffer GDN layer core: causal conv on the layer's conv cache, gates, KVBuffer kernels.

Pure torch + :mod:`vllm_kvbuffer.kernels` (no vLLM import), so it can be tested, and captured in a
CUDA graph, without an engine. The vLLM layer (:mod:`.gdn_layer`) only unpacks vLLM's metadata.

Two kinds of entry points:

- **Graph-safe** (:func:`decode_rows`, :func:`spec_rows_uniform`): the batches vLLM captures in
  FULL CUDA graphs (decode-only, and speculative decoding with the same number of tokens per
  request). No host reads, no data-dependent shapes or branches: slots come from the block ids on
  the device (block id ``<= 0`` is vLLM's null block = padding row; such rows read and write
  nothing), conv windows are gathered at per-slot offsets kept in ``meta[:, META_CONV]``, writes to
  padding rows are masked. A replay with other block ids, accepted counts and inputs in the same
  buffers computes what an eager call would.
- **Eager** (:func:`varlen_rows`, :func:`spec_rows_varlen`): prefills, chunked prefills, mixed
  batches and ragged speculative batches. vLLM runs the attention core of these batches outside
  CUDA graphs (the custom op is one of its splitting ops), so they may read lengths on the host.

The conv cache holds ``W-1+D`` input columns per slot (vLLM's shape). Its committed window is the
``W-1`` columns from the offset in ``meta[:, META_CONV]``; a verify step stores ``full[drop:]`` (the
window and the new inputs, the oldest ``drop`` dropped to fit) and marks the slot pending as
``-(drop + 1)``; the accept at the start of the next step turns that into offset ``m - drop``
(``m``: tokens accepted).

**Commits come from positions.** A verify records in ``meta[:, META_VERIFY_POS]`` how many tokens
the request had computed when it started (``c_v``). At the request's next step vLLM's metadata
says how many it has computed now (``c``: the accepted tokens were counted, the rejected ones
taken back), so ``m = c - c_v`` tokens are committed, whatever vLLM's ``num_accepted_tokens``
says for the row: that count is reset to 1 by align-mode copies, by async scheduling for rows
that were not in the previous batch, and for requests re-added to the persistent batch.
``m`` outside ``1..T`` (``T`` tentative tokens) is an error, never a silent commit.

**Block boundaries (prefix caching, vLLM's align mode).** vLLM caches the linear state of a
request at every multiple ``B`` of its block size, in the block that ends there, and copies the
running slot whole into the next block when the request moves on. A slot whose committed tokens
end at ``c_v <= B`` and whose tentative tokens (the verified ones) reach ``B`` describes the state
at ``B`` exactly: whoever continues from it commits ``B - c_v`` tokens by position, like any
other commit. So when a verify reaches the next boundary and the slot running it is not the
boundary's block, the boundary's block gets a copy of the slot (whole-slot copy, no per-draft
state). If drafts before ``B`` are rejected, the next verify reaches ``B`` again and copies again;
vLLM caches the block only once the request's computed tokens have passed ``B``, that is after
the verify whose tokens up to ``B`` were all accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels.cache import META_PENDING, KVBufferCache

# meta columns the layer owns (the kernels never touch them): the conv window's offset, and the
# request's computed-token count when its pending verify started (c_v; see the module docstring).
META_CONV = 3
META_VERIFY_POS = 4


@dataclass(frozen=True)
class RowPositions:
    """Where each row of a step stands in its request, from vLLM's metadata (device tensors).

    ``context_lens [N]``: tokens the request had computed before this step's first token.
    Align mode (prefix caching) with drafts also gives ``boundary_pos [N]``, the first multiple of
    the block size above ``context_lens``, and ``boundary_blocks [N]``, the block id that caches
    the state there (``<= 0``: none).
    """

    context_lens: torch.Tensor
    boundary_pos: torch.Tensor | None = None
    boundary_blocks: torch.Tensor | None = None

    def rows(self, index) -> "RowPositions":
        """The positions of the rows ``index`` selects (a slice, a mask or an index tensor)."""
        return RowPositions(*(None if t is None else t[index] for t in
                              (self.context_lens, self.boundary_pos, self.boundary_blocks)))


@dataclass(frozen=True)
class GDNParams:
    """One GDN layer's weights and per-rank sizes, as the core needs them.

    ``conv_weight [D, W]``, ``conv_bias [D]`` or None, ``A_log [HV]``, ``dt_bias [HV]``; ``D`` is
    the conv channel count ``2*H*K + HV*V`` (this rank's heads).
    """

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    activation: str | None
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    backend: str
    #: beta = beta_scale * sigmoid(b): 2 where the layer allows negative eigenvalues (OLMo Hybrid).
    beta_scale: float = 1.0

    @property
    def width(self) -> int:
        return self.conv_weight.shape[-1]


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of conv and gates: fp32 as the stock path (float64 for float64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def split_qkv(p: GDNParams, y: torch.Tensor):
    """Views of the conv output ``y [T, D]``: q, k ``[T, H, K]`` and v ``[T, HV, V]``."""
    n = y.shape[0]
    kd, vd = p.num_k_heads * p.head_k_dim, p.num_v_heads * p.head_v_dim
    q = y[:, :kd].reshape(n, p.num_k_heads, p.head_k_dim)
    k = y[:, kd:2 * kd].reshape(n, p.num_k_heads, p.head_k_dim)
    v = y[:, 2 * kd:2 * kd + vd].reshape(n, p.num_v_heads, p.head_v_dim)
    return q, k, v


def qkv_gates(p: GDNParams, y: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
    """Split the conv output ``y [T, D]`` into q, k, v and compute the gates (in fp32 as the
    stock path computes them; float64 for float64 inputs)."""
    q, k, v = split_qkv(p, y)
    g, beta = kernels.gdn_gates(p.A_log, p.dt_bias, a, b, beta_scale=p.beta_scale,
                                backend=p.backend)
    return q, k, v, g, beta


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def block_slots(blocks: torch.Tensor) -> torch.Tensor:
    """vLLM block ids -> KVBuffer slot ids: the null block (0, vLLM's padding) becomes -1."""
    return torch.where(blocks > 0, blocks, -1).to(torch.int32)


# -- graph-safe paths --------------------------------------------------------------------------
def _gather_windows(conv_state, meta, slots_c, valid, W: int) -> torch.Tensor:
    """``[N, W-1, D]`` (fp32 or float64): each slot's committed conv window, at its ``META_CONV``
    offset (padding rows read the null block at offset 0: never out of range, whatever it
    holds)."""
    off = meta[slots_c, META_CONV].clamp(min=0, max=conv_state.shape[1] - (W - 1))
    off = torch.where(valid, off, 0).long()
    cols = off[:, None] + torch.arange(W - 1, device=off.device)
    return conv_state[slots_c.long()[:, None], cols].to(_acc(conv_state.dtype))


def _conv_uniform(full: torch.Tensor, p: GDNParams, T: int) -> torch.Tensor:
    """Causal depthwise conv of ``full [N, W-1+T, D]``: ``[N, T, D]`` outputs in full's dtype."""
    W = p.width
    w = p.conv_weight.to(full.dtype)                               # [D, W]
    win = full.unfold(1, W, 1)                                      # [N, T, D, W]
    y = (win * w).sum(-1)
    if p.conv_bias is not None:
        y = y + p.conv_bias.to(full.dtype)
    return _activate(y, p.activation)


def _native_conv_gates(p: GDNParams, conv_state, x, b, a) -> bool:
    """The CPU backend does conv, window update and gates in one native call."""
    if p.backend != "cpu" or x.device.type != "cpu":
        return False
    from ..kernels import cpu_impl
    return cpu_impl.conv_gates_supported(p.conv_weight, p.conv_bias, conv_state, x, a, b)


def _conv_gates_native(cache: KVBufferCache, conv_state, p: GDNParams, blocks, x, b, a,
                       **rows):
    from ..kernels import cpu_impl
    y, g, beta = cpu_impl.conv_gates(
        conv_state, cache.meta, META_CONV, p.conv_weight, p.conv_bias,
        p.activation in ("silu", "swish"), blocks, x, A_log=p.A_log, dt_bias=p.dt_bias, a=a,
        b=b, beta_scale=p.beta_scale, **rows)
    return (*split_qkv(p, y), g, beta)


def _masked_row_write(dst: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
                      value: torch.Tensor) -> None:
    """``dst[rows] = value`` where ``valid``; padding rows (pointing at the null block) write that
    row's own content back, so they change nothing."""
    shape = (-1,) + (1,) * (value.dim() - 1)
    dst[rows] = torch.where(valid.view(shape), value.to(dst.dtype), dst[rows])


def decode_rows(cache: KVBufferCache, conv_state: torch.Tensor, p: GDNParams,
                blocks: torch.Tensor, x: torch.Tensor, b: torch.Tensor,
                a: torch.Tensor) -> torch.Tensor:
    """One token per request (graph-safe).

    Args:
        conv_state: ``[S, W-1+D, Dc]`` the layer's conv cache (token-major view).
        blocks: ``[N]`` vLLM state block ids (``<= 0``: padding row).
        x: ``[N, Dc]`` pre-conv projections; b, a: ``[N, HV]``.

    Returns ``[N, HV, V]`` (padding rows: zeros). Requests here always continue a slot.
    """
    N, W = x.shape[0], p.width
    slots = block_slots(blocks)
    if _native_conv_gates(p, conv_state, x, b, a):
        q, k, v, g, beta = _conv_gates_native(cache, conv_state, p, blocks, x, b, a, T=1,
                                              keep_from=1, meta_value=0)
        with kernels.set_value_checks(False):
            return kernels.decode(cache, slots, q, k, v, g, beta, backend=p.backend)
    valid = slots >= 0
    slots_c = slots.clamp(min=0).long()
    full = torch.cat([_gather_windows(conv_state, cache.meta, slots_c, valid, W),
                      x.to(_acc(x.dtype))[:, None]], dim=1)      # [N, W, Dc]
    y = _conv_uniform(full, p, 1)[:, 0].to(x.dtype)
    cols = torch.arange(W - 1, device=x.device)
    _masked_row_write(conv_state, (slots_c[:, None], cols), valid[:, None], full[:, 1:])
    _masked_row_write(cache.meta, (slots_c, META_CONV), valid,
                      torch.zeros(N, dtype=cache.meta.dtype, device=x.device))
    q, k, v, g, beta = qkv_gates(p, y, b, a)
    with kernels.set_value_checks(False):
        return kernels.decode(cache, slots, q, k, v, g, beta, backend=p.backend)


def _commit_counts(cache: KVBufferCache, slots: torch.Tensor, context_lens: torch.Tensor,
                   *, detailed: bool):
    """Per row: whether its slot holds tentative tokens, and how many of them the request's
    position says were accepted (``m = c - c_v``; 1 where nothing is pending). ``m`` outside
    ``1..T`` raises: ``detailed`` names the rows (host reads), otherwise a device-side assert
    (graph-safe)."""
    valid = slots >= 0
    slots_c = slots.clamp(min=0).long()
    meta = cache.meta
    tentative = meta[slots_c, META_PENDING]
    pending = valid & (tentative > 0)
    m = context_lens.to(torch.int32) - meta[slots_c, META_VERIFY_POS]
    ok = ~pending | ((m >= 1) & (m <= tentative))
    if detailed:
        bad = (~ok).nonzero().flatten().tolist()
        if bad:
            rows = [f"slot {int(slots[i])}: {int(m[i])} (T={int(tentative[i])}, computed "
                    f"{int(context_lens[i])}, verified at {int(meta[slots_c[i], META_VERIFY_POS])})"
                    for i in bad[:8]]
            raise ValueError("KVBuffer: tokens to commit: expected 1..T (the request's computed "
                             "tokens minus those at its verify of T tokens), got " + str(rows))
    else:
        torch._assert_async(ok.all(), "KVBuffer: tokens to commit outside 1..T (the request's "
                            "computed-token count moved by more than its verified tokens or not "
                            "at all); set VLLM_KVBUFFER_VALUE_CHECKS=1 with --enforce-eager for "
                            "the rows")
    return pending, torch.where(pending, m, 1)


def snapshot_boundaries(cache: KVBufferCache, conv_state: torch.Tensor, slots: torch.Tensor,
                        pos: RowPositions, lens: torch.Tensor) -> None:
    """Align mode, after a verify of ``lens [N]`` tokens per row: where the tokens reach the
    next block boundary and the boundary's block is not the slot itself, copy the whole slot
    (state, buffer, cursors, conv window) into it (module docstring). Eager: the rows are chosen
    on the host."""
    reach = ((slots >= 0) & (pos.boundary_blocks > 0) & (pos.boundary_blocks != slots)
             & (pos.boundary_pos - pos.context_lens <= lens))
    rows = reach.nonzero().flatten()
    if rows.numel() == 0:
        return
    src = slots[rows].long()
    dst = pos.boundary_blocks[rows].long()
    for t in (conv_state, cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta):
        t[dst] = t[src]


def _accept_rows(cache: KVBufferCache, slots: torch.Tensor, pending: torch.Tensor,
                 m: torch.Tensor, backend: str) -> None:
    """Commit ``m`` tentative tokens in the slots where ``pending`` and move their conv windows
    to the accepted position (``off = -(drop + 1)`` while pending: the window of the accepted
    prefix starts at ``m - drop``). Graph-safe."""
    slots_c = slots.clamp(min=0).long()
    with kernels.set_value_checks(False):
        kernels.accept(cache, torch.where(pending, slots, -1), m, backend=backend)
    off = cache.meta[slots_c, META_CONV]
    _masked_row_write(cache.meta, (slots_c, META_CONV), pending, m + off + 1)


def accept_pending(cache: KVBufferCache, conv_state: torch.Tensor, slots: torch.Tensor,
                   pos: RowPositions, backend: str, *, detailed: bool = False) -> None:
    """Commit, in the slots that still hold tentative tokens (the others come straight from a
    prefill or hold none), what the sampler accepted at their last verify, derived from the
    request's position (module docstring). Graph-safe unless ``detailed``."""
    pending, m = _commit_counts(cache, slots, pos.context_lens, detailed=detailed)
    _accept_rows(cache, slots, pending, m, backend)


def _record_verify(cache: KVBufferCache, slots_c: torch.Tensor, valid: torch.Tensor,
                   context_lens: torch.Tensor) -> None:
    """Remember where each verified row's request stood (``c_v``), for the next commit."""
    _masked_row_write(cache.meta, (slots_c, META_VERIFY_POS), valid,
                      context_lens.to(cache.meta.dtype))


def spec_rows_uniform(cache: KVBufferCache, conv_state: torch.Tensor, p: GDNParams,
                      blocks: torch.Tensor, pos: RowPositions, x: torch.Tensor,
                      b: torch.Tensor, a: torch.Tensor, T: int) -> torch.Tensor:
    """Speculative rows, each with the same ``T`` tokens (last accepted token + T-1 drafts);
    graph-safe (align mode's boundary snapshots excepted).

    Args:
        blocks: ``[N]`` block ids (``<= 0``: padding). pos: the rows' positions
            (:class:`RowPositions`, ``N`` rows).
        x: ``[N*T, Dc]`` row-major by request; b, a: ``[N*T, HV]``.

    Returns ``[N*T, HV, V]``. Commits the previous verify's accepted prefix, then scores the
    ``T`` tokens tentatively with ``verify`` (no state written, no per-draft slots).
    """
    N, W = blocks.shape[0], p.width
    slots = block_slots(blocks)
    accept_pending(cache, conv_state, slots, pos, p.backend)
    _record_verify(cache, slots.clamp(min=0).long(), slots >= 0, pos.context_lens)
    if _native_conv_gates(p, conv_state, x, b, a):
        drop = max(0, W - 1 + T - conv_state.shape[1])
        q, k, v, g, beta = _conv_gates_native(cache, conv_state, p, blocks, x, b, a, T=T,
                                              keep_from=drop, meta_value=-(drop + 1))
        with kernels.set_value_checks(False):
            o = kernels.verify(cache, slots, *(t.reshape(N, T, *t.shape[1:])
                                               for t in (q, k, v, g, beta)), backend=p.backend)
        _after_verify(cache, conv_state, slots, pos, T)
        return o.reshape(N * T, *o.shape[2:])
    valid = slots >= 0
    slots_c = slots.clamp(min=0).long()
    window = _gather_windows(conv_state, cache.meta, slots_c, valid, W)
    full = torch.cat([window, x.to(window.dtype).reshape(N, T, -1)], dim=1)  # [N, W-1+T, Dc]
    y = _conv_uniform(full, p, T).reshape(N * T, -1).to(x.dtype)
    cap = conv_state.shape[1]
    drop = max(0, W - 1 + T - cap)
    kept = full[:, drop:]
    cols = torch.arange(kept.shape[1], device=x.device)
    _masked_row_write(conv_state, (slots_c[:, None], cols), valid[:, None], kept)
    _masked_row_write(cache.meta, (slots_c, META_CONV), valid,
                      torch.full((N,), -(drop + 1), dtype=cache.meta.dtype, device=x.device))
    q, k, v, g, beta = qkv_gates(p, y, b, a)
    with kernels.set_value_checks(False):
        o = kernels.verify(cache, slots, *(t.reshape(N, T, *t.shape[1:])
                                           for t in (q, k, v, g, beta)), backend=p.backend)
    _after_verify(cache, conv_state, slots, pos, T)
    return o.reshape(N * T, *o.shape[2:])


def _after_verify(cache, conv_state, slots, pos: RowPositions, lens) -> None:
    if pos.boundary_blocks is not None:
        snapshot_boundaries(cache, conv_state, slots, pos, lens)


# -- eager paths (host reads allowed: vLLM never captures these batches) -----------------------
def causal_conv1d_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       cu: list[int], windows: list[torch.Tensor | None],
                       activation: str | None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Depthwise causal conv over packed sequences, each continuing its own input window.

    Args:
        x: ``[T, D]`` packed inputs. weight: ``[D, W]``. bias: ``[D]`` or None.
        cu: sequence boundaries in x. windows: per sequence the ``[W-1, D]`` inputs that precede
            it (None: padding row, skipped).

    Returns ``(y [T, D]`` in x's dtype with the activation applied, per sequence the full input
    ``[W-1+n, D]`` in fp32, float64 for float64 inputs (to take the next window from))``.
    """
    f = _acc(x.dtype)
    y = torch.zeros_like(x)
    w = weight.to(f)[:, None, :]
    b = bias.to(f) if bias is not None else None
    fulls: list[torch.Tensor | None] = []
    for i, prev in enumerate(windows):
        start, end = cu[i], cu[i + 1]
        if prev is None:
            fulls.append(None)
            continue
        full = torch.cat([prev.to(f), x[start:end].to(f)], dim=0)
        if end > start:
            yi = F.conv1d(full.t()[None], w, b, groups=x.shape[1])[0].t()
            y[start:end] = _activate(yi, activation).to(x.dtype)
        fulls.append(full)
    return y, fulls


def _window(conv_state, meta, slot: int, has_initial_state: bool, W: int):
    if not has_initial_state:
        return conv_state.new_zeros(W - 1, conv_state.shape[-1])
    off = int(meta[slot, META_CONV])
    if off < 0:
        raise RuntimeError(f"slot {slot}: conv window read while a verify is pending")
    return conv_state[slot, off:off + W - 1]


def varlen_rows(cache: KVBufferCache, conv_state: torch.Tensor, p: GDNParams,
                blocks: torch.Tensor, cu_seqlens: torch.Tensor, num_decodes: int,
                has_initial_state: torch.Tensor | None, x: torch.Tensor, b: torch.Tensor,
                a: torch.Tensor, pos: RowPositions | None = None) -> torch.Tensor:
    """Decodes (first ``num_decodes`` rows, one token each) followed by prefill chunks (eager).

    Args:
        blocks: ``[R]`` block ids; cu_seqlens: ``[R+1]`` token boundaries in x;
        has_initial_state: ``[R]`` bool (rows ``>= num_decodes`` are read) or None (all decodes).
        pos: the rows' positions, with speculative decoding: a continuing row whose slot still
            holds tentative tokens (a request that verified drafts and comes back as a plain
            row) commits them first.
    """
    R, W = blocks.shape[0], p.width
    n_dec = num_decodes
    slots = block_slots(blocks)
    slot_list = slots.tolist()
    cu = cu_seqlens[: R + 1].tolist()
    has_init = [True] * n_dec
    if R > n_dec:
        has_init += has_initial_state[n_dec:R].tolist()
    # New sequences (and recomputed, preempted ones) start empty: their pages are reused.
    fresh = [s for s, h in zip(slot_list, has_init) if s >= 0 and not h]
    if fresh:
        kernels.reset_slots(cache, torch.tensor(fresh, dtype=torch.int32, device=slots.device))
    if pos is not None and cache.max_draft_tokens:
        accept_pending(cache, conv_state, slots, pos, p.backend, detailed=True)
    if _native_conv_gates(p, conv_state, x, b, a):
        cont = [s for s, h in zip(slot_list, has_init) if s >= 0 and h]
        if cont and int(cache.meta[cont, META_CONV].min()) < 0:
            raise RuntimeError("conv window read while a verify is pending")
        q, k, v, g, beta = _conv_gates_native(
            cache, conv_state, p, blocks, x, b, a, cu_seqlens=cu_seqlens[:R + 1],
            has_initial_state=torch.tensor(has_init))
        # The layer keeps the kernels' invariants (no pending tokens, room in the buffer).
        with kernels.set_value_checks(False):
            return _varlen_kernels(cache, slots, cu_seqlens, n_dec, R, cu, q, k, v, g, beta, p)
    windows = [None if s < 0 else _window(conv_state, cache.meta, s, h, W)
               for s, h in zip(slot_list, has_init)]
    y, fulls = causal_conv1d_rows(x, p.conv_weight, p.conv_bias, cu, windows, p.activation)
    for s, full in zip(slot_list, fulls):
        if full is not None:
            conv_state[s, :W - 1] = full[-(W - 1):].to(conv_state.dtype)
            cache.meta[s, META_CONV] = 0
    q, k, v, g, beta = qkv_gates(p, y, b, a)
    return _varlen_kernels(cache, slots, cu_seqlens, n_dec, R, cu, q, k, v, g, beta, p)


def _varlen_kernels(cache, slots, cu_seqlens, n_dec, R, cu, q, k, v, g, beta, p):
    """The decode rows' ``decode`` and the prefill rows' ``prefill`` of :func:`varlen_rows`."""
    n_dec_tok = cu[n_dec]
    out = torch.empty_like(v)
    if n_dec:
        out[:n_dec_tok] = kernels.decode(cache, slots[:n_dec], q[:n_dec_tok], k[:n_dec_tok],
                                         v[:n_dec_tok], g[:n_dec_tok], beta[:n_dec_tok],
                                         backend=p.backend)
    if R > n_dec:
        cu_pre = (cu_seqlens[n_dec: R + 1] - n_dec_tok).to(torch.int32)
        out[n_dec_tok:] = kernels.prefill(cache, slots[n_dec:], q[n_dec_tok:], k[n_dec_tok:],
                                          v[n_dec_tok:], g[n_dec_tok:], beta[n_dec_tok:],
                                          cu_pre, backend=p.backend)
    return out


def spec_rows_varlen(cache: KVBufferCache, conv_state: torch.Tensor, p: GDNParams,
                     blocks: torch.Tensor, pos: RowPositions, cu_seqlens: torch.Tensor,
                     x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Speculative rows with different numbers of tokens (eager): as :func:`spec_rows_uniform`,
    verify grouped by length."""
    n, W = blocks.shape[0], p.width
    slots = block_slots(blocks)
    accept_pending(cache, conv_state, slots, pos, p.backend, detailed=True)
    _record_verify(cache, slots.clamp(min=0).long(), slots >= 0, pos.context_lens)
    slot_list = slots.tolist()
    cu = cu_seqlens[: n + 1].tolist()
    windows = [None if s < 0 else _window(conv_state, cache.meta, s, True, W) for s in slot_list]
    y, fulls = causal_conv1d_rows(x, p.conv_weight, p.conv_bias, cu, windows, p.activation)
    cap = conv_state.shape[1]
    for s, full in zip(slot_list, fulls):
        if full is None:
            continue
        drop = full.shape[0] - min(full.shape[0], cap)
        kept = full[drop:]
        conv_state[s, :kept.shape[0]] = kept.to(conv_state.dtype)
        cache.meta[s, META_CONV] = -(drop + 1)
    q, k, v, g, beta = qkv_gates(p, y, b, a)
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
                           backend=p.backend)
        out[tok] = o.reshape(len(members) * T, *o.shape[2:])
    _after_verify(cache, conv_state, slots, pos,
                  torch.tensor(lens, dtype=torch.int32, device=slots.device))
    return out
