"""The ReplaySSM-style baseline: SGLang's own published GDN decode kernel, loaded from its wheel.

ReplaySSM (Dao AI Lab + NVIDIA) keeps, per request, a checkpoint state ``S0`` and a ring of the last
R steps' ``(u, k, g)`` (R = 16 by default in SGLang, ``--linear-replayssm-cache-len``); each decode
step reads ``S0`` and replays the ring to produce the output, appends one ring record, and writes
the state only on the step that fills the ring (a flush every R steps). SGLang ships it as a Triton
kernel, ``fused_recurrent_linear_replayssm_decode`` in
``sglang/kernels/ops/attention/linear/fused_recurrent_linear_replayssm.py`` of the ``sglang``
Python wheel (not in ``sgl-kernel``, whose CUDA wheel is beyond a 64 MiB carry limit anyway).

That module imports only torch and triton, so the benchmarks run SGLang's real kernel without
installing SGLang: the wheel file is carried in the project's ignored ``.whl/extra/`` folder (the
``sglang`` wheel is about 40 MB; its compiled parts are for CPython 3.11 and are never loaded), the
one module is extracted into the project cache at run time and imported by path. No SGLang code is
copied into this repository. Get the wheel with::

    pip download --no-deps sglang==0.5.23 -d .whl/extra

If the wheel is absent, the ReplaySSM columns of the benchmarks say "unavailable" and the related
tests skip. Its calling convention (read from the wrapper's docstring and argument checks):
packed ``mixed_qkv [N, 2HK + HV V]`` (q | k | v after the conv), raw gate inputs ``a, b [N, HV]``
with ``A_log, dt_bias [HV]`` (gates computed in-kernel), state ``[S, HV, V, K]`` read every step and
written only on flushes, ring tensors ``d [S, HV, R, V]``, ``k [S, H, R, K]`` (normalised keys,
stored in the output dtype), ``g [S, HV, R]`` fp32 per-step decays, and a per-row cursor
``write_pos [N]`` the caller advances as ``(write_pos + 1) % R``; the step with ``write_pos = R-1``
flushes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import zipfile

import torch
import torch.nn.functional as F

from vllm_kvbuffer.kernels.recurrent import expand_k_heads, l2norm

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEMBER = "sglang/kernels/ops/attention/linear/fused_recurrent_linear_replayssm.py"
ENTRY = "fused_recurrent_linear_replayssm_decode"
RING = 16  # SGLang's default ring length (--linear-replayssm-cache-len)


def find_wheel() -> pathlib.Path | None:
    env = os.environ.get("KVB_SGLANG_WHEEL")
    if env:
        return pathlib.Path(env) if pathlib.Path(env).is_file() else None
    found = sorted((ROOT / ".whl" / "extra").glob("sglang-*.whl"))
    return found[-1] if found else None


def sglang_version() -> str:
    w = find_wheel()
    if w is None:
        raise FileNotFoundError("no sglang wheel in .whl/extra/")
    return w.name.split("-")[1]


@functools.lru_cache(maxsize=1)
def load_kernel():
    """SGLang's ``fused_recurrent_linear_replayssm_decode`` (raises if the wheel is missing)."""
    w = find_wheel()
    if w is None:
        raise FileNotFoundError(
            "ReplaySSM baseline: no sglang wheel found in .whl/extra/ (pip download --no-deps "
            "sglang==0.5.23 -d .whl/extra)")
    cache = pathlib.Path(os.environ.get("KVB_CACHE", ROOT / ".cache")) / "sglang-replayssm" / w.stem
    path = cache / "fused_recurrent_linear_replayssm.py"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(w) as z:
            path.write_bytes(z.read(MEMBER))
    spec = importlib.util.spec_from_file_location("_sglang_replayssm_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, ENTRY)


class ReplayRing:
    """Pool + ring + cursor for SGLang's ReplaySSM decode, one decode row per slot.

    ``state [S, HV, V, K]`` (state dtype), ``d [S, HV, R, V]`` fp32, ``k [S, H, R, K]`` (model
    dtype), ``g [S, HV, R]`` fp32, ``write_pos [N]`` int32. ``step`` runs the kernel once for the
    batch and advances the cursor on the device (graph-safe).
    """

    def __init__(self, slots: torch.Tensor, num_slots: int, H: int, HV: int, K: int, V: int, *,
                 dtype=torch.bfloat16, state_dtype=torch.float32, ring: int = RING,
                 device="cuda", nk: int | None = None, load: bool = True):
        self.kernel = load_kernel() if load else None
        self.H, self.HV, self.K, self.V, self.R = H, HV, K, V, ring
        self.slots = slots.to(torch.int32)
        self.dtype = dtype
        self.state = torch.zeros(num_slots, HV, V, K, dtype=state_dtype, device=device)
        # float64 ring only for the float64 reference model (the kernel needs fp32 d and g).
        acc = torch.float64 if state_dtype == torch.float64 else torch.float32
        self.d = torch.zeros(num_slots, HV, ring, V, dtype=acc, device=device)
        self.k = torch.zeros(num_slots, H, ring, K, dtype=dtype, device=device)
        self.g = torch.zeros(num_slots, HV, ring, dtype=acc, device=device)
        self.write_pos = torch.zeros(slots.shape[0], dtype=torch.int32, device=device)
        # SGLang's default splits K in 2 tiles of >= 16; tiny test shapes need one tile.
        self.nk = nk if nk is not None else (2 if K >= 32 else 1)

    def step(self, mixed_qkv, a, b, A_log, dt_bias, out, *, scale=None):
        self.kernel(mixed_qkv, a, b, A_log, dt_bias, self.K ** -0.5 if scale is None else scale,
                    self.state, self.d, self.k, self.g, out, self.slots, self.write_pos,
                    use_qk_l2norm_in_kernel=True, nk=self.nk)
        self.write_pos.add_(1).remainder_(self.R)
        return out

    def step_reference(self, mixed_qkv, a, b, A_log, dt_bias, *, scale=None) -> torch.Tensor:
        """The same step in float64 torch on the same tensors (the documented convention, written
        by us): replay the ring onto ``S0``, output, then append or flush; advances the cursor.
        Returns ``o [N, HV, V]`` float64."""
        H, HV, K, V, R = self.H, self.HV, self.K, self.V, self.R
        N = mixed_qkv.shape[0]
        scale = K ** -0.5 if scale is None else scale
        x = mixed_qkv.double()
        q = l2norm(x[:, :H * K].view(N, H, K))
        k = l2norm(x[:, H * K:2 * H * K].view(N, H, K))
        v = x[:, 2 * H * K:].view(N, HV, V)
        g = -torch.exp(A_log.double()) * F.softplus(a.double() + dt_bias.double())
        # The kernel rounds sigmoid(b) to b's dtype before use; mirror it.
        beta = torch.sigmoid(b.double()).to(b.dtype).double()
        out = torch.empty(N, HV, V, dtype=torch.float64, device=x.device)
        for n in range(N):
            s, p = int(self.slots[n]), int(self.write_pos[n])
            kv = expand_k_heads(k[n], HV)                                     # [HV, K]
            qv = expand_k_heads(q[n], HV) * scale
            gj = self.g[s, :, :p].double()                                    # [HV, p]
            G = gj.sum(-1)
            w = torch.exp(G[:, None] - gj.cumsum(-1))                         # [HV, p]
            kj = expand_k_heads(self.k[s, :, :p].double(), HV, head_dim=0)          # [HV, p, K]
            S = (torch.exp(G)[:, None, None] * self.state[s].double()
                 + torch.einsum("hj,hjv,hjk->hvk", w, self.d[s, :, :p].double(), kj))
            alpha = torch.exp(g[n])[:, None]
            r_q = alpha * torch.einsum("hvk,hk->hv", S, qv)
            r_k = alpha * torch.einsum("hvk,hk->hv", S, kv)
            d = beta[n][:, None] * (v[n] - r_k)
            out[n] = r_q + d * (kv * qv).sum(-1, keepdim=True)
            if p == R - 1:
                self.state[s] = (alpha[:, :, None] * S + d[:, :, None] * kv[:, None, :]).to(
                    self.state.dtype)
            else:
                self.d[s, :, p] = d.to(self.d.dtype)
                self.k[s, :, p] = k[n].to(self.k.dtype)
                self.g[s, :, p] = g[n].to(self.g.dtype)
        self.write_pos.add_(1).remainder_(R)
        return out
