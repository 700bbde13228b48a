"""Random-interleaving scenarios for the KVBuffer operations, checked against the recurrence.

A scenario drives a pool through random prefill chunks, decode steps, verify/accept cycles and
slot resets, and after every operation compares the outputs and ``materialize_state`` with a
float64 token-by-token recurrence run on the same (dtype-rounded) inputs. Slots of the pool that the
scenario never touches must stay bit-for-bit unchanged. Shared by the torch and Triton tests.
"""

from __future__ import annotations

import dataclasses
import math
import random

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
    verify,
)
from vllm_kvbuffer.kernels.cache import META_COLS, accumulator_dtype


@dataclasses.dataclass
class Dims:
    H: int
    HV: int
    K: int
    V: int
    C: int
    D: int = 0
    S: int = 9


def make_cache(d: Dims, *, dtype=torch.float64, state_dtype=torch.float64, device="cpu",
               strided: bool = False) -> KVBufferCache:
    """A NaN-poisoned pool; ``strided=True`` builds every tensor as a view into padded pages
    (like vLLM's: each slot is contiguous, slot strides larger than a slot)."""
    if not strided:
        return allocate_cache(d.S, num_k_heads=d.H, num_v_heads=d.HV, head_k_dim=d.K,
                              head_v_dim=d.V, chunk_size=d.C, max_draft_tokens=d.D, dtype=dtype,
                              state_dtype=state_dtype, device=device)
    B = d.C + d.D
    acc = accumulator_dtype(state_dtype)
    nan = float("nan")

    def padded(shape, dt, pad=3):
        size = math.prod(shape[1:])
        base = torch.full((shape[0], size + pad), nan, dtype=dt, device=device)
        return base[:, :size].view(shape)

    # The state view is slot-strided like a vLLM page: slot stride > HV*V*K.
    state_page = torch.full((d.S, d.HV * d.V * d.K + 37), nan, dtype=state_dtype, device=device)
    state = state_page[:, : d.HV * d.V * d.K].view(d.S, d.HV, d.V, d.K)
    return KVBufferCache(
        state=state,
        buf_k=padded((d.S, B, d.H, d.K), dtype),
        buf_u=padded((d.S, B, d.HV, d.V), acc),
        buf_g=padded((d.S, B, d.HV), acc),
        meta=torch.zeros(d.S, META_COLS + 2, dtype=torch.int32, device=device)[:, :META_COLS],
        chunk_size=d.C,
        max_draft_tokens=d.D,
    )


def snapshot(cache: KVBufferCache, slots: list[int]) -> list[torch.Tensor]:
    idx = torch.tensor(slots, dtype=torch.long, device=cache.device)
    return [t[idx].clone() for t in (cache.state, cache.buf_k, cache.buf_u, cache.buf_g,
                                      cache.meta)]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), \
            "an untouched slot changed"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    assert torch.isfinite(x).all(), "non-finite output"
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class Reference:
    """float64 recurrence per slot, fed the exact inputs the kernels saw."""

    def __init__(self, d: Dims, scale: float | None = None):
        self.d = d
        self.scale = scale
        self.states: dict[int, torch.Tensor] = {}
        self.pending: dict[int, tuple] = {}

    def reset(self, slot: int) -> None:
        self.states[slot] = torch.zeros(self.d.HV, self.d.K, self.d.V, dtype=torch.float64)
        self.pending.pop(slot, None)

    def run(self, slot: int, q, k, v, g, b, *, commit: bool = True):
        S0 = self.states[slot][None]
        o, S = recurrent_gated_delta_rule(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                          g.double().cpu(), b.double().cpu(), initial_state=S0,
                                          scale=self.scale)
        if commit:
            self.states[slot] = S[0]
        return o


class Scenario:
    """Random interleavings on one pool. ``backend`` is passed to every operation."""

    def __init__(self, d: Dims, *, backend: str = "torch", dtype=torch.float64,
                 state_dtype=torch.float64, device="cpu", strided: bool = False, seed: int = 0,
                 num_active: int = 4, scale: float | None = None):
        self.d, self.backend, self.dtype, self.device = d, backend, dtype, device
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.cache = make_cache(d, dtype=dtype, state_dtype=state_dtype, device=device,
                                strided=strided)
        assert num_active < d.S, "a scenario needs untouched slots to check"
        pool = list(range(d.S))
        self.rng.shuffle(pool)
        self.active, self.untouched = sorted(pool[:num_active]), sorted(pool[num_active:])
        self.before = snapshot(self.cache, self.untouched)
        self.ref = Reference(d, scale)
        self.scale = scale
        self.committed = {s: 0 for s in self.active}
        self.processed = {s: 0 for s in self.active}   # committed tokens, not reset by op_reset
        self.max_err = 0.0
        self.flushes = 0
        reset_slots(self.cache, self._t(self.active))
        for s in self.active:
            self.ref.reset(s)

    # Inputs: drawn in float64, rounded to the test dtype; the reference sees the rounded values.
    def _t(self, xs, dtype=torch.int32):
        return torch.tensor(xs, dtype=dtype, device=self.device)

    def _inputs(self, lead: tuple):
        d, gen = self.d, self.gen
        q = torch.randn(*lead, d.H, d.K, generator=gen, dtype=torch.float64)
        k = torch.randn(*lead, d.H, d.K, generator=gen, dtype=torch.float64)
        v = torch.randn(*lead, d.HV, d.V, generator=gen, dtype=torch.float64)
        # Mostly mild decay, sometimes none, sometimes strong (exercises exp(G_i - G_j) range).
        g = -torch.rand(*lead, d.HV, generator=gen, dtype=torch.float64) * 0.7
        strong = torch.rand(*lead, d.HV, generator=gen) < 0.05
        g = torch.where(strong, g * 12.0, g)
        g = torch.where(torch.rand(*lead, d.HV, generator=gen) < 0.05, torch.zeros_like(g), g)
        beta = torch.rand(*lead, d.HV, generator=gen, dtype=torch.float64) * 0.95 + 0.025
        gdt = torch.float32 if self.dtype != torch.float64 else torch.float64
        return (*(x.to(self.dtype).to(self.device) for x in (q, k, v)),
                *(x.to(gdt).to(self.device) for x in (g, beta)))

    def _check(self, o, ref, tol):
        err = rel_err(o, ref)
        self.max_err = max(self.max_err, err)
        assert err <= tol, f"output rel err {err:.3e} > {tol:.1e}"

    def check_states(self, tol: float) -> None:
        S = materialize_state(self.cache, self._t(self.active), backend=self.backend)
        for i, s in enumerate(self.active):
            err = rel_err(S[i], self.ref.states[s]) if self.ref.states[s].abs().max() > 0 else \
                float(S[i].abs().max())
            self.max_err = max(self.max_err, err)
            assert err <= tol, f"state rel err {err:.3e} > {tol:.1e} (slot {s})"

    def _pick(self, k_min: int = 1) -> list[int]:
        n = self.rng.randint(k_min, len(self.active))
        chosen = self.rng.sample(self.active, n)
        self.rng.shuffle(chosen)
        return chosen

    def op_prefill(self, tol: float) -> None:
        chosen = self._pick()
        lens = [self.rng.choice([0, 1, self.d.C - 1, self.d.C, self.d.C + 1,
                                 self.rng.randint(1, 3 * self.d.C)]) for _ in chosen]
        T = sum(lens)
        q, k, v, g, b = self._inputs((T,))
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        # A padding row in the middle: its (empty) sequence is skipped.
        slots = chosen[:1] + [-1] + chosen[1:]
        cu = cu[:2] + cu[1:2] + cu[2:]
        o = prefill(self.cache, self._t(slots), q, k, v, g, b, self._t(cu),
                    scale=self.scale, backend=self.backend)
        for j, s in enumerate(slots):
            if s < 0:
                continue
            a, e = cu[j], cu[j + 1]
            if a == e:
                continue
            ref = self.ref.run(s, q[a:e], k[a:e], v[a:e], g[a:e], b[a:e])
            self._check(o[a:e], ref, tol)
            self._count(s, e - a)

    def op_decode(self, tol: float) -> None:
        chosen = self._pick()
        slots = chosen + [-1]
        N = len(slots)
        q, k, v, g, b = self._inputs((N,))
        o = decode(self.cache, self._t(slots), q, k, v, g, b, scale=self.scale,
                   backend=self.backend)
        assert torch.all(o[-1] == 0), "padding row must be zero"
        for j, s in enumerate(chosen):
            ref = self.ref.run(s, q[j:j + 1], k[j:j + 1], v[j:j + 1], g[j:j + 1], b[j:j + 1])
            self._check(o[j:j + 1], ref, tol)
            self._count(s, 1)

    def op_verify_accept(self, tol: float, accept_mode: str = "random") -> None:
        chosen = self._pick()
        slots = [-1] + chosen
        N, T = len(slots), self.rng.randint(1, self.d.D + 1)
        q, k, v, g, b = self._inputs((N, T))
        o = verify(self.cache, self._t(slots), q, k, v, g, b, scale=self.scale,
                   backend=self.backend)
        assert torch.all(o[0] == 0), "padding row must be zero"
        m = []
        for j, s in enumerate(slots):
            if s < 0:
                m.append(self.rng.randint(1, T))
                continue
            ref = self.ref.run(s, q[j], k[j], v[j], g[j], b[j], commit=False)
            self._check(o[j], ref, tol)
            mj = {"random": self.rng.randint(1, T), "one": 1, "all": T}[accept_mode]
            m.append(mj)
            self.ref.run(s, q[j, :mj], k[j, :mj], v[j, :mj], g[j, :mj], b[j, :mj])
        accept(self.cache, self._t(slots), self._t(m), backend=self.backend)
        for s, mj in zip(slots, m):
            if s >= 0:
                self._count(s, mj)

    def op_reset(self) -> None:
        s = self.rng.choice(self.active)
        reset_slots(self.cache, self._t([s]))
        self.ref.reset(s)
        self.committed[s] = 0

    def _count(self, slot: int, n: int) -> None:
        self.committed[slot] += n
        self.processed[slot] += n

    def run(self, steps: int, tol_out: float, tol_state: float, *, min_tokens_per_slot: int = 0,
            ops=("prefill", "decode", "verify", "reset"), weights=(2, 6, 3, 0.3)) -> None:
        """At least ``steps`` operations, and until every active slot has committed
        ``min_tokens_per_slot`` tokens (``min_tokens_per_slot = 10 * C`` means >= ~10 flushes)."""
        ops = [o for o in ops if o != "verify" or self.d.D > 0]
        w = [weights[("prefill", "decode", "verify", "reset").index(o)] for o in ops]
        step = 0
        while step < steps or min(self.processed.values()) < min_tokens_per_slot:
            op = self.rng.choices(ops, w)[0]
            if op == "prefill":
                self.op_prefill(tol_out)
            elif op == "decode":
                self.op_decode(tol_out)
            elif op == "verify":
                self.op_verify_accept(tol_out, self.rng.choice(["random", "one", "all"]))
            else:
                self.op_reset()
            if step % 3 == 0:
                self.check_states(tol_state)
            step += 1
        self.check_states(tol_state)
        assert_bitwise_equal(self.before, snapshot(self.cache, self.untouched))
