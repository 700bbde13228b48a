"""Qwen3-Next-sized GPU checks of the Triton backend (skipped, with the reason, without CUDA).

Preset: H=16 key heads, HV=32 value heads, K=V=128 (TP 1) and its TP 4 head split (H=4, HV=8),
bf16 inputs, fp32 and bf16 state, 4,096 decode steps against the float64 recurrence fed the same
bf16-rounded inputs.

Stated bounds (relative max error over the whole run):
  fp32 state: outputs 1e-2 (they are rounded to bf16), state 1e-4;
  bf16 state: outputs 3e-2, state 3e-2 (the state is rounded to bf16 at every flush).
"""

import pytest
import torch

from vllm_kvbuffer.kernels import (
    accept,
    allocate_cache,
    decode,
    materialize_state,
    recurrent_gated_delta_rule,
    reset_slots,
    set_value_checks,
    verify,
)

from .scenario import Dims, Scenario, rel_err

pytestmark = pytest.mark.gpu(reason="needs a CUDA device; CPU CI runs the interpreted tests")

BOUNDS = {torch.float32: (1e-2, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def qwen3_next_gates(N, HV, gen, device):
    """g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), as the model computes them."""
    A_log = torch.log(torch.empty(HV).uniform_(1, 16, generator=gen)).to(device)
    dt_bias = torch.randn(HV, generator=gen).to(device)
    a = torch.randn(N, HV, generator=gen).to(device)
    b = torch.randn(N, HV, generator=gen).to(device)
    g = -torch.exp(A_log) * torch.nn.functional.softplus(a + dt_bias) * 0.05
    return g.float(), torch.sigmoid(b).float()


@pytest.mark.parametrize("tp", [1, 4])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qwen3_next_long_decode(tp, state_dtype):
    H, HV, K, V, C, N, steps = 16 // tp, 32 // tp, 128, 128, 16, 6, 4096
    dev = "cuda"
    gen = torch.Generator().manual_seed(tp)
    cache = allocate_cache(40, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, dtype=torch.bfloat16, state_dtype=state_dtype,
                           device=dev)
    slots = torch.randperm(40, generator=gen)[:N].to(torch.int32).to(dev)
    reset_slots(cache, slots)
    untouched = sorted(set(range(40)) - set(slots.tolist()))
    before = cache.state[untouched].clone()
    S = torch.zeros(N, HV, K, V, dtype=torch.float64, device=dev)
    cu = torch.arange(N + 1, dtype=torch.int32, device=dev)
    bound_o, bound_s = BOUNDS[state_dtype]
    err_o = err_s = 0.0
    with set_value_checks(False):
        for t in range(steps):
            q = torch.randn(N, H, K, generator=gen).to(dev, torch.bfloat16)
            k = torch.randn(N, H, K, generator=gen).to(dev, torch.bfloat16)
            v = torch.randn(N, HV, V, generator=gen).to(dev, torch.bfloat16)
            g, b = qwen3_next_gates(N, HV, gen, dev)
            o = decode(cache, slots, q, k, v, g, b, backend="triton")
            ref, S = recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                                b.double(), cu_seqlens=cu, initial_state=S)
            err_o = max(err_o, rel_err(o, ref))
            if t % 512 == 511:
                err_s = max(err_s, rel_err(materialize_state(cache, slots), S))
    assert err_o <= bound_o, err_o
    assert err_s <= bound_s, err_s
    assert torch.equal(cache.state[untouched].view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qwen3_next_interleavings(state_dtype):
    """Prefill / decode / verify(D=4) / accept interleavings at the real head sizes (TP 4)."""
    d = Dims(H=4, HV=8, K=128, V=128, C=16, D=4, S=12)
    bound_o, bound_s = BOUNDS[state_dtype]
    sc = Scenario(d, backend="triton", dtype=torch.bfloat16, state_dtype=state_dtype,
                  device="cuda", strided=True, seed=3)
    sc.run(steps=40, tol_out=bound_o, tol_state=bound_s, min_tokens_per_slot=3 * d.C)


def test_decode_verify_accept_capture_in_cuda_graphs():
    """With value checks off, decode and verify+accept do no host sync and allocate nothing
    data-dependent: both capture in CUDA graphs, and replays match eager runs on a twin pool."""
    H, HV, K, V, C, D, N = 4, 8, 128, 128, 8, 3, 5
    dev = "cuda"
    gen = torch.Generator().manual_seed(9)
    caches = [allocate_cache(12, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                             chunk_size=C, max_draft_tokens=D, dtype=torch.bfloat16,
                             device=dev) for _ in range(2)]
    slots = torch.tensor([7, 1, -1, 4, 10], dtype=torch.int32, device=dev)
    for c in caches:
        reset_slots(c, slots)

    def inputs(*lead):
        return (torch.randn(*lead, H, K, generator=gen).to(dev, torch.bfloat16),
                torch.randn(*lead, H, K, generator=gen).to(dev, torch.bfloat16),
                torch.randn(*lead, HV, V, generator=gen).to(dev, torch.bfloat16),
                (-torch.rand(*lead, HV, generator=gen) * 0.2).to(dev),
                torch.rand(*lead, HV, generator=gen).to(dev))

    dec_in = [t.clone() for t in inputs(N)]
    ver_in = [t.clone() for t in inputs(N, D + 1)]
    m = torch.tensor([1, D + 1, 1, 2, 3], dtype=torch.int32, device=dev)
    with set_value_checks(False):
        # Warm up (compiles the kernels) on the eager twin, then capture on the other pool.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            decode(caches[0], slots, *dec_in, backend="triton")
            verify(caches[0], slots, *ver_in, backend="triton")
            accept(caches[0], slots, m, backend="triton")
        torch.cuda.current_stream().wait_stream(s)
        for c in caches:
            reset_slots(c, slots)
        g_dec, g_ver = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_dec):
            o_dec = decode(caches[1], slots, *dec_in, backend="triton")
        with torch.cuda.graph(g_ver):
            o_ver = verify(caches[1], slots, *ver_in, backend="triton")
            accept(caches[1], slots, m, backend="triton")
        for c in caches:                       # capture does not run the kernels; start equal
            reset_slots(c, slots)
        for step in range(3 * C):
            for t, src in zip(dec_in + ver_in, inputs(N) + inputs(N, D + 1)):
                t.copy_(src)
            ref_dec = decode(caches[0], slots, *dec_in, backend="triton")
            g_dec.replay()
            ref_ver = verify(caches[0], slots, *ver_in, backend="triton")
            accept(caches[0], slots, m, backend="triton")
            g_ver.replay()
            torch.cuda.synchronize()
            assert torch.equal(o_dec, ref_dec), step
            assert torch.equal(o_ver, ref_ver), step
            assert torch.equal(caches[0].meta, caches[1].meta), step
    assert torch.equal(materialize_state(caches[0], slots[slots >= 0]),
                       materialize_state(caches[1], slots[slots >= 0]))
