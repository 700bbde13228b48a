"""Every ValueError branch of the public KVBuffer API, and that a rejected call changes nothing."""

import pytest
import torch

from vllm_kvbuffer.kernels import (
    KVBufferCache,
    accept,
    allocate_cache,
    decode,
    materialize_state,
    prefill,
    recurrent_gated_delta_rule,
    reset_slots,
    set_value_checks,
    value_checks_enabled,
    verify,
)
from vllm_kvbuffer.kernels.cache import META_LEN, META_PENDING

from .scenario import assert_bitwise_equal, snapshot

H, HV, K, V, C, D, S = 1, 2, 4, 3, 4, 2, 5
F = torch.float32


def mk(**kw):
    args = dict(num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, chunk_size=C,
                max_draft_tokens=D, dtype=F, state_dtype=F)
    args.update(kw)
    return allocate_cache(S, **args)


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


def tok(*lead, dtype=F):
    return (torch.randn(*lead, H, K, dtype=dtype), torch.randn(*lead, H, K, dtype=dtype),
            torch.randn(*lead, HV, V, dtype=dtype), -torch.rand(*lead, HV), torch.rand(*lead, HV))


# --- allocate_cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(num_k_heads=0), r"num_k_heads: expected >= 1, got 0"),
    (dict(num_v_heads=3, num_k_heads=2), r"num_v_heads: expected a multiple of num_k_heads=2"),
    (dict(head_k_dim=2.5), r"head_k_dim: expected an int, got float"),
    (dict(head_v_dim=True), r"head_v_dim: expected an int, got bool"),
    (dict(chunk_size=0), r"chunk_size: expected >= 1, got 0"),
    (dict(max_draft_tokens=-1), r"max_draft_tokens: expected >= 0, got -1"),
    (dict(dtype=torch.int8), r"dtype: expected one of .*got torch.int8"),
    (dict(state_dtype=torch.int32), r"state_dtype: expected one of .*got torch.int32"),
])
def test_allocate_cache_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        mk(**kw)


def test_allocate_cache_num_slots():
    with pytest.raises(ValueError, match=r"num_slots: expected >= 1, got 0"):
        allocate_cache(0, num_k_heads=1, num_v_heads=1, head_k_dim=1, head_v_dim=1)


# --- KVBufferCache built from views -------------------------------------------------------------
def _parts(**over):
    c = mk()
    parts = dict(state=c.state, buf_k=c.buf_k, buf_u=c.buf_u, buf_g=c.buf_g, meta=c.meta,
                 chunk_size=C, max_draft_tokens=D)
    parts.update(over)
    return parts


B = C + D


@pytest.mark.parametrize("over,match", [
    (dict(state=torch.zeros(S, HV, V)), r"state: expected 4-D \[S, HV, V, K\]"),
    (dict(buf_k=torch.zeros(S, B, H)), r"buf_k: expected 4-D \[S, B, H, K\]"),
    (dict(chunk_size=2.0), r"chunk_size: expected an int"),
    (dict(max_draft_tokens=-2), r"max_draft_tokens: expected >= 0"),
    (dict(buf_k=torch.zeros(S, B + 1, H, K)), r"buf_k.shape\[1\]: expected chunk_size \+ max"),
    (dict(buf_k=torch.zeros(S, B, H, K + 1)), r"buf_k.shape: expected \(5, 6, 1, 4\)"),
    (dict(buf_u=torch.zeros(S, B, HV, V + 1)), r"buf_u.shape: expected"),
    (dict(buf_g=torch.zeros(S, B, HV + 1)), r"buf_g.shape: expected"),
    (dict(meta=torch.zeros(S, 3, dtype=torch.int32)), r"meta.shape: expected \(5, 8\)"),
    (dict(buf_k=torch.zeros(S, B, 3, K), buf_g=torch.zeros(S, B, HV),
          ), r"num_v_heads: expected a multiple of num_k_heads=3"),
    (dict(state=torch.zeros(S, HV, V, K, dtype=torch.int32)), r"state.dtype: expected one of"),
    (dict(buf_k=torch.zeros(S, B, H, K, dtype=torch.int8)), r"buf_k.dtype: expected one of"),
    (dict(buf_u=torch.zeros(S, B, HV, V, dtype=torch.float64)),
     r"buf_u.dtype: expected torch.float32"),
    (dict(buf_g=torch.zeros(S, B, HV, dtype=torch.float16)),
     r"buf_g.dtype: expected torch.float32"),
    (dict(meta=torch.zeros(S, 8, dtype=torch.int64)), r"meta.dtype: expected torch.int32"),
    (dict(buf_u=torch.zeros(S, B, HV, V, device="meta")), r"buf_u.device: expected cpu, got meta"),
])
def test_cache_view_errors(over, match):
    with pytest.raises(ValueError, match=match):
        KVBufferCache(**_parts(**over))


# --- slots --------------------------------------------------------------------------------------
@pytest.mark.parametrize("slots,match", [
    (torch.tensor([0, 1], dtype=torch.float32), r"slots.dtype: expected one of"),
    (torch.zeros(2, 1, dtype=torch.int32), r"slots.shape: expected \('\*',\), got \(2, 1\)"),
    (i32(0, S), r"slots values: expected in \[negative \(padding\) or 0, 5\), got \[5\]"),
    (i32(1, 3, 1), r"slots values: expected distinct slot ids .*got \[1\]"),
    (torch.tensor([0], dtype=torch.int32, device="meta"), r"slots.device: expected cpu"),
    ([0, 1], r"slots: expected a torch.Tensor, got list"),
])
def test_slot_errors(slots, match):
    c = mk()
    with pytest.raises(ValueError, match=match):
        decode(c, slots, *tok(2))


def test_reset_slots_errors_and_duplicates_allowed():
    c = mk()
    reset_slots(c, i32(1, 1, -1))                   # duplicates and padding are fine for reset
    with pytest.raises(ValueError, match=r"slots values: expected in"):
        reset_slots(c, i32(7))


# --- token inputs -------------------------------------------------------------------------------
def test_decode_input_errors():
    c = mk()
    sl = i32(0, 1)
    q, k, v, g, b = tok(2)
    cases = [
        ((q[:, :, :3], k, v, g, b), r"q.shape: expected \(2, 1, 4\), got \(2, 1, 3\)"),
        ((q, k.double(), v, g, b), r"k.dtype: expected torch.float32, got torch.float64"),
        ((q.half(), k, v, g, b), r"q.dtype: expected k.dtype = torch.float32, got torch.float16"),
        ((q, k, v.half(), g, b), r"v.dtype: expected torch.float32, got torch.float16"),
        ((q, k, v[:, :1], g, b), r"v.shape: expected \(2, 2, 3\)"),
        ((q, k, v, g[:, :1], b), r"g.shape: expected \(2, 2\)"),
        ((q, k, v, g, b.int()), r"beta.dtype: expected one of"),
        ((q, k, v, g, b[:1]), r"beta.shape: expected \(2, 2\)"),
        ((q.to("meta"), k, v, g, b), r"q.device: expected cpu, got meta"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            decode(c, sl, *args)


def test_scale_backend_l2norm_cache_errors():
    c = mk()
    sl = i32(0)
    with pytest.raises(ValueError,
                       match=r"scale: expected a positive finite float or None, got -1"):
        decode(c, sl, *tok(1), scale=-1.0)
    with pytest.raises(ValueError, match=r"scale: expected .* got nan"):
        decode(c, sl, *tok(1), scale=float("nan"))
    with pytest.raises(ValueError,
                       match=r"backend: expected one of \('auto', 'torch', 'triton', 'cpu'\)"):
        decode(c, sl, *tok(1), backend="cuda")
    with pytest.raises(ValueError, match=r"use_qk_l2norm: expected a bool, got 1"):
        decode(c, sl, *tok(1), use_qk_l2norm=1)
    with pytest.raises(ValueError, match=r"cache: expected a KVBufferCache, got dict"):
        decode({}, sl, *tok(1))
    decode(c, sl, *tok(1), use_qk_l2norm=True)
    with pytest.raises(ValueError, match=r"use_qk_l2norm: expected True \(fixed by the first"):
        decode(c, sl, *tok(1), use_qk_l2norm=False)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match=r"TRITON_INTERPRET=1"):
        decode(mk(), i32(0), *tok(1), backend="triton")


def test_prefill_errors():
    c = mk()
    q, k, v, g, b = tok(5)
    with pytest.raises(ValueError, match=r"cu_seqlens.shape: expected \(3,\), got \(2,\)"):
        prefill(c, i32(0, 1), q, k, v, g, b, i32(0, 5))
    with pytest.raises(ValueError, match=r"cu_seqlens.dtype: expected one of"):
        prefill(c, i32(0), q, k, v, g, b, torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing from 0 to T=5"):
        prefill(c, i32(0, 1), q, k, v, g, b, i32(0, 4, 3))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing from 0 to T=5"):
        prefill(c, i32(0), q, k, v, g, b, i32(0, 4))
    with pytest.raises(ValueError, match=r"q.shape: expected \('\*', 1, 4\)"):
        prefill(c, i32(0), q[:, :, :2], k, v, g, b, i32(0, 5))
    with pytest.raises(ValueError, match=r"v.shape: expected \(5, 2, 3\)"):
        prefill(c, i32(0), q, k, v[:4], g, b, i32(0, 5))


def test_verify_accept_errors():
    c = mk()
    sl = i32(2, 4)
    with pytest.raises(ValueError, match=r"q.shape\[1\] \(T\): expected 1 <= T <= "
                                         r"max_draft_tokens \+ 1 = 3, got 4"):
        verify(c, sl, *tok(2, D + 2))
    with pytest.raises(ValueError, match=r"q.shape: expected \(2, '\*', 1, 4\)"):
        verify(c, sl, *tok(3, 2))
    with pytest.raises(ValueError, match=r"slots: expected slots with tentative tokens"):
        accept(c, sl, i32(1, 1))
    verify(c, sl, *tok(2, 3))
    with pytest.raises(ValueError,
                       match=r"num_accepted: expected values in 1..T .*slot 4: 4 \(T=3\)"):
        accept(c, sl, i32(1, 4))
    with pytest.raises(ValueError, match=r"num_accepted: expected values in 1..T .*slot 2: 0"):
        accept(c, sl, i32(0, 1))
    with pytest.raises(ValueError, match=r"num_accepted.shape: expected \(2,\)"):
        accept(c, sl, i32(1))
    with pytest.raises(ValueError, match=r"num_accepted.dtype: expected one of"):
        accept(c, sl, torch.tensor([1.0, 1.0]))
    # Uncommitted verify tokens: decode / prefill / verify on those slots are errors.
    with pytest.raises(ValueError,
                       match=r"slots: expected slots without uncommitted verify tokens \(decode"):
        decode(c, i32(4), *tok(1))
    with pytest.raises(ValueError, match=r"without uncommitted verify tokens \(prefill"):
        prefill(c, i32(2), *tok(3), i32(0, 3))
    with pytest.raises(ValueError, match=r"without uncommitted verify tokens \(verify"):
        verify(c, i32(2), *tok(1, 2))
    accept(c, sl, i32(3, 1))
    decode(c, sl, *tok(2))


def test_capacity_error():
    c = mk()
    reset_slots(c, i32(0))
    c.meta[0, META_LEN] = C + D                        # a corrupted / foreign cursor
    with pytest.raises(ValueError, match=r"slots: expected room for 1 more buffered tokens "
                                         r"\(capacity 6\), got full slots \[0\]"):
        decode(c, i32(0), *tok(1))


def test_rejected_call_changes_nothing():
    """A batch with one bad slot fails whole, before any slot of it is written."""
    c = mk()
    sl = i32(0, 1, 2)
    reset_slots(c, sl)
    prefill(c, sl, *tok(9), i32(0, 3, 6, 9))
    verify(c, i32(1), *tok(1, 2))                       # slot 1 now has tentative tokens
    before = snapshot(c, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"pending tokens in slots \[1\]"):
        decode(c, sl, *tok(3))
    assert_bitwise_equal(before, snapshot(c, [0, 1, 2, 3, 4]))
    assert int(c.meta[1, META_PENDING]) == 2


def test_value_checks_switch():
    """With value checks off (CUDA-graph serving), shape checks still run; value checks do not."""
    c = mk()
    with set_value_checks(False):
        with pytest.raises(ValueError, match=r"q.shape"):
            decode(c, i32(0), *tok(2))
        reset_slots(c, i32(0, 1))
        decode(c, i32(0, 1), *tok(2))                   # no host sync needed
    with pytest.raises(ValueError, match=r"distinct slot ids"):
        decode(c, i32(0, 0), *tok(2))


def test_set_value_checks_plain_call_and_context_manager():
    """Like ``torch.set_grad_enabled``: a plain call switches the checks until switched back;
    ``with`` restores the previous setting on exit, also on an exception and when nested."""
    c = mk()
    reset_slots(c, i32(0, 1))
    assert value_checks_enabled()
    try:
        set_value_checks(False)
        assert not value_checks_enabled()
        decode(c, i32(0, 0), *tok(2))                   # duplicate slots: not checked now
        with set_value_checks(True):
            assert value_checks_enabled()
            with pytest.raises(ValueError, match=r"distinct slot ids"):
                decode(c, i32(0, 0), *tok(2))
            with set_value_checks(False):
                assert not value_checks_enabled()
            assert value_checks_enabled()
        assert not value_checks_enabled()               # back to the plain call's setting
    finally:
        set_value_checks(True)
    assert value_checks_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with set_value_checks(False):
            raise RuntimeError("boom")
    assert value_checks_enabled()
    with pytest.raises(ValueError, match=r"distinct slot ids"):
        decode(c, i32(0, 0), *tok(2))


def test_materialize_state_padding_and_errors():
    c = mk(dtype=torch.float64, state_dtype=torch.float64)
    reset_slots(c, i32(0))
    S = materialize_state(c, i32(-1, 0))
    assert S.dtype == torch.float64 and S.shape == (2, HV, K, V) and torch.all(S == 0)
    with pytest.raises(ValueError, match=r"slots values"):
        materialize_state(c, i32(9))


def test_recurrence_errors():
    q, k, v, g, b = tok(4)
    with pytest.raises(ValueError, match=r"k.shape: expected \(4, 1, 4\)"):
        recurrent_gated_delta_rule(q, k[:3], v, g, b)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing from 0 to T=4"):
        recurrent_gated_delta_rule(q, k, v, g, b, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"initial_state.shape: expected \(1, 2, 4, 3\)"):
        recurrent_gated_delta_rule(q, k, v, g, b, initial_state=torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError, match=r"v.shape\[1\] \(HV\): expected a multiple of H=2, got 3"):
        recurrent_gated_delta_rule(torch.randn(4, 2, 4), torch.randn(4, 2, 4),
                                   torch.randn(4, 3, 3), torch.zeros(4, 3), torch.zeros(4, 3))


def test_beta_bound_follows_the_layer():
    """beta above the cache's beta_max is refused before anything is written; a cache for a layer
    that allows negative eigenvalues (OLMo Hybrid: beta = 2 sigmoid(b), beta_max 2) accepts beta
    in (0, 2), and its outputs across a flush equal the float64 recurrence."""
    q, k, v, g, _ = tok(1)
    c = mk()
    reset_slots(c, i32(0))
    before = snapshot(c, list(range(S)))
    with pytest.raises(ValueError, match=r"beta: expected values in \[0, beta_max=1.0\]"):
        decode(c, i32(0), q, k, v, g, torch.full((1, HV), 1.5))
    assert_bitwise_equal(snapshot(c, list(range(S))), before)
    with pytest.raises(ValueError, match=r"beta_max: expected 1.0 .* or 2.0"):
        mk(beta_max=1.5)

    f64 = torch.float64
    c = mk(dtype=f64, state_dtype=f64, beta_max=2.0)
    reset_slots(c, i32(3))
    T = C + 3                                     # prefill crosses one flush, then two decodes
    g_ = torch.Generator().manual_seed(0)
    q, k = (torch.randn(T + 2, H, K, dtype=f64, generator=g_) for _ in range(2))
    v = torch.randn(T + 2, HV, V, dtype=f64, generator=g_)
    gg = -torch.rand(T + 2, HV, dtype=f64, generator=g_)
    beta = 1.0 + torch.rand(T + 2, HV, dtype=f64, generator=g_)       # in (1, 2)
    out = [prefill(c, i32(3), q[:T], k[:T], v[:T], gg[:T], beta[:T],
                   torch.tensor([0, T], dtype=torch.int32), backend="torch")]
    for t in (T, T + 1):
        out.append(decode(c, i32(3), q[t:t + 1], k[t:t + 1], v[t:t + 1], gg[t:t + 1],
                          beta[t:t + 1], backend="torch"))
    ref, _ = recurrent_gated_delta_rule(q, k, v, gg, beta)
    torch.testing.assert_close(torch.cat(out), ref, rtol=1e-10, atol=1e-10)
