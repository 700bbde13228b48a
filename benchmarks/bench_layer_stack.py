"""Layer stack: one decode step of all 36 Qwen3-Next GDN layers, stock-style recurrent vs KVBuffer.

Each layer: depthwise causal conv1d update with the layer's per-slot window + SiLU, the gates
``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``, and the core (random weights; the
projections around the layer are the same for both paths and left out). Conv and gates are the
same kernels for both paths (``benchmarks/baselines.py``); the core is
- ``stock``: our slot-indexed recurrent kernel (read + write the fp32/bf16 state in place, as
  vLLM's GDN decode does; checked against fla's kernel in ``bench_decode.py``);
- ``kvbuffer``: ``vllm_kvbuffer.kernels.decode`` (C = 16), timed over whole flush cycles (C steps
  of the whole stack, every request flushing once per cycle at staggered positions), per step.
Bytes per step: 36 x (core bytes of ``benchmarks/common.py`` + conv ``N dim (2 + 2 (W-1) 2)`` for
reading x, reading and writing the bf16 window, writing y).

Usage: python -m benchmarks.bench_layer_stack [--batch 1,8,64,256] [--layers 36]
       [--state-dtype fp32] [--out stack.json] [--plot] [--smoke]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common

from benchmarks.common import DTYPES, bw_frac, time_ms

SMOKE_TOL = 1e-4
W = 4          # Qwen3-Next conv kernel
C = 16


def conv_bytes(N, dim, in_dt):
    e = common.esz(in_dt)
    return N * dim * (e + 2 * (W - 1) * e + e)


class Stack:
    """Per-layer weights and caches for ``layers`` GDN layers; ``core`` is "stock" or "kvbuffer"."""

    def __init__(self, core, layers, N, H, HV, K, V, sdt, dev, in_dt, gen, C=C):
        from vllm_kvbuffer.kernels import allocate_cache, prefill, reset_slots
        self.core, self.H, self.HV, self.K, self.V = core, H, HV, K, V
        self.dim = 2 * H * K + HV * V
        pool = N + 3
        self.slots = torch.randperm(pool, device=dev)[:N].to(torch.int32)
        self.layers = []
        lens = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(N)) + C
        cu = torch.zeros(N + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        Tp = int(lens.sum())
        for _ in range(layers):
            lay = dict(w=(torch.randn(self.dim, W, generator=gen, device=dev) * 0.5).to(in_dt),
                       bias=torch.zeros(self.dim, device=dev, dtype=in_dt),
                       A_log=torch.rand(HV, generator=gen, device=dev).log(),
                       dt_bias=torch.rand(HV, generator=gen, device=dev),
                       conv=torch.randn(pool, self.dim, W - 1, generator=gen, device=dev
                                        ).to(in_dt))
            if core == "stock":
                lay["state"] = (torch.randn(pool, HV, V, K, generator=gen, device=dev)
                                * 0.05).to(sdt)
            else:
                c = allocate_cache(pool, num_k_heads=H, num_v_heads=HV, head_k_dim=K,
                                   head_v_dim=V, chunk_size=C, dtype=in_dt, state_dtype=sdt,
                                   device=dev)
                reset_slots(c, self.slots)
                prefill(c, self.slots, torch.randn(Tp, H, K, device=dev).to(in_dt),
                        torch.randn(Tp, H, K, device=dev).to(in_dt),
                        torch.randn(Tp, HV, V, device=dev).to(in_dt),
                        -torch.rand(Tp, HV, device=dev) * 0.1, torch.rand(Tp, HV, device=dev),
                        cu.to(dev), backend="triton")
                lay["cache"] = c
            self.layers.append(lay)

    def split(self, y):
        N, H, HV, K, V = y.shape[0], self.H, self.HV, self.K, self.V
        return (y[:, :H * K].view(N, H, K), y[:, H * K:2 * H * K].view(N, H, K),
                y[:, 2 * H * K:].view(N, HV, V))

    def step(self, x, a, b):
        from benchmarks.baselines import conv_update, gdn_gating, recurrent_pool
        from vllm_kvbuffer.kernels import decode
        outs = []
        for lay in self.layers:
            y = conv_update(x, lay["w"], lay["bias"], lay["conv"], self.slots)
            g, beta = gdn_gating(a, b, lay["A_log"], lay["dt_bias"])
            q, k, v = self.split(y)
            if self.core == "stock":
                o = recurrent_pool(lay["state"], self.slots, self.slots[:, None], q[:, None],
                                   k[:, None], v[:, None], g[:, None], beta[:, None])[:, 0]
            else:
                o = decode(lay["cache"], self.slots, q, k, v, g, beta, backend="triton")
            outs.append(o)
        return outs

    def initial_states(self):
        """float64 ``[N, HV, K, V]`` state of every layer now (for the reference)."""
        from vllm_kvbuffer.kernels import materialize_state
        if self.core == "stock":
            return [lay["state"][self.slots.long()].double().transpose(-1, -2)
                    for lay in self.layers]
        return [materialize_state(lay["cache"], self.slots).double() for lay in self.layers]

    def reference(self, states, windows, x, a, b):
        """One float64 step of every layer; updates ``states`` / ``windows`` lists in place."""
        from benchmarks.baselines import gdn_gating_ref
        from vllm_kvbuffer.kernels import recurrent_gated_delta_rule
        outs = []
        for i, lay in enumerate(self.layers):
            full = torch.cat([windows[i], x.double()[:, :, None]], 2)
            y = torch.nn.functional.silu((full * lay["w"].double()[None]).sum(-1)
                                         + lay["bias"].double())
            windows[i] = full[:, :, 1:]
            g, beta = gdn_gating_ref(a, b, lay["A_log"], lay["dt_bias"])
            q, k, v = self.split(y)
            os_ = []
            for n in range(x.shape[0]):
                o, s = recurrent_gated_delta_rule(q[n:n + 1], k[n:n + 1], v[n:n + 1],
                                                  g[n:n + 1], beta[n:n + 1],
                                                  initial_state=states[i][n:n + 1])
                states[i][n] = s[0]
                os_.append(o[0])
            outs.append(torch.stack(os_))
        return outs


def run(core, layers, N, H, HV, K, V, sdt, dev, in_dt, gen, check, C=C):
    st = Stack(core, layers, N, H, HV, K, V, sdt, dev, in_dt, gen, C)
    steps = [(torch.randn(N, st.dim, generator=gen, device=dev).to(in_dt),
              torch.randn(N, HV, generator=gen, device=dev).to(in_dt),
              torch.randn(N, HV, generator=gen, device=dev).to(in_dt)) for _ in range(C)]
    err = None
    if check:
        states = st.initial_states()
        windows = [lay["conv"][st.slots.long()].double() for lay in st.layers]
        err = 0.0
        for x, a, b in steps:
            outs = st.step(x, a, b)
            refs = st.reference(states, windows, x, a, b)
            err = max([err] + [common.rel_err(o, r) for o, r in zip(outs, refs)])

    def cycle():
        for x, a, b in steps:
            st.step(x, a, b)
    from vllm_kvbuffer.kernels import set_value_checks
    with set_value_checks(False):
        t = time_ms(cycle, dev, reps_ms=100) / C
    st = None  # drop the pools before the next batch size
    if dev == "cuda":
        torch.cuda.empty_cache()
    return t, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32,64,128,256")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--state-dtype", default="fp32")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    dev, preset, in_dt = common.device_setup(args, "bench_layer_stack.py")
    if args.smoke:
        batches, sdts, layers, chunk = [2], ["fp32"], 2, 4
    else:
        batches, sdts, layers = common.ints(args.batch), args.state_dtype.split(","), args.layers
        chunk = C
    gen = torch.Generator(device=dev).manual_seed(0)
    res = common.header("layer_stack", dev, args.smoke, preset)
    res.update(layers=layers, chunk_size=chunk, conv_kernel=W)
    bw = res["copy_bandwidth_Bps"]
    out = common.pathlib.Path(args.out) if args.out else common.default_out("layer_stack", dev)
    H, HV, K, V = common.heads(1, preset)
    dim = 2 * H * K + HV * V
    print(f"# {res['card']}; {layers} GDN layers; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'state':>5} {'N':>4} {'stock_us':>9} {'kvb_us':>9} {'ratio':>6}")
    for sname in sdts:
        sdt = DTYPES[sname]
        for N in batches:
            row = dict(state_dtype=sname, batch=N, layers=layers, H=H, HV=HV, K=K, V=V)
            for core in ("stock", "kvbuffer"):
                try:
                    t, e = run(core, layers, N, H, HV, K, V, sdt, dev, in_dt, gen, args.smoke,
                                chunk)
                    row.update({f"{core}_ms": t, f"{core}_max_rel_err": e})
                except Exception as ex:  # noqa: BLE001  (recorded in the row; the sweep goes on)
                    row.update({f"{core}_ms": float("nan"), f"{core}_error": repr(ex)[:400]})
            cb = conv_bytes(N, dim, in_dt)
            b_st = layers * (common.bytes_recurrent(N, H, HV, K, V, sdt) + cb)
            b_kv = layers * (common.bytes_kvbuffer(N, H, HV, K, V, chunk, sdt) + cb)
            row.update(stock_model_bytes=b_st, kvbuffer_model_bytes=b_kv,
                       stock_bw_frac=bw_frac(b_st, row["stock_ms"], bw),
                       kvbuffer_bw_frac=bw_frac(b_kv, row["kvbuffer_ms"], bw),
                       ratio=row["kvbuffer_ms"] / row["stock_ms"])
            res["rows"].append(row)
            common.save(res, out)
            print(f"{sname:>5} {N:>4} {row['stock_ms'] * 1e3:9.1f} {row['kvbuffer_ms'] * 1e3:9.1f} "
                  f"{row['ratio']:6.3f}", flush=True)
            for k in ("stock_error", "kvbuffer_error"):
                if k in row:
                    print("  ", k, row[k][:200])
    if args.smoke:
        common.finish_smoke(res, ("stock_max_rel_err", "kvbuffer_max_rel_err"), SMOKE_TOL, out)
    if args.plot:
        common.plot(res, out.with_suffix(".png"), x="batch",
                    series={"stock recurrent": "stock_ms", "KVBuffer": "kvbuffer_ms"},
                    title=f"{layers} GDN layers, one decode step", group=("state_dtype",))
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
