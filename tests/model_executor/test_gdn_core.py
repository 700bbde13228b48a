"""The layer core (conv cache + gates + KVBuffer kernels) against a float64 token-by-token model.

Each request's reference output for new tokens is the whole pipeline rerun from scratch over its
committed token stream plus the new tokens: zero-padded causal conv, SiLU, gates, and the
float64 recurrence. Batches mix real rows with vLLM's CUDA-graph padding rows (null block 0) in
the pool; untouched slots and the null block must stay bit-identical.

The graph-safe paths (decode_rows, spec_rows_uniform) are also run under a dispatch mode that
fails on any host synchronisation (``.item()``, ``.tolist()``, ``bool(tensor)``) or
data-dependent shape (``nonzero``, boolean masks): the CPU stand-in for "can be captured in a
CUDA graph". The capture and replay itself is in test_gdn_core_gpu.py.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_kvbuffer import kernels
from vllm_kvbuffer.kernels import allocate_cache, recurrent_gated_delta_rule
from vllm_kvbuffer.model_executor import gdn_core

H, HV, K, V, W, C, D = 2, 4, 8, 6, 4, 4, 3
DC = 2 * H * K + HV * V
S = 10
# tolerance per (backend, dtype): float64 torch and the native CPU backend (its conv and gates
# included) are exact up to rounding; the interpreted Triton kernels compute in fp32.
TOL = {"torch": 1e-10, "cpu": 1e-10, "triton": 2e-4}


def make_params(dtype, backend, gen):
    return gdn_core.GDNParams(
        conv_weight=(torch.randn(DC, W, generator=gen) * 0.5).to(dtype),
        conv_bias=(torch.randn(DC, generator=gen) * 0.1).to(dtype),
        activation="silu",
        A_log=torch.log(torch.empty(HV).uniform_(1, 4, generator=gen)).to(dtype),
        dt_bias=torch.randn(HV, generator=gen).to(dtype),
        num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, backend=backend)


def reference(p, xs, bs, as_):
    """float64 outputs ``[T, HV, V]`` for the token stream (x, b, a) of one request."""
    x = torch.stack(xs).double()
    w = p.conv_weight.double()
    full = torch.cat([torch.zeros(W - 1, DC, dtype=torch.float64), x])
    y = F.conv1d(full.t()[None], w[:, None, :], p.conv_bias.double(), groups=DC)[0].t()
    y = F.silu(y)
    q, k, v, _, _ = gdn_core.qkv_gates(p, y, torch.stack(bs).double(), torch.stack(as_).double())
    g = -torch.exp(p.A_log.double()) * F.softplus(torch.stack(as_).double()
                                                   + p.dt_bias.double())
    beta = torch.sigmoid(torch.stack(bs).double())
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta)
    return o


class Harness:
    """A pool, a conv cache, and the per-request committed streams of the reference."""

    def __init__(self, backend, dtype, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.dtype, self.backend = dtype, backend
        self.p = make_params(dtype, backend, self.gen)
        self.cache = allocate_cache(S, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                                    chunk_size=C, max_draft_tokens=D, dtype=dtype,
                                    state_dtype=dtype)
        # vLLM's pages hold whatever the last owner left: random, never NaN-free assumptions.
        self.conv = torch.randn(S, W - 1 + D, DC, generator=self.gen).to(dtype)
        self.cache.meta[:, gdn_core.META_CONV] = torch.randint(0, 3, (S,), generator=self.gen,
                                                               dtype=torch.int32)
        self.streams = {}        # block -> committed (x, b, a) rows
        self.tentative = {}      # block -> last verify's rows (accepted prefix commits later)

    def tokens(self, n):
        g = self.gen
        return (torch.randn(n, DC, generator=g).to(self.dtype),
                torch.randn(n, HV, generator=g).to(self.dtype),
                torch.randn(n, HV, generator=g).to(self.dtype))

    def snapshot(self):
        c = self.cache
        return [t.clone() for t in (c.state, c.buf_k, c.buf_u, c.buf_g, c.meta, self.conv)]

    def check_untouched(self, before, blocks):
        touched = set(int(b) for b in blocks if b > 0)
        keep = [s for s in range(S) if s not in touched]     # includes the null block 0
        after = self.snapshot()
        for name, x0, x1 in zip(("state", "buf_k", "buf_u", "buf_g", "meta", "conv"),
                                before, after):
            assert torch.equal(x0[keep].nan_to_num(7.0), x1[keep].nan_to_num(7.0)), (
                f"{name} of slots {keep} (not in the batch) changed")

    def expect(self, block, x, b, a, prefix=None):
        xs, bs, as_ = prefix if prefix is not None else self.streams.get(block, ([], [], []))
        n = x.shape[0]
        o = reference(self.p, list(xs) + list(x), list(bs) + list(b), list(as_) + list(a))
        return o[-n:]

    def compare(self, got, want):
        err = (got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)
        assert err < TOL[self.backend], f"relative error {err:.3e}"

    def commit(self, block, x, b, a):
        xs, bs, as_ = self.streams.setdefault(block, ([], [], []))
        xs.extend(x)
        bs.extend(b)
        as_.extend(a)

    # -- steps -------------------------------------------------------------------------------
    def varlen(self, rows):
        """rows: (block, n_tokens, fresh) with decodes (n=1, not fresh) first."""
        n_dec = 0
        while n_dec < len(rows) and rows[n_dec][1] == 1 and not rows[n_dec][2]:
            n_dec += 1
        toks = [self.tokens(n) for _, n, _ in rows]
        for (blk, _, fresh) in rows:
            if fresh:
                self.streams.pop(blk, None)
                self.tentative.pop(blk, None)
        pos = self.positions([r[0] for r in rows])
        x = torch.cat([t[0] for t in toks])
        b = torch.cat([t[1] for t in toks])
        a = torch.cat([t[2] for t in toks])
        cu = torch.tensor([0] + list(torch.tensor([n for _, n, _ in rows]).cumsum(0)),
                          dtype=torch.int32)
        blocks = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        has_init = torch.tensor([not f for _, _, f in rows])
        before = self.snapshot()
        out = gdn_core.varlen_rows(self.cache, self.conv, self.p, blocks, cu, n_dec, has_init,
                                   x, b, a, pos)
        self.check_untouched(before, blocks)
        for i, (blk, _n, _) in enumerate(rows):
            s, e = int(cu[i]), int(cu[i + 1])
            self.compare(out[s:e], self.expect(blk, *toks[i]))
            self.commit(blk, *toks[i])

    def decode(self, blocks):
        blocks_t = torch.tensor(blocks, dtype=torch.int64)
        x, b, a = self.tokens(len(blocks))
        before = self.snapshot()
        out = gdn_core.decode_rows(self.cache, self.conv, self.p, blocks_t, x, b, a)
        self.check_untouched(before, blocks)
        for i, blk in enumerate(blocks):
            if blk <= 0:
                assert torch.all(out[i] == 0), "padding row output"
                continue
            self.compare(out[i:i + 1], self.expect(blk, x[i:i + 1], b[i:i + 1], a[i:i + 1]))
            self.commit(blk, x[i:i + 1], b[i:i + 1], a[i:i + 1])

    def positions(self, blocks):
        """The sampler's verdict on each row's previous verify (a random accepted prefix,
        committed to the reference stream), and the rows' positions as vLLM reports them: the
        tokens each request has computed (committed) before this step."""
        for blk in blocks:
            tent = self.tentative.pop(blk, None) if blk > 0 else None
            if tent is not None:
                m = self.rng.randint(1, tent[0].shape[0])
                self.commit(blk, *(t[:m] for t in tent))
        ctx = [len(self.streams.get(blk, ([],))[0]) if blk > 0 else 0 for blk in blocks]
        return gdn_core.RowPositions(torch.tensor(ctx, dtype=torch.int32))

    def spec(self, rows):
        """rows: (block, T); uniform if all T equal (graph-safe path) else varlen."""
        blocks = [r[0] for r in rows]
        lens = [r[1] for r in rows]
        pos = self.positions(blocks)
        toks = [self.tokens(n) for n in lens]
        x = torch.cat([t[0] for t in toks])
        b = torch.cat([t[1] for t in toks])
        a = torch.cat([t[2] for t in toks])
        blocks_t = torch.tensor(blocks, dtype=torch.int64)
        before = self.snapshot()
        if len(set(lens)) == 1:
            out = gdn_core.spec_rows_uniform(self.cache, self.conv, self.p, blocks_t, pos,
                                             x, b, a, lens[0])
        else:
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            out = gdn_core.spec_rows_varlen(self.cache, self.conv, self.p, blocks_t, pos, cu,
                                            x, b, a)
        self.check_untouched(before, blocks)
        start = 0
        for blk, n, tk in zip(blocks, lens, toks):
            if blk > 0:
                self.compare(out[start:start + n], self.expect(blk, *tk))
                self.tentative[blk] = tk
            start += n


def _scenario(h: Harness) -> None:
    h.varlen([(3, 5, True), (5, 2, True), (7, 9, True)])          # prefills
    for _ in range(6):                                               # decodes with padding rows
        h.decode([5, 0, 3, 7, 0])
    h.varlen([(3, 1, False), (8, 3, True), (5, 4, False)])         # mixed decode + prefills
    for _ in range(5):                                               # uniform spec, D = 3
        h.spec([(3, D + 1), (5, D + 1), (0, D + 1), (7, D + 1), (8, D + 1), (0, D + 1)])
    for _ in range(4):                                               # ragged spec
        h.spec([(3, 1), (5, D + 1), (7, 2), (8, 3)])
    for _ in range(3):                                               # back to uniform
        h.spec([(8, 2), (7, 2), (0, 2), (3, 2), (5, 2)])
    # Requests with tentative tokens come back as plain rows (a prompt tail, a resumed request)
    # and commit by position first; a new request reuses a page that held tentative tokens.
    h.varlen([(8, 1, False), (3, 4, False), (7, 6, True)])
    h.spec([(8, D + 1), (3, D + 1), (7, D + 1), (5, D + 1)])
    committed = {blk: len(s[0]) for blk, s in h.streams.items() if blk != 7}   # 7: restarted
    assert min(committed.values()) >= 2 * C, committed              # several flushes each


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("cpu", torch.float64),
                                           ("triton", torch.float32)])
def test_core_matches_float64_pipeline(backend, dtype, monkeypatch):
    native = []
    if backend == "cpu":
        # The CPU backend's decode, uniform-verify and varlen rows run conv, window update and
        # gates in one native call (cpu_impl.conv_gates): record them so that a silent fallback
        # to the torch ops fails the test.
        from vllm_kvbuffer.kernels import cpu_impl
        real = cpu_impl.conv_gates

        def counted(*args, **kw):
            native.append("varlen" if kw.get("cu_seqlens") is not None else kw["T"])
            return real(*args, **kw)
        monkeypatch.setattr(cpu_impl, "conv_gates", counted)
    _scenario(Harness(backend, dtype))
    if backend == "cpu":
        assert {1, "varlen"} <= set(native) and D + 1 in native, native


class HostSyncDetector(TorchDispatchMode):
    """Records every op that reads device data on the host or has a data-dependent shape.

    ``Tensor.tolist`` / ``numpy`` of a CPU tensor bypass the dispatcher, so they are wrapped too.
    """

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                 "aten::_unique", "aten::unique", "aten::item", "aten::is_nonzero",
                 "aten::equal")

    def __init__(self):
        super().__init__()
        self.hits = []
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t, *a, _orig=orig, _name=name, **kw):
                self.hits.append(f"Tensor.{_name}")
                return _orig(t, *a, **kw)
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.FORBIDDEN:
            self.hits.append(name)
        if name == "aten::index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if
                i is not None):
            self.hits.append("boolean mask indexing")
        return func(*args, **(kwargs or {}))


def test_detector_catches_host_syncs():
    t = torch.arange(4)
    with HostSyncDetector() as d:
        t.tolist()
        int(t[0])
        t[t > 1].sum()
    assert "Tensor.tolist" in d.hits and "aten::_local_scalar_dense" in d.hits
    assert "boolean mask indexing" in d.hits or "aten::nonzero" in d.hits


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graph_safe_paths_do_not_sync(backend):
    """decode_rows and spec_rows_uniform issue no host sync and no data-dependent shape (the
    Triton backend as on the GPU; the torch backend's kernels are host-side references, so for it
    only the layer code around the kernel calls is checked)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    h = Harness(backend, dtype, seed=1)
    h.varlen([(2, 6, True), (4, 3, True)])
    blocks = torch.tensor([2, 0, 4], dtype=torch.int64)
    x, b, a = h.tokens(3)
    xs, bs, as_ = h.tokens(3 * (D + 1))
    pos = gdn_core.RowPositions(torch.tensor([9, 0, 3], dtype=torch.int32))
    if backend == "torch":
        # Kernel calls are host-side references here: run them outside the detector.
        real = {n: getattr(kernels, n) for n in ("decode", "verify", "accept")}

        def outside(fn):
            def run(*args, **kw):
                with torch.utils._python_dispatch._disable_current_modes():
                    return fn(*args, **kw)
            return run
        patched = {n: outside(f) for n, f in real.items()}
    else:
        real, patched = {}, {}
    try:
        for n, f in patched.items():
            setattr(kernels, n, f)
        with HostSyncDetector() as det:
            gdn_core.decode_rows(h.cache, h.conv, h.p, blocks, x, b, a)
            gdn_core.spec_rows_uniform(h.cache, h.conv, h.p, blocks, pos, xs, bs, as_, D + 1)
            pos = gdn_core.RowPositions(pos.context_lens + 2)
            gdn_core.spec_rows_uniform(h.cache, h.conv, h.p, blocks, pos, xs, bs, as_, D + 1)
    finally:
        for n, f in real.items():
            setattr(kernels, n, f)
    assert det.hits == [], f"host syncs / data-dependent shapes: {sorted(set(det.hits))}"


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("cpu", torch.float64)])
def test_commit_outside_verified_tokens_is_an_error(backend, dtype):
    """A position that moved by 0 or by more than the T verified tokens since the verify is an
    error naming the slot and the values (eager rows) or a device-side assert (graph-safe rows),
    raised before anything is written."""
    h = Harness(backend, dtype, seed=4)
    h.varlen([(2, 5, True), (4, 3, True)])
    h.spec([(2, D + 1), (4, D + 1)])                   # verified at positions 5 and 3
    x, b, a = h.tokens(2 * (D + 1))
    blocks = torch.tensor([2, 4], dtype=torch.int64)
    cu = torch.tensor([0, D + 1, 2 * (D + 1)], dtype=torch.int32)
    for ctx in ([5 + D + 2, 4], [5, 4]):               # 5 > T = 4 tokens; 0 tokens
        before = h.snapshot()
        pos = gdn_core.RowPositions(torch.tensor(ctx, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"tokens to commit: expected 1\.\.T .*slot 2: "
                                             rf"{ctx[0] - 5} \(T={D + 1}"):
            gdn_core.spec_rows_varlen(h.cache, h.conv, h.p, blocks, pos, cu, x, b, a)
        with pytest.raises(RuntimeError, match="tokens to commit outside 1..T"):
            gdn_core.spec_rows_uniform(h.cache, h.conv, h.p, blocks, pos, x, b, a, D + 1)
        for name, x0, x1 in zip(("state", "buf_k", "buf_u", "buf_g", "meta", "conv"), before,
                                h.snapshot()):
            assert torch.equal(x0.nan_to_num(7.0), x1.nan_to_num(7.0)), name


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("cpu", torch.float64)])
def test_verify_reaching_a_block_boundary_snapshots_the_boundary_block(backend, dtype):
    """Align mode: a verify whose tokens reach the next block boundary B copies the slot whole
    into B's block; a request continuing from that block (a prefix-cache hit, computed = B)
    commits exactly the tokens up to B by position, and its outputs equal float64 over the
    committed stream. A rejected run that falls short of B leaves the next verify to copy again;
    rows whose boundary block is their own slot copy nothing."""
    h = Harness(backend, dtype, seed=5)
    bs, run, boundary, other = 8, 3, 6, 9
    h.varlen([(run, 5, True), (other, 2, True)])
    for step in range(2):
        ctx = len(h.streams[run][0])
        x, b, a = h.tokens(D + 1)
        xo, bo, ao = h.tokens(D + 1)
        pos = gdn_core.RowPositions(
            torch.tensor([ctx, len(h.streams[other][0])], dtype=torch.int32),
            boundary_pos=torch.tensor([bs, bs], dtype=torch.int32),
            boundary_blocks=torch.tensor([boundary, other], dtype=torch.int64))
        before = h.snapshot()
        gdn_core.spec_rows_uniform(h.cache, h.conv, h.p, torch.tensor([run, other]), pos,
                                   torch.cat([x, xo]), torch.cat([b, bo]), torch.cat([a, ao]),
                                   D + 1)
        h.check_untouched(before, [run, other, boundary])
        for name, t in zip(("state", "buf_k", "buf_u", "buf_g", "meta", "conv"),
                           (h.cache.state, h.cache.buf_k, h.cache.buf_u, h.cache.buf_g,
                            h.cache.meta, h.conv)):
            assert torch.equal(t[boundary].nan_to_num(7.0), t[run].nan_to_num(7.0)), name
        if step == 0:                                   # rejected before B: 5 + 1 < 8
            h.commit(run, x[:1], b[:1], a[:1])
            h.commit(other, xo[:1], bo[:1], ao[:1])
    # the run from 6 reaches B = 8 with its first 2 tokens: a request continuing from the
    # boundary block has computed 8 tokens: the stream's first 6 plus x[:2].
    prefix = tuple(list(t) + list(u[:2]) for t, u in zip(h.streams[run], (x, b, a)))
    assert len(prefix[0]) == bs
    h.streams[boundary] = prefix
    xn, bn, an = h.tokens(3)
    out = gdn_core.varlen_rows(h.cache, h.conv, h.p, torch.tensor([boundary]),
                               torch.tensor([0, 3], dtype=torch.int32), 0,
                               torch.tensor([True]), xn, bn, an,
                               gdn_core.RowPositions(torch.tensor([bs], dtype=torch.int32)))
    h.compare(out, h.expect(boundary, xn, bn, an))
