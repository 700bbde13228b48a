"""Triton backend vs the float64 recurrence (and so vs the torch backend), small shapes.

On a machine without a GPU these run under TRITON_INTERPRET=1 (set by tests/conftest.py) in fp32
and fp16 (the interpreter's bf16 is broken); on a GPU they run compiled. Shapes stay small so the
interpreted suite takes seconds, not minutes.
"""

import os

import pytest
import torch

from vllm_kvbuffer.kernels import allocate_cache, decode, prefill, reset_slots, verify

from .scenario import Dims, Scenario, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (set by tests/conftest.py)",
                allow_module_level=True)

# (output tol, state tol) per input dtype: fp32 arithmetic everywhere; fp16 outputs are rounded.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-5)}

DIMS = [
    Dims(H=1, HV=2, K=8, V=4, C=4, D=2, S=7),        # HV/H = 2
    Dims(H=2, HV=2, K=12, V=40, C=8, D=3, S=6),      # HV/H = 1, K != V, two V tiles
    Dims(H=2, HV=4, K=5, V=7, C=16, D=5, S=9),       # odd sizes, C=16
    Dims(H=1, HV=1, K=16, V=16, C=1, D=1, S=6),      # flush on every token
]


# fp32 on every shape; fp16 inputs (rounded on load, fp32 arithmetic: nothing shape-dependent)
# on the two cheapest, which between them cover HV/H = 1 and 2, C = 1 and 4, flushes on every token.
CASES = [(d, torch.float32) for d in DIMS] + [(DIMS[0], torch.float16), (DIMS[3], torch.float16)]


@pytest.mark.parametrize("d,dtype", CASES, ids=lambda x: (
    {torch.float32: "fp32", torch.float16: "fp16"}[x] if isinstance(x, torch.dtype)
    else f"H{x.H}-HV{x.HV}-K{x.K}-V{x.V}-C{x.C}-D{x.D}"))
def test_triton_random_interleavings(d, dtype):
    tol_o, tol_s = TOL[dtype]
    sc = Scenario(d, backend="triton", dtype=dtype, state_dtype=torch.float32, device=DEVICE,
                  strided=d.C == 8, seed=11 * d.C + d.V)
    sc.run(steps=12, tol_out=tol_o, tol_state=tol_s, min_tokens_per_slot=2 * d.C + 2)
    assert min(sc.processed.values()) >= 2 * d.C


def test_triton_matches_torch_backend_bitwise_cursor():
    """Same inputs through both backends: same cursors, outputs within fp32 rounding."""
    d = dict(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, chunk_size=4,
             max_draft_tokens=3)
    caches = {b: allocate_cache(6, **d, device=DEVICE) for b in ("torch", "triton")}
    slots = torch.tensor([5, 0, 3], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(5)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(DEVICE)

    for c in caches.values():
        reset_slots(c, slots)
    T = 10
    ins = (rnd(T, 2, 8), rnd(T, 2, 8), rnd(T, 4, 8), -rnd(T, 4).abs() * 0.3,
           torch.rand(T, 4, generator=gen).to(DEVICE))
    cu = torch.tensor([0, 6, 6, 10], dtype=torch.int32, device=DEVICE)
    outs = {b: prefill(c, slots, *ins, cu, backend=b) for b, c in caches.items()}
    assert rel_err(outs["triton"], outs["torch"]) < 2e-5
    for _ in range(9):
        ins = (rnd(3, 2, 8), rnd(3, 2, 8), rnd(3, 4, 8), -rnd(3, 4).abs() * 0.3,
               torch.rand(3, 4, generator=gen).to(DEVICE))
        outs = {b: decode(c, slots, *ins, backend=b) for b, c in caches.items()}
        assert rel_err(outs["triton"], outs["torch"]) < 2e-5
        assert torch.equal(caches["triton"].meta, caches["torch"].meta)
    ins = (rnd(3, 4, 2, 8), rnd(3, 4, 2, 8), rnd(3, 4, 4, 8), -rnd(3, 4, 4).abs() * 0.3,
           torch.rand(3, 4, 4, generator=gen).to(DEVICE))
    outs = {b: verify(c, slots, *ins, backend=b) for b, c in caches.items()}
    assert rel_err(outs["triton"], outs["torch"]) < 2e-5
    assert torch.equal(caches["triton"].meta, caches["torch"].meta)


def test_triton_rejects_non_unit_inner_stride():
    c = allocate_cache(2, num_k_heads=1, num_v_heads=1, head_k_dim=4, head_v_dim=4,
                       device=DEVICE)
    reset_slots(c, torch.tensor([0], dtype=torch.int32, device=DEVICE))
    q = torch.randn(1, 1, 8, device=DEVICE)[..., ::2]
    with pytest.raises(ValueError, match=r"input 0: expected unit stride in the last dim"):
        decode(c, torch.tensor([0], dtype=torch.int32, device=DEVICE), q,
               torch.randn(1, 1, 4, device=DEVICE), torch.randn(1, 1, 4, device=DEVICE),
               -torch.rand(1, 1, device=DEVICE), torch.rand(1, 1, device=DEVICE),
               backend="triton")


def test_triton_rejects_padding_inside_a_slot():
    """The kernels take one slot stride per pool tensor: padding inside a slot is refused before
    anything runs (vLLM pads pages only between slots)."""
    c = allocate_cache(3, num_k_heads=1, num_v_heads=2, head_k_dim=4, head_v_dim=4,
                       device=DEVICE)
    page = torch.full((3, c.capacity, 2, 4 + 2), float("nan"), device=DEVICE)
    c.buf_u = page[..., :4]
    meta = c.meta.clone()
    slots = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    reset_slots(c, slots)
    with pytest.raises(ValueError, match=r"cache\.buf_u: expected contiguous slots \(strides "
                                         r"\(8, 4, 1\) inside a slot"):
        decode(c, slots, torch.randn(1, 1, 4, device=DEVICE), torch.randn(1, 1, 4, device=DEVICE),
               torch.randn(1, 2, 4, device=DEVICE), -torch.rand(1, 2, device=DEVICE),
               torch.rand(1, 2, device=DEVICE), backend="triton")
    assert torch.equal(c.meta[1:], meta[1:])
    assert torch.isnan(c.buf_u).all()


@pytest.mark.parametrize("splits", [1, 2], ids=["all-tiles-per-program", "two-programs"])
def test_decode_tile_loop_and_splits(splits, monkeypatch):
    """Large batches run one program per (sequence, head) looping over all V tiles; small ones
    split the tiles. Force both layouts (3 V tiles: V=40, BV=16; with 2 splits the second program
    also owns a tile past V) and check decode, flushes included, against the recurrence."""
    from vllm_kvbuffer.kernels import tuning

    monkeypatch.setitem(tuning.CONFIG_OVERRIDE, "decode", {"BV": 16, "splits": splits})
    d = Dims(H=2, HV=4, K=8, V=40, C=4, D=0, S=6)
    sc = Scenario(d, backend="triton", dtype=torch.float32, state_dtype=torch.float32,
                  device=DEVICE, seed=splits)
    sc.run(steps=10, tol_out=2e-5, tol_state=2e-5, min_tokens_per_slot=3 * d.C,
           ops=("prefill", "decode"), weights=(1, 6, 0, 0))
