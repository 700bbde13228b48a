"""Decode: KVBuffer vs fla's fused recurrent kernel vs SGLang's ReplaySSM kernel, same card and run.

For each TP head split, state dtype, batch size and chunk size (flush interval C) this times
- ``fla``: ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`` (what vLLM's GDN decode
  derives from): reads the fp32 state and writes a new fp32 state every step;
- ``stock``: our slot-indexed recurrent kernel (``benchmarks/baselines.py``, in place, vLLM layout),
  the stock-style core the layer-stack benchmark uses; shown to check it against fla;
- ``replayssm``: SGLang's ReplaySSM decode kernel run from its wheel (``benchmarks/replayssm.py``),
  ring of 16, amortised over whole 16-step flush cycles (rows at staggered ring positions);
- ``kvbuffer``: ``vllm_kvbuffer.kernels.decode`` (Triton), amortised over whole flush cycles: one
  timed unit is C consecutive decode steps of every sequence (each flushes once in it; sequences
  start at staggered buffer positions, as in serving), reported per step.
Bytes: the byte models of ``benchmarks/common.py``; achieved bandwidth as a fraction of the
measured device copy bandwidth. ``--smoke``: tiny shapes on the CPU (interpreted Triton), every
output checked against the float64 recurrence.

Usage: python -m benchmarks.bench_decode [--batch 1,8,64,512] [--chunk 8,16,32,64]
       [--state-dtype fp32,bf16] [--tp 1,4] [--out decode.json] [--plot] [--smoke]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common

from benchmarks.common import (DTYPES, bench_fla, bench_stock, bw_frac, make_steps,
                               reference_cycle, time_ms, try_bench)

# Absolute tolerance on the max relative error vs the float64 recurrence (fp32 interpreter).
SMOKE_TOL = 1e-4


def _raw_gates(N, HV, dev, gen):
    """Raw ``a, b`` and ``A_log, dt_bias`` giving decays of the size the other paths use."""
    a = torch.randn(N, HV, generator=gen, device=dev) - 4.0
    b = torch.randn(N, HV, generator=gen, device=dev)
    return a, b, torch.zeros(HV, device=dev), torch.zeros(HV, device=dev)


def bench_replayssm(N, H, HV, K, V, sdt, dev, in_dt, gen, check):
    from benchmarks.replayssm import RING, ReplayRing
    pool = N + 7
    slots = torch.randperm(pool, device=dev)[:N].to(torch.int32)
    ring = ReplayRing(slots, pool, H, HV, K, V, dtype=in_dt, state_dtype=sdt, device=dev)
    ring.state.copy_(torch.randn(pool, HV, V, K, generator=gen, device=dev) * 0.05)
    dim = 2 * H * K + HV * V
    steps = []
    for _ in range(RING):
        a, b, A_log, dt = _raw_gates(N, HV, dev, gen)
        steps.append((torch.randn(N, dim, generator=gen, device=dev).to(in_dt), a, b))
    out = torch.empty(N, 1, HV, V, dtype=in_dt, device=dev)
    err = None
    if check:
        # Same inputs through SGLang's kernel and the float64 ring convention; then the ring
        # convention is checked against the recurrence in tests/benchmarks (CPU).
        twin = ReplayRing(slots, pool, H, HV, K, V, dtype=in_dt, state_dtype=torch.float64,
                          device=dev, load=False)
        twin.state.copy_(ring.state)
        err = 0.0
        for (x, a, b) in steps + steps[:3]:
            ring.step(x, a, b, A_log, dt, out)
            ref = twin.step_reference(x, a, b, A_log, dt)
            err = max(err, common.rel_err(out[:, 0], ref))
    # Stagger the rows' ring positions (as in serving); ring contents stay finite.
    ring.write_pos.copy_(torch.arange(N, device=dev, dtype=torch.int32) % RING)

    def cycle():
        for (x, a, b) in steps:
            ring.step(x, a, b, A_log, dt, out)
    return time_ms(cycle, dev) / RING, err


def bench_kvbuffer(N, H, HV, K, V, C, sdt, dev, in_dt, gen, check):
    from vllm_kvbuffer.kernels import (allocate_cache, decode, materialize_state, prefill,
                                       reset_slots, set_value_checks)
    pool = N + 7
    cache = allocate_cache(pool, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, dtype=in_dt, state_dtype=sdt, device=dev)
    slots = torch.randperm(pool, device=dev)[:N].to(torch.int32)
    reset_slots(cache, slots)
    # Every sequence gets a state and a staggered buffer position: C + r_i prompt tokens.
    lens = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(N)) + C
    T = int(lens.sum())
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    q = torch.randn(T, H, K, device=dev).to(in_dt)
    k = torch.randn(T, H, K, device=dev).to(in_dt)
    v = torch.randn(T, HV, V, device=dev).to(in_dt)
    # Set-up only (not timed): the exact torch backend brings every slot to its position.
    prefill(cache, slots, q, k, v, -torch.rand(T, HV, device=dev) * 0.1,
            torch.rand(T, HV, device=dev), cu.to(dev), backend="torch")
    steps = make_steps(N, H, HV, K, V, C, dev, in_dt, gen)
    err = None
    if check:
        ref = reference_cycle(materialize_state(cache, slots), steps)
        err = max(common.rel_err(decode(cache, slots, *st, backend="triton"), r)
                  for st, r in zip(steps, ref))

    def cycle():
        for st in steps:
            decode(cache, slots, *st, backend="triton")
    with set_value_checks(False):
        return time_ms(cycle, dev) / C, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32,64,128,256,512")
    ap.add_argument("--chunk", default="8,16,32,64")
    ap.add_argument("--state-dtype", default="fp32,bf16")
    ap.add_argument("--tp", default="1,4")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    dev, preset, in_dt = common.device_setup(args, "bench_decode.py")
    if args.smoke:
        batches, chunks, sdts, tps = [3], [4], ["fp32"], [1]
    else:
        batches, chunks = common.ints(args.batch), common.ints(args.chunk)
        sdts, tps = args.state_dtype.split(","), common.ints(args.tp)
    gen = torch.Generator(device=dev).manual_seed(0)
    res = common.header("decode", dev, args.smoke, preset)
    res["replayssm_ring"] = 16
    bw = res["copy_bandwidth_Bps"]
    out = common.pathlib.Path(args.out) if args.out else common.default_out("decode", dev)
    print(f"# {res['card']}; copy bandwidth {bw / 1e12:.2f} TB/s; {res['versions']}")
    print(f"{'tp':>2} {'state':>5} {'N':>4} {'C':>3} {'fla_us':>8} {'replay':>8} {'kvb_us':>8} "
          f"{'/fla':>6} {'/replay':>7} {'kvb_bw%':>7}")
    check = args.smoke
    for tp in tps:
        H, HV, K, V = common.heads(tp, preset)
        for sname in sdts:
            sdt = DTYPES[sname]
            for N in batches:
                if dev == "cuda":
                    t_fla, _, fla_err = try_bench(bench_fla, N, H, HV, K, V, dev, in_dt, gen)
                else:
                    t_fla, fla_err = float("nan"), "skipped in --smoke (fla runs on CUDA only)"
                t_st, e_st, st_err = try_bench(bench_stock, N, H, HV, K, V, sdt, dev, in_dt, gen,
                                               check)
                t_rp, e_rp, rp_err = try_bench(bench_replayssm, N, H, HV, K, V, sdt, dev, in_dt,
                                               gen, check or N == batches[0])
                b_rec = common.bytes_recurrent(N, H, HV, K, V, torch.float32)
                b_st = common.bytes_recurrent(N, H, HV, K, V, sdt)
                b_rp = common.bytes_replayssm(N, H, HV, K, V, 16, sdt)
                for C in chunks:
                    t, e_kv, kv_err = try_bench(bench_kvbuffer, N, H, HV, K, V, C, sdt, dev, in_dt,
                                           gen, check)
                    b = common.bytes_kvbuffer(N, H, HV, K, V, C, sdt)
                    row = dict(tp=tp, H=H, HV=HV, K=K, V=V, state_dtype=sname, batch=N,
                               chunk_size=C,
                               fla_ms=t_fla, fla_state_dtype="fp32", fla_error=fla_err,
                               fla_model_bytes=b_rec, fla_bw_frac=bw_frac(b_rec, t_fla, bw),
                               stock_ms=t_st, stock_model_bytes=b_st,
                               stock_bw_frac=bw_frac(b_st, t_st, bw), stock_error=st_err,
                               stock_max_rel_err=e_st,
                               replayssm_ms=t_rp, replayssm_model_bytes=b_rp,
                               replayssm_bw_frac=bw_frac(b_rp, t_rp, bw),
                               replayssm_error=rp_err, replayssm_max_rel_err=e_rp,
                               kvbuffer_ms=t, kvbuffer_model_bytes=b,
                               kvbuffer_bw_frac=bw_frac(b, t, bw), kvbuffer_error=kv_err,
                               kvbuffer_max_rel_err=e_kv,
                               ratio_vs_fla=t / t_fla, ratio_vs_replayssm=t / t_rp)
                    res["rows"].append(row)
                    common.save(res, out)
                    print(f"{tp:>2} {sname:>5} {N:>4} {C:>3} {t_fla * 1e3:8.1f} {t_rp * 1e3:8.1f} "
                          f"{t * 1e3:8.1f} {t / t_fla:6.3f} {t / t_rp:7.3f} "
                          f"{(row['kvbuffer_bw_frac'] or float('nan')) * 100:6.1f}%", flush=True)
                    for name, e in (("fla", fla_err), ("stock", st_err), ("replayssm", rp_err),
                                    ("kvbuffer", kv_err)):
                        if e and not e.startswith("skipped"):
                            print(f"   {name}: {e[:200]}", flush=True)
    if args.smoke:
        common.finish_smoke(res, ("stock_max_rel_err", "kvbuffer_max_rel_err"), SMOKE_TOL, out,
                            optional=("replayssm_max_rel_err",))
    if args.plot:
        common.plot(res, out.with_suffix(".png"), x="batch",
                    series={"fla": "fla_ms", "ReplaySSM (SGLang)": "replayssm_ms",
                            "stock (ours)": "stock_ms", "KVBuffer": "kvbuffer_ms"},
                    title="GDN decode per step", group=("tp", "state_dtype", "chunk_size"))
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
