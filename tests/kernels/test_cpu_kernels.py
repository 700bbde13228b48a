"""The native CPU backend (``backend="cpu"``, a C++ extension) against the float64 recurrence and
the torch backend: the same random interleavings as the other backends, in float64, fp32, bf16 and
fp16.

The extension is built once (every dtype combination in one build, cached under
``TORCH_EXTENSIONS_DIR``); its first call in a fresh checkout takes about half a minute.
"""

import pytest
import torch

from vllm_kvbuffer.kernels import (
    accept,
    allocate_cache,
    decode,
    materialize_state,
    prefill,
    recurrent_gated_delta_rule,
    reset_slots,
    verify,
)
from vllm_kvbuffer.kernels.api import _resolve_backend
from vllm_kvbuffer.kernels.cache import META_HAS_STATE, KVBufferCache

from .scenario import Dims, Scenario, rel_err, snapshot

F64_TOL = 1e-10

# HV/H in {1, 2, 3}, K != V, odd sizes (tails of the four-row blocks), C = 1, 4, 16.
DIMS = [
    Dims(H=2, HV=2, K=5, V=7, C=1, D=3),
    Dims(H=2, HV=6, K=6, V=9, C=4, D=4),
    Dims(H=2, HV=4, K=12, V=7, C=16, D=5),
]


def _ids(d):
    return f"H{d.H}-HV{d.HV}-K{d.K}-V{d.V}-C{d.C}-D{d.D}"


@pytest.mark.parametrize("d", DIMS, ids=_ids)
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_float64_random_interleavings(d, strided):
    sc = Scenario(d, backend="cpu", strided=strided, seed=d.C * 31 + d.HV + strided)
    sc.run(steps=40, tol_out=F64_TOL, tol_state=F64_TOL, min_tokens_per_slot=10 * d.C + 4)
    assert min(sc.processed.values()) >= 10 * d.C


@pytest.mark.parametrize("mode", ["one", "all"])
def test_verify_accept_extremes(mode):
    d = Dims(H=2, HV=4, K=8, V=6, C=4, D=4)
    sc = Scenario(d, backend="cpu", seed=7)
    for _ in range(20):
        sc.op_verify_accept(F64_TOL, accept_mode=mode)
        sc.check_states(F64_TOL)


def test_custom_scale_and_no_l2norm():
    d = Dims(H=1, HV=2, K=6, V=5, C=4, D=2)
    sc = Scenario(d, backend="cpu", seed=3, scale=0.37)
    sc.run(steps=20, tol_out=F64_TOL, tol_state=F64_TOL, min_tokens_per_slot=16)

    cache = allocate_cache(3, num_k_heads=1, num_v_heads=2, head_k_dim=6, head_v_dim=5,
                           chunk_size=4, dtype=torch.float64, state_dtype=torch.float64)
    slots = torch.tensor([2], dtype=torch.int32)
    reset_slots(cache, slots)
    T = 11
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(T, 1, 6, generator=gen, dtype=torch.float64) * 0.3
    k = torch.randn(T, 1, 6, generator=gen, dtype=torch.float64) * 0.3
    v = torch.randn(T, 2, 5, generator=gen, dtype=torch.float64)
    g = -torch.rand(T, 2, generator=gen, dtype=torch.float64)
    b = torch.rand(T, 2, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, T], dtype=torch.int32)
    o = prefill(cache, slots, q, k, v, g, b, cu, use_qk_l2norm=False, backend="cpu")
    ref_o, ref_S = recurrent_gated_delta_rule(q, k, v, g, b, use_qk_l2norm=False)
    assert rel_err(o, ref_o) < F64_TOL
    assert rel_err(materialize_state(cache, slots, backend="cpu"), ref_S) < F64_TOL


# (output tol, state tol): fp32 arithmetic; outputs rounded to the input dtype; a bf16 / fp16
# state is rounded at every flush (the README's bound for a bf16 state is 2e-2).
@pytest.mark.parametrize("dtype,state_dtype,tol_o,tol_s", [
    (torch.float32, torch.float32, 2e-5, 2e-5),
    (torch.bfloat16, torch.float32, 1e-2, 2e-5),
    (torch.bfloat16, torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, torch.float16, 3e-3, 3e-3),
], ids=["fp32", "bf16-in", "bf16-state", "fp16"])
def test_low_precision_random_interleavings(dtype, state_dtype, tol_o, tol_s):
    d = Dims(H=2, HV=4, K=16, V=12, C=4, D=3, S=7)
    sc = Scenario(d, backend="cpu", dtype=dtype, state_dtype=state_dtype,
                  strided=dtype == torch.bfloat16, seed=5)
    sc.run(steps=16, tol_out=tol_o, tol_state=tol_s, min_tokens_per_slot=4 * d.C)
    assert sc.max_err > 0


def test_matches_torch_backend():
    """Same fp32 inputs through both backends: same cursors, buffers and outputs within fp32
    rounding (the torch backend is the reference the Triton kernels are held to as well)."""
    d = {"num_k_heads": 2, "num_v_heads": 4, "head_k_dim": 16, "head_v_dim": 8,
         "chunk_size": 4, "max_draft_tokens": 3}
    caches = {b: allocate_cache(6, **d) for b in ("torch", "cpu")}
    slots = torch.tensor([5, 0, 3], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)

    def rnd(*s):
        return torch.randn(*s, generator=gen)

    def gates(*s):
        return -rnd(*s).abs() * 0.3, torch.rand(*s, generator=gen)

    def same(outs):
        assert rel_err(outs["cpu"], outs["torch"]) < 2e-5
        assert torch.equal(caches["cpu"].meta, caches["torch"].meta)

    for c in caches.values():
        reset_slots(c, slots)
    ins = (rnd(10, 2, 16), rnd(10, 2, 16), rnd(10, 4, 8), *gates(10, 4))
    cu = torch.tensor([0, 6, 6, 10], dtype=torch.int32)
    same({b: prefill(c, slots, *ins, cu, backend=b) for b, c in caches.items()})
    for _ in range(9):
        ins = (rnd(3, 2, 16), rnd(3, 2, 16), rnd(3, 4, 8), *gates(3, 4))
        same({b: decode(c, slots, *ins, backend=b) for b, c in caches.items()})
    ins = (rnd(3, 4, 2, 16), rnd(3, 4, 2, 16), rnd(3, 4, 4, 8), *gates(3, 4, 4))
    same({b: verify(c, slots, *ins, backend=b) for b, c in caches.items()})
    acc = torch.tensor([4, 1, 2], dtype=torch.int32)
    for b, c in caches.items():
        accept(c, slots, acc, backend=b)
    assert torch.equal(caches["cpu"].meta, caches["torch"].meta)
    idx = slots.long()
    for name in ("buf_k", "buf_u", "buf_g"):
        L = int(caches["torch"].meta[idx, 0].max())
        a, b = (getattr(caches[x], name)[idx, :L] for x in ("cpu", "torch"))
        mask = torch.arange(L)[None, :] < caches["torch"].meta[idx, 0, None]
        assert rel_err(a[mask], b[mask]) < 2e-5, name
    assert rel_err(materialize_state(caches["cpu"], slots, backend="cpu"),
                   materialize_state(caches["torch"], slots, backend="torch")) < 2e-5


@pytest.fixture
def one_thread():
    """Tiny torch ops (the reference recurrence) on one thread: on a busy 2-core machine each
    parallel einsum otherwise waits milliseconds for a descheduled OpenMP thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_long_fp32_decode_drift(one_thread):
    """1,024 fp32 decode steps (64 flushes at C=16): within the README's fp32 bound and at most
    2x the fp32 token-by-token recurrence's own drift."""
    H, HV, K, V, N, steps = 2, 4, 32, 32, 3, 1024
    gen = torch.Generator().manual_seed(4)
    cache = allocate_cache(4, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=16)
    slots = torch.tensor([3, 0, 2], dtype=torch.int32)
    reset_slots(cache, slots)
    S64 = torch.zeros(N, HV, K, V, dtype=torch.float64)
    S32 = torch.zeros(N, HV, K, V)
    cu = torch.arange(N + 1, dtype=torch.int32)
    err = err32 = 0.0
    for t in range(steps):
        q, k = torch.randn(N, H, K, generator=gen), torch.randn(N, H, K, generator=gen)
        v = torch.randn(N, HV, V, generator=gen)
        g = -torch.rand(N, HV, generator=gen) * 0.05
        b = torch.rand(N, HV, generator=gen) * 0.9 + 0.05
        o64, S64 = recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                              b.double(), cu_seqlens=cu, initial_state=S64)
        o32, S32 = recurrent_gated_delta_rule(q, k, v, g, b, cu_seqlens=cu, initial_state=S32)
        err32 = max(err32, rel_err(o32, o64))
        err = max(err, rel_err(decode(cache, slots, q, k, v, g, b, backend="cpu"), o64))
        if t % 256 == 255:
            err = max(err, rel_err(materialize_state(cache, slots, backend="cpu"), S64))
    assert err <= 5e-6 and err <= 2 * err32, (err, err32)


def test_decode_writes_state_only_at_flushes_and_reads_none_before():
    """Between flushes the state is never written; a slot that never flushed never reads its
    (inf-poisoned) state memory."""
    cache = allocate_cache(2, num_k_heads=2, num_v_heads=2, head_k_dim=4, head_v_dim=4,
                           chunk_size=5, dtype=torch.float64, state_dtype=torch.float64)
    slots = torch.tensor([0], dtype=torch.int32)
    reset_slots(cache, slots)
    cache.state.fill_(float("inf"))
    gen = torch.Generator().manual_seed(2)
    writes, prev = 0, cache.state[0].clone()
    for _ in range(20):
        q, k = (torch.randn(1, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        v = torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
        g, b = -torch.rand(1, 2, dtype=torch.float64), torch.rand(1, 2, dtype=torch.float64)
        assert torch.isfinite(decode(cache, slots, q, k, v, g, b, backend="cpu")).all()
        writes += not torch.equal(cache.state[0], prev)
        prev = cache.state[0].clone()
    assert writes == 20 // 5
    assert torch.isinf(cache.state[1]).all()      # the other slot: never touched


def test_strided_inputs_and_int64_slots():
    """q/k/v as row-strided views (how the layer slices them out of the conv output) and int64
    slot ids give the same result as contiguous copies."""
    H, HV, K, V, N = 2, 4, 8, 8, 3
    gen = torch.Generator().manual_seed(9)
    y = torch.randn(N, 2 * H * K + HV * V + 5, generator=gen)
    q = y[:, :H * K].reshape(N, H, K)
    k = y[:, H * K:2 * H * K].reshape(N, H, K)
    v = y[:, 2 * H * K:2 * H * K + HV * V].reshape(N, HV, V)
    g, b = -torch.rand(N, HV, generator=gen), torch.rand(N, HV, generator=gen)
    assert not q.is_contiguous()
    outs = []
    for contiguous, sdt in ((False, torch.int64), (True, torch.int32)):
        c = allocate_cache(5, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V)
        slots = torch.tensor([4, -1, 1], dtype=sdt)
        reset_slots(c, slots)
        args = [x.contiguous() if contiguous else x for x in (q, k, v, g, b)]
        outs.append(decode(c, slots, *args, backend="cpu"))
    assert torch.equal(outs[0], outs[1]) and torch.all(outs[0][1] == 0)


def test_rejects_bad_input_before_writing():
    c = allocate_cache(3, num_k_heads=1, num_v_heads=2, head_k_dim=4, head_v_dim=4)
    slots = torch.tensor([0, 2], dtype=torch.int32)
    reset_slots(c, slots)
    args = (torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 2, 4),
            -torch.rand(2, 2), torch.rand(2, 2))
    decode(c, slots, *args, backend="cpu")
    before = snapshot(c, [0, 1, 2])
    with pytest.raises(ValueError, match=r"k.dtype: expected torch.float32, got torch.bfloat16"):
        decode(c, slots, args[0], args[1].bfloat16(), *args[2:], backend="cpu")
    # A pool whose rows are not contiguous in K (not what vLLM allocates) is refused.
    wide = torch.zeros(3, 2, 4, 8)
    bad = KVBufferCache(state=wide[..., ::2], buf_k=c.buf_k, buf_u=c.buf_u, buf_g=c.buf_g,
                        meta=c.meta, chunk_size=c.chunk_size)
    with pytest.raises(ValueError, match=r"cache.state.stride\(-1\): expected 1 \(unit stride"):
        decode(bad, slots, *args, backend="cpu")
    after = snapshot(c, [0, 1, 2])
    for x, y in zip(before, after):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    assert torch.all(wide == 0)


def test_auto_resolves_to_cpu_and_threads_follow_torch():
    from vllm_kvbuffer.kernels import cpu_impl

    c = allocate_cache(2, num_k_heads=4, num_v_heads=8, head_k_dim=32, head_v_dim=32)
    assert _resolve_backend("auto", c) == "cpu"
    meta_cache = allocate_cache(2, num_k_heads=1, num_v_heads=1, head_k_dim=4, head_v_dim=4,
                                device="meta")
    with pytest.raises(NotImplementedError, match="backend='cpu' needs CPU tensors"):
        _resolve_backend("cpu", meta_cache)
    slots = torch.tensor([1], dtype=torch.int32)
    reset_slots(c, slots)
    prev = torch.get_num_threads()
    try:
        for n in (1, 2):
            # torch's intra-op pool (what vLLM's CPU worker sizes per rank) is the kernels' pool.
            torch.set_num_threads(n)
            decode(c, slots, torch.randn(1, 4, 32), torch.randn(1, 4, 32),
                   torch.randn(1, 8, 32), -torch.rand(1, 8), torch.rand(1, 8))
            assert cpu_impl.extension().num_threads() == n
        assert int(c.meta[1, META_HAS_STATE]) == 0
    finally:
        torch.set_num_threads(prev)


def test_extension_uses_torchs_openmp_runtime_and_is_named_for_the_cpu():
    """One OpenMP runtime in the process: the extension's parallel regions run on torch's pool,
    so no second team spin-waits on the cores torch's threads are bound to. The build's name
    carries the CPU's hash (it is compiled with -march=native)."""
    import subprocess
    import sys
    code = ("import torch\n"
            "from vllm_kvbuffer.kernels import cpu_impl\n"
            "before = cpu_impl.loaded_openmp_runtimes()\n"
            "cpu_impl.extension()\n"
            "print(len(before), len(cpu_impl.loaded_openmp_runtimes()))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["1", "1"], out
    from vllm_kvbuffer.kernels import cpu_impl
    assert cpu_impl.extension_name().startswith("vllm_kvbuffer_cpu_")
    assert cpu_impl.extension_name() == f"vllm_kvbuffer_cpu_{cpu_impl._cpu_tag()}"
    assert len(cpu_impl._cpu_tag()) == 10


def test_vectorised_exp_within_two_ulp_of_expf():
    """The conv's SiLU uses its own vectorisable exp (the library's expf is a call the compiler
    cannot vectorise without -ffast-math): within 2 ulp of the correctly rounded value over the
    range the SiLU feeds it, and NaN stays NaN."""
    from vllm_kvbuffer.kernels import cpu_impl
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_001), torch.randn(100_000) * 8])
    got = cpu_impl.extension().exp_vec(x)
    want = torch.exp(x.double())
    ulp = (want.float().nextafter(torch.tensor(float("inf"))) - want.float()).double()
    assert float(((got.double() - want).abs() / ulp).max()) <= 2.0
    assert torch.isnan(cpu_impl.extension().exp_vec(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gdn_gates_native_matches_the_formula(dtype):
    """``gdn_gates``' one native call against the float64 formula, strided inputs (as the layer's
    projections are views), ``beta_scale`` 1 and 2, softplus' linear branch (a + dt_bias > 20)
    included; the torch backend computes the same."""
    from vllm_kvbuffer.kernels import gdn_gates
    gen = torch.Generator().manual_seed(3)
    N, HV = 37, 12
    ab = (torch.randn(N, 2 * HV + 3, generator=gen) * 6).to(dtype)
    ab[0, :HV] = 25.0                               # softplus(z) = z above 20
    a, b = ab[:, :HV], ab[:, HV:2 * HV]
    A_log = (torch.rand(HV, generator=gen) * 2 - 3).to(dtype)
    dt_bias = torch.randn(HV, generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    for scale in (1.0, 2.0):
        z = a.double() + dt_bias.double()
        g_ref = -torch.exp(A_log.double()) * torch.where(z > 20, z, torch.log1p(torch.exp(z)))
        beta_ref = scale * torch.sigmoid(b.double())
        for backend in ("cpu", "torch"):
            g, beta = gdn_gates(A_log, dt_bias, a, b, beta_scale=scale, backend=backend)
            assert g.dtype == beta.dtype == acc and g.shape == beta.shape == (N, HV)
            assert rel_err(g, g_ref) < tol and rel_err(beta, beta_ref) < tol, backend


def test_gdn_gates_errors():
    from vllm_kvbuffer.kernels import gdn_gates
    a, b, w = torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"b.shape: expected \(3, 4\), got \(3, 5\)"):
        gdn_gates(w, w, a, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"A_log.shape: expected \(4,\), got \(5,\)"):
        gdn_gates(torch.zeros(5), w, a, b)
    with pytest.raises(ValueError, match="beta_scale: expected a positive finite float, got 0"):
        gdn_gates(w, w, a, b, beta_scale=0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        gdn_gates(w, w, a, b, backend="gpu")


def test_extension_builds_with_the_interpreters_ninja(monkeypatch, tmp_path):
    """Whichever PATH a process has (virtual environment activated or not), the build runs the
    same ninja: the one beside the interpreter when there is one, else PATH's."""
    import sys

    from vllm_kvbuffer.kernels import cpu_impl
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", f"/usr/bin:{bindir}:/bin")
    assert cpu_impl._ninja_first_path() == f"/usr/bin:{bindir}:/bin"      # no ninja there
    (bindir / "ninja").write_text("#!/bin/sh\n")
    (bindir / "ninja").chmod(0o755)
    assert cpu_impl._ninja_first_path() == f"{bindir}:/usr/bin:/bin"
