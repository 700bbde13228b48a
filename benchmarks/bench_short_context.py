"""Short context: decode of requests that have not flushed yet (no state) vs the recurrent kernel.

A request whose buffer has never reached the flush interval has no state: KVBuffer decodes it from
its L buffered tokens alone and never reads or writes ``HV K V`` state bytes
(``docs/kvbuffer-math.md`` 2(d)). The recurrent kernel reads and writes the full state
at any context length. For batch N and buffered length L (chunk size C = 64 so L < 64 never
flushes) this times one decode step of
- ``kvbuffer``: ``vllm_kvbuffer.kernels.decode`` on slots with L tokens and no state; each timed
  replay first rewinds the cursors (a copy of the ``[S, 4]`` int32 cursor table, timed alone as
  ``rewind_ms`` and included in ``kvbuffer_ms``) so every replay sees the same L;
- ``fla`` (GPU) and ``stock`` (our slot-indexed recurrent kernel, ``benchmarks/baselines.py``):
  one recurrent step with an fp32 state.
Bytes: short context ``N (L row + row + io)``, recurrent ``N (2 s + io)``
(``benchmarks/common.py``).

Usage: python -m benchmarks.bench_short_context [--batch 1,8,64,256,512] [--length 4,16,48]
       [--tp 1] [--out short.json] [--plot] [--smoke]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common

from benchmarks.common import bench_fla, bench_stock, bw_frac, make_steps, time_ms, try_bench

SMOKE_TOL = 1e-4


def bench_kvbuffer_short(N, H, HV, K, V, L, C, dev, in_dt, gen, check):
    from vllm_kvbuffer.kernels import (allocate_cache, decode, prefill, recurrent_gated_delta_rule,
                                       reset_slots, set_value_checks)
    pool = N + 7
    cache = allocate_cache(pool, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, dtype=in_dt, state_dtype=torch.float32, device=dev)
    slots = torch.randperm(pool, device=dev)[:N].to(torch.int32)
    reset_slots(cache, slots)
    T = N * L
    cu = (torch.arange(N + 1, dtype=torch.int32) * L).to(dev)
    pre = (torch.randn(T, H, K, generator=gen, device=dev).to(in_dt),
           torch.randn(T, H, K, generator=gen, device=dev).to(in_dt),
           torch.randn(T, HV, V, generator=gen, device=dev).to(in_dt),
           -torch.rand(T, HV, generator=gen, device=dev) * 0.1,
           torch.rand(T, HV, generator=gen, device=dev))
    if L:
        prefill(cache, slots, *pre, cu, backend="torch")
    step, = make_steps(N, H, HV, K, V, 1, dev, in_dt, gen)
    meta0 = cache.meta.clone()
    err = None
    if check:
        o = decode(cache, slots, *step, backend="triton")
        # Reference: the recurrence from a zero state over the L prompt tokens + the new token.
        seqs = [torch.cat([p.view(N, L, *p.shape[1:]), s[:, None]], 1).reshape(
            N * (L + 1), *p.shape[1:]) for p, s in zip(pre, step)]
        cu_ref = torch.arange(N + 1, dtype=torch.int32) * (L + 1)
        ref, _ = recurrent_gated_delta_rule(*(x.double() for x in seqs), cu_seqlens=cu_ref)
        err = common.rel_err(o, ref.view(N, L + 1, HV, V)[:, -1])
        assert int(cache.meta[slots.long(), 2].max()) == 0, "a short-context slot got a state"

    def one():
        cache.meta.copy_(meta0)
        decode(cache, slots, *step, backend="triton")
    with set_value_checks(False):
        t = time_ms(one, dev)
    t_rw = time_ms(lambda: cache.meta.copy_(meta0), dev)
    return t, t_rw, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32,64,128,256,512")
    ap.add_argument("--length", default="4,16,48")
    ap.add_argument("--tp", default="1")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    dev, preset, in_dt = common.device_setup(args, "bench_short_context.py")
    if args.smoke:
        batches, lengths, tps, C = [3], [0, 5], [1], 8
    else:
        batches, lengths, tps, C = (common.ints(args.batch), common.ints(args.length),
                                    common.ints(args.tp), 64)
    gen = torch.Generator(device=dev).manual_seed(0)
    res = common.header("short_context", dev, args.smoke, preset)
    res["chunk_size"] = C
    bw = res["copy_bandwidth_Bps"]
    out = common.pathlib.Path(args.out) if args.out else common.default_out("short_context", dev)
    print(f"# {res['card']}; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'tp':>2} {'N':>4} {'L':>3} {'fla_us':>8} {'stock':>8} {'kvb_us':>8} {'rewind':>7} "
          f"{'fla/kvb':>7}")
    for tp in tps:
        H, HV, K, V = common.heads(tp, preset)
        for N in batches:
            if dev == "cuda":
                t_fla, _, fla_err = try_bench(bench_fla, N, H, HV, K, V, dev, in_dt, gen)
            else:
                t_fla, fla_err = float("nan"), "skipped in --smoke (fla runs on CUDA only)"
            t_st, e_st, st_err = try_bench(bench_stock, N, H, HV, K, V, torch.float32, dev, in_dt,
                                      gen, args.smoke)
            b_rec = common.bytes_recurrent(N, H, HV, K, V, torch.float32)
            for L in lengths:
                try:
                    t, t_rw, e_kv = bench_kvbuffer_short(N, H, HV, K, V, L, C, dev, in_dt, gen,
                                                         args.smoke)
                    kv_err = None
                except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
                    t, t_rw, e_kv, kv_err = float("nan"), float("nan"), None, repr(e)[:400]
                b = common.bytes_short_context(N, H, HV, K, V, L)
                row = dict(tp=tp, H=H, HV=HV, K=K, V=V, batch=N, buffered_tokens=L,
                           fla_ms=t_fla, fla_error=fla_err, fla_model_bytes=b_rec,
                           fla_bw_frac=bw_frac(b_rec, t_fla, bw),
                           stock_ms=t_st, stock_error=st_err, stock_max_rel_err=e_st,
                           stock_bw_frac=bw_frac(b_rec, t_st, bw),
                           kvbuffer_ms=t, rewind_ms=t_rw, kvbuffer_model_bytes=b,
                           kvbuffer_bw_frac=bw_frac(b, t, bw), kvbuffer_error=kv_err,
                           kvbuffer_max_rel_err=e_kv,
                           speedup_vs_fla=t_fla / t, speedup_vs_stock=t_st / t)
                res["rows"].append(row)
                common.save(res, out)
                print(f"{tp:>2} {N:>4} {L:>3} {t_fla * 1e3:8.1f} {t_st * 1e3:8.1f} {t * 1e3:8.1f} "
                      f"{t_rw * 1e3:7.1f} {t_fla / t:7.2f}", flush=True)
                if kv_err:
                    print("   kvbuffer:", kv_err[:200])
    if args.smoke:
        common.finish_smoke(res, ("stock_max_rel_err", "kvbuffer_max_rel_err"), SMOKE_TOL, out)
    if args.plot:
        common.plot(res, out.with_suffix(".png"), x="batch",
                    series={"fla (state)": "fla_ms", "stock (state)": "stock_ms",
                            "KVBuffer (no state)": "kvbuffer_ms"},
                    title="Short-context decode step", group=("tp", "buffered_tokens"))
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
