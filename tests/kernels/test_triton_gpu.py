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
    allocate_cache,
    decode,
    materialize_state,
    recurrent_gated_delta_rule,
    reset_slots,
    set_value_checks,
)

from .scenario import Dims, Scenario, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device; CPU CI runs the interpreted tests")

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
