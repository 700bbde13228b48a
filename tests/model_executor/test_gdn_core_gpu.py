"""CUDA-graph capture and replay of the layer core's graph-safe paths (skipped without CUDA).

vLLM captures decode-only and uniform speculative batches in FULL CUDA graphs: the graph is
captured once (with padding rows) and replayed with other block ids, accepted counts and inputs
written into the same buffers. Here: capture ``decode_rows`` / ``spec_rows_uniform`` over a
padding-only batch, then replay them step after step with real rows, and compare outputs and the
whole pool, bit for bit, with eager calls on a twin pool. Exactness of the eager paths against
float64 is in test_gdn_core.py.
"""

import pytest
import torch

from vllm_kvbuffer.kernels import allocate_cache
from vllm_kvbuffer.model_executor import gdn_core

pytestmark = pytest.mark.gpu(reason="needs a CUDA device; CPU CI checks the same paths for "
                                    "host syncs in test_gdn_core.py")

# Qwen3-Next at TP 4 (per rank): H=4, HV=8, K=V=128, conv width 4.
H, HV, K, V, W, C, D = 4, 8, 128, 128, 4, 16, 3
DC = 2 * H * K + HV * V
S, N = 64, 16


def _setup(seed):
    gen = torch.Generator().manual_seed(seed)
    dev = "cuda"
    p = gdn_core.GDNParams(
        conv_weight=(torch.randn(DC, W, generator=gen) * 0.5).to(dev, torch.bfloat16),
        conv_bias=None, activation="silu",
        A_log=torch.log(torch.empty(HV).uniform_(1, 16, generator=gen)).to(dev),
        dt_bias=torch.randn(HV, generator=gen).to(dev),
        num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, backend="triton")
    cache = allocate_cache(S, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, max_draft_tokens=D, dtype=torch.bfloat16,
                           state_dtype=torch.float32, device=dev)
    conv = torch.zeros(S, W - 1 + D, DC, dtype=torch.bfloat16, device=dev)
    # Prefill every slot but the null block eagerly (lengths around the flush boundary).
    lens = torch.randint(1, 3 * C, (S - 1,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    T = int(cu[-1])
    x = torch.randn(T, DC, generator=gen).to(dev, torch.bfloat16)
    b = torch.randn(T, HV, generator=gen).to(dev, torch.bfloat16)
    a = torch.randn(T, HV, generator=gen).to(dev, torch.bfloat16)
    blocks = torch.arange(1, S, device=dev)
    gdn_core.varlen_rows(cache, conv, p, blocks, cu.to(dev), 0,
                         torch.zeros(S - 1, dtype=torch.bool, device=dev), x, b, a)
    return gen, p, cache, conv


def _pool(cache, conv):
    return [cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta, conv]


def _twin(cache, conv):
    twin = allocate_cache(S, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                          chunk_size=C, max_draft_tokens=D, dtype=torch.bfloat16,
                          state_dtype=torch.float32, device="cuda")
    for dst, src in zip(_pool(twin, conv)[:-1], _pool(cache, conv)[:-1]):
        dst.copy_(src)
    twin.qk_l2norm = cache.qk_l2norm
    return twin, conv.clone()


def _assert_same(graph_pool, eager_pool, what):
    for name, g_, e_ in zip(("state", "buf_k", "buf_u", "buf_g", "meta", "conv"),
                            graph_pool, eager_pool):
        assert torch.equal(g_.nan_to_num(7.0), e_.nan_to_num(7.0)), f"{what}: {name} differs"


def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                      # compile / warm up on padding rows (writes nothing)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_decode_rows_replay_equals_eager():
    gen, p, cache, conv = _setup(0)
    twin, twin_conv = _twin(cache, conv)
    blocks = torch.zeros(N, dtype=torch.int64, device="cuda")       # padding at capture
    x = torch.zeros(N, DC, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros(N, HV, dtype=torch.bfloat16, device="cuda")
    a = torch.zeros(N, HV, dtype=torch.bfloat16, device="cuda")
    graph, out = _capture(lambda: gdn_core.decode_rows(cache, conv, p, blocks, x, b, a))
    _assert_same(_pool(cache, conv), _pool(twin, twin_conv), "capture on padding rows")
    for step in range(3 * C):
        n_real = 1 + step % N
        real = torch.randperm(S - 1, generator=gen)[:n_real] + 1
        blocks.zero_()
        blocks[:n_real] = real.to("cuda")
        x.copy_(torch.randn(N, DC, generator=gen).to("cuda", torch.bfloat16))
        b.copy_(torch.randn(N, HV, generator=gen).to("cuda", torch.bfloat16))
        a.copy_(torch.randn(N, HV, generator=gen).to("cuda", torch.bfloat16))
        graph.replay()
        want = gdn_core.decode_rows(twin, twin_conv, p, blocks.clone(), x.clone(), b.clone(),
                                    a.clone())
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"step {step}: outputs differ"
        _assert_same(_pool(cache, conv), _pool(twin, twin_conv), f"step {step}")


def test_spec_rows_uniform_replay_equals_eager():
    gen, p, cache, conv = _setup(1)
    twin, twin_conv = _twin(cache, conv)
    T = D + 1
    blocks = torch.zeros(N, dtype=torch.int64, device="cuda")
    # Each row's computed-token count, as vLLM's metadata refills it before every replay.
    ctx = torch.full((N,), 10, dtype=torch.int32, device="cuda")
    x = torch.zeros(N * T, DC, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros(N * T, HV, dtype=torch.bfloat16, device="cuda")
    a = torch.zeros(N * T, HV, dtype=torch.bfloat16, device="cuda")
    graph, out = _capture(
        lambda: gdn_core.spec_rows_uniform(cache, conv, p, blocks, gdn_core.RowPositions(ctx),
                                           x, b, a, T))
    _assert_same(_pool(cache, conv), _pool(twin, twin_conv), "capture on padding rows")
    # The same requests every step (a verify leaves them pending for the next step's accept).
    n_real = N - 3
    blocks[:n_real] = (torch.randperm(S - 1, generator=gen)[:n_real] + 1).to("cuda")
    for step in range(2 * C):
        # The sampler accepted 1..T tokens of each row's last verify: the count moves by that.
        ctx.add_(torch.randint(1, T + 1, (N,), generator=gen, dtype=torch.int32).to("cuda"))
        x.copy_(torch.randn(N * T, DC, generator=gen).to("cuda", torch.bfloat16))
        b.copy_(torch.randn(N * T, HV, generator=gen).to("cuda", torch.bfloat16))
        a.copy_(torch.randn(N * T, HV, generator=gen).to("cuda", torch.bfloat16))
        graph.replay()
        want = gdn_core.spec_rows_uniform(twin, twin_conv, p, blocks.clone(),
                                          gdn_core.RowPositions(ctx.clone()), x.clone(),
                                          b.clone(), a.clone(), T)
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"step {step}: outputs differ"
        _assert_same(_pool(cache, conv), _pool(twin, twin_conv), f"step {step}")
