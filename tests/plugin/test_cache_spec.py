"""KVBuffer states inside a vLLM GDN cache page, bound by vLLM's own MambaBase.bind_kv_cache.

The page is an int8 tensor per block, padded beyond its content as vLLM pads Mamba pages to the
attention page. The kernels run on the resulting strided views and must (a) match the recurrence
and (b) leave every byte outside their own states untouched (the conv state, the padding, other
blocks).
"""

from math import prod

import pytest
import torch
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator

from vllm_kvbuffer.kernels import decode, prefill, recurrent_gated_delta_rule, reset_slots
from vllm_kvbuffer.model_executor.cache_spec import (
    cache_from_layer_states,
    check_page_layout,
    kvbuffer_state_dtypes,
    kvbuffer_state_shapes,
    state_byte_offsets,
)


class _FakeGDNLayer:
    """Just enough of a layer for vLLM's MambaBase.bind_kv_cache."""

    def __init__(self, shapes, dtypes):
        self._shapes, self._dtypes = shapes, dtypes

    def get_state_shape(self):
        return self._shapes

    def get_state_dtype(self):
        return self._dtypes


def _layer_states(tp, H, HV, K, V, C, D, model_dtype, num_blocks, pad):
    stock = MambaStateShapeCalculator.gated_delta_net_state_shape(tp, H, HV, K, V, 4, D)
    shapes = tuple(stock) + kvbuffer_state_shapes(tp_size=tp, num_k_heads=H, num_v_heads=HV,
                                                  head_k_dim=K, head_v_dim=V, chunk_size=C,
                                                  max_draft_tokens=D)
    dtypes = (model_dtype, torch.float32) + kvbuffer_state_dtypes(model_dtype)
    content = sum(prod(s) * torch.empty((), dtype=d).element_size()
                  for s, d in zip(shapes, dtypes))
    page = content + pad
    check_page_layout(shapes, dtypes, page)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(-128, 127, (num_blocks, 1, 1, page), generator=gen, dtype=torch.int8)
    layer = _FakeGDNLayer(shapes, dtypes)
    MambaBase.bind_kv_cache(layer, raw)
    return layer, raw, shapes, dtypes, content


def test_shapes_dtypes_and_offsets_qwen3_next_80b():
    shapes = kvbuffer_state_shapes(tp_size=4, num_k_heads=16, num_v_heads=32, head_k_dim=128,
                                   head_v_dim=128, chunk_size=16, max_draft_tokens=4)
    assert shapes == ((20, 8, 128), (20, 8), (8,), (20, 4, 128))
    assert kvbuffer_state_dtypes(torch.bfloat16) == (torch.float32, torch.float32, torch.int32,
                                                      torch.bfloat16)
    stock = MambaStateShapeCalculator.gated_delta_net_state_shape(4, 16, 32, 128, 128, 4, 4)
    all_shapes = tuple(stock) + shapes
    dtypes = (torch.bfloat16, torch.float32) + kvbuffer_state_dtypes(torch.bfloat16)
    offs = state_byte_offsets(all_shapes, dtypes)
    assert all(o % 16 == 0 for o in offs), offs
    check_page_layout(all_shapes, dtypes, page_size=offs[-1] + 20 * 4 * 128 * 2 + 64)


def test_layout_errors():
    with pytest.raises(ValueError, match=r"num_v_heads: expected divisible by tp_size=4, got 6"):
        kvbuffer_state_shapes(tp_size=4, num_k_heads=4, num_v_heads=6, head_k_dim=8,
                              head_v_dim=8, chunk_size=4)
    with pytest.raises(ValueError, match=r"state 1 byte offset: expected a multiple of 4"):
        check_page_layout(((3,), (2,)), (torch.bfloat16, torch.float32))
    with pytest.raises(ValueError, match=r"page size: expected a multiple of 4"):
        check_page_layout(((2,), (2,)), (torch.float32, torch.float32), page_size=18)
    with pytest.raises(ValueError, match=r"kv_cache: expected 6 states"):
        cache_from_layer_states((torch.zeros(1), torch.zeros(1)), chunk_size=4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernels_on_vllm_bound_page_views(backend):
    tp, H, HV, K, V, C, D = 2, 4, 8, 16, 16, 4, 2     # per rank: Hr=2, HVr=4
    num_blocks, pad = 7, 48
    layer, raw, shapes, dtypes, content = _layer_states(tp, H, HV, K, V, C, D, torch.float32,
                                                        num_blocks, pad)
    cache = cache_from_layer_states(layer.kv_cache, chunk_size=C, max_draft_tokens=D)
    assert cache.state.shape == (num_blocks, HV // tp, V, K)
    assert cache.state.stride(0) == content + pad >> 2          # page stride, in fp32 elements
    assert cache.meta.shape == (num_blocks, 8) and cache.meta.dtype == torch.int32

    before = raw.clone()
    slots = torch.tensor([5, 2], dtype=torch.int32)             # vLLM block ids
    reset_slots(cache, slots)
    gen = torch.Generator().manual_seed(1)
    Hr, HVr = H // tp, HV // tp
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)                 # sequences of 6 and 3 tokens
    q = torch.randn(9, Hr, K, generator=gen)
    k = torch.randn(9, Hr, K, generator=gen)
    v = torch.randn(9, HVr, V, generator=gen)
    g = -torch.rand(9, HVr, generator=gen) * 0.5
    b = torch.rand(9, HVr, generator=gen)
    o = prefill(cache, slots, q, k, v, g, b, cu, backend=backend)
    ref, S = recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                        b.double(), cu_seqlens=cu)
    assert (o.double() - ref).abs().max() / ref.abs().max() < 2e-5
    for _ in range(5):
        q1, k1 = torch.randn(2, Hr, K, generator=gen), torch.randn(2, Hr, K, generator=gen)
        v1 = torch.randn(2, HVr, V, generator=gen)
        g1, b1 = -torch.rand(2, HVr, generator=gen) * 0.5, torch.rand(2, HVr, generator=gen)
        o1 = decode(cache, slots, q1, k1, v1, g1, b1, backend=backend)
        ref1, S = recurrent_gated_delta_rule(q1.double(), k1.double(), v1.double(), g1.double(),
                                             b1.double(), cu_seqlens=torch.tensor([0, 1, 2]),
                                             initial_state=S)
        assert (o1.double() - ref1).abs().max() / ref1.abs().max() < 2e-5

    # Bytes the kernels may write: the ssm state and the four KVBuffer states of blocks 5 and 2.
    offs = state_byte_offsets(shapes, dtypes)
    conv_bytes = offs[1]
    changed = (raw != before).squeeze(1).squeeze(1)             # [blocks, page]
    assert not changed[:, :conv_bytes].any(), "conv state bytes changed"
    assert not changed[:, content:].any(), "page padding changed"
    untouched = [i for i in range(num_blocks) if i not in (5, 2)]
    assert not changed[untouched].any(), "another block's page changed"
    assert changed[[5, 2], conv_bytes:content].any()
