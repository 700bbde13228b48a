"""Speculative verify: KVBuffer verify + accept vs a recurrent kernel writing one state per draft.

For D = 1, 2, 4, 8 drafts (T = D + 1 tokens per request: last accepted + D drafts):
- ``kvbuffer``: ``verify`` (one pass over ``S0`` for all T tokens, T tentative buffer rows, no
  state written) followed by ``accept`` with a fixed random number of accepted tokens per request
  (a cursor move; requests whose buffer reaches C = 16 flush). Replays cycle through flushes as
  serving does.
- ``per_draft``: the stock vLLM / SGLang approach: the recurrent kernel reads ``S0`` and writes a
  full state after every draft token into its own slot (1 + D slots per request). fla 0.6's
  ``fused_recurrent_gated_delta_rule`` cannot write per-token states or index slots, so this is our
  own Triton kernel (``benchmarks/baselines.py::recurrent_pool(write_all=True)``); it is checked
  against the float64 recurrence, outputs and every per-draft state.
Bytes (``benchmarks/common.py``): KVBuffer ``N (s (1 + a/C) + L row + T row + T io)`` with the mean
committed length L = (C-1)/2 and a the mean accepted count; per-draft ``N (s + T s + T io)``.

Usage: python -m benchmarks.bench_verify [--batch 1,8,64,256] [--drafts 1,2,4,8]
       [--state-dtype fp32] [--tp 1] [--out verify.json] [--plot] [--smoke]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common

from benchmarks.common import DTYPES, bw_frac, time_ms

SMOKE_TOL = 1e-4
C = 16


def draft_inputs(N, T, H, HV, K, V, dev, in_dt, gen):
    return (torch.randn(N, T, H, K, generator=gen, device=dev).to(in_dt),
            torch.randn(N, T, H, K, generator=gen, device=dev).to(in_dt),
            torch.randn(N, T, HV, V, generator=gen, device=dev).to(in_dt),
            -torch.rand(N, T, HV, generator=gen, device=dev) * 0.1,
            torch.rand(N, T, HV, generator=gen, device=dev))


def bench_per_draft(N, T, H, HV, K, V, sdt, dev, in_dt, gen, check):
    from benchmarks.baselines import recurrent_pool, recurrent_pool_ref
    pool = N * (T + 1)
    state = (torch.randn(pool, HV, V, K, generator=gen, device=dev) * 0.05).to(sdt)
    perm = torch.randperm(pool, device=dev).to(torch.int32).view(N, T + 1)
    src, dst = perm[:, 0].contiguous(), perm[:, 1:].contiguous()
    ins = draft_inputs(N, T, H, HV, K, V, dev, in_dt, gen)
    err = None
    if check:
        o_ref, s_ref = recurrent_pool_ref(state, src, *ins)
        o = recurrent_pool(state, src, dst, *ins, write_all=True)
        err = max(common.rel_err(o, o_ref), common.rel_err(state[dst.long()], s_ref))
    return time_ms(lambda: recurrent_pool(state, src, dst, *ins, write_all=True), dev), err


def bench_kvbuffer_verify(N, T, H, HV, K, V, sdt, dev, in_dt, gen, check):
    from vllm_kvbuffer.kernels import (accept, allocate_cache, materialize_state, prefill,
                                       recurrent_gated_delta_rule, reset_slots, set_value_checks,
                                       verify)
    pool = N + 7
    cache = allocate_cache(pool, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, max_draft_tokens=T - 1, dtype=in_dt, state_dtype=sdt,
                           device=dev)
    slots = torch.randperm(pool, device=dev)[:N].to(torch.int32)
    reset_slots(cache, slots)
    lens = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(N)) + C
    Tp = int(lens.sum())
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    prefill(cache, slots, torch.randn(Tp, H, K, device=dev).to(in_dt),
            torch.randn(Tp, H, K, device=dev).to(in_dt),
            torch.randn(Tp, HV, V, device=dev).to(in_dt), -torch.rand(Tp, HV, device=dev) * 0.1,
            torch.rand(Tp, HV, device=dev), cu.to(dev), backend="torch")
    ins = draft_inputs(N, T, H, HV, K, V, dev, in_dt, gen)
    acc = torch.randint(1, T + 1, (N,), generator=torch.Generator().manual_seed(T)).to(
        torch.int32).to(dev)
    err = None
    if check:
        S0 = materialize_state(cache, slots).double()
        o = verify(cache, slots, *ins, backend="triton")
        refs = []
        for n in range(N):
            r, _ = recurrent_gated_delta_rule(*(x[n].double() for x in ins),
                                              initial_state=S0[n:n + 1])
            refs.append(r)
        err = common.rel_err(o, torch.stack(refs))
        accept(cache, slots, acc, backend="triton")

    def step():
        verify(cache, slots, *ins, backend="triton")
        accept(cache, slots, acc, backend="triton")
    with set_value_checks(False):
        return time_ms(step, dev), err, float(acc.float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32,64,128,256")
    ap.add_argument("--drafts", default="1,2,4,8")
    ap.add_argument("--state-dtype", default="fp32")
    ap.add_argument("--tp", default="1")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    dev, preset, in_dt = common.device_setup(args, "bench_verify.py")
    if args.smoke:
        batches, drafts, sdts, tps = [2], [1, 4], ["fp32"], [1]
    else:
        batches, drafts = common.ints(args.batch), common.ints(args.drafts)
        sdts, tps = args.state_dtype.split(","), common.ints(args.tp)
    gen = torch.Generator(device=dev).manual_seed(0)
    res = common.header("verify", dev, args.smoke, preset)
    res["chunk_size"] = C
    bw = res["copy_bandwidth_Bps"]
    out = common.pathlib.Path(args.out) if args.out else common.default_out("verify", dev)
    print(f"# {res['card']}; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'tp':>2} {'state':>5} {'N':>4} {'D':>2} {'perdraft':>9} {'kvb_us':>8} {'speedup':>7}")
    for tp in tps:
        H, HV, K, V = common.heads(tp, preset)
        for sname in sdts:
            sdt = DTYPES[sname]
            for N in batches:
                for D in drafts:
                    T = D + 1
                    row = dict(tp=tp, H=H, HV=HV, K=K, V=V, state_dtype=sname, batch=N,
                               drafts=D, chunk_size=C)
                    try:
                        t_pd, e_pd = bench_per_draft(N, T, H, HV, K, V, sdt, dev, in_dt, gen,
                                                     args.smoke)
                        row.update(per_draft_ms=t_pd, per_draft_max_rel_err=e_pd)
                    except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
                        t_pd = float("nan")
                        row.update(per_draft_ms=t_pd, per_draft_error=repr(e)[:400])
                    try:
                        t, e_kv, a = bench_kvbuffer_verify(N, T, H, HV, K, V, sdt, dev, in_dt,
                                                           gen, args.smoke)
                        row.update(kvbuffer_ms=t, kvbuffer_max_rel_err=e_kv, mean_accepted=a)
                    except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
                        t, a = float("nan"), (T + 1) / 2
                        row.update(kvbuffer_ms=t, kvbuffer_error=repr(e)[:400])
                    b_pd = common.bytes_verify_per_draft(N, H, HV, K, V, T, sdt)
                    b_kv = common.bytes_verify_kvbuffer(N, H, HV, K, V, T, (C - 1) / 2, sdt, C, a)
                    row.update(per_draft_model_bytes=b_pd, kvbuffer_model_bytes=b_kv,
                               per_draft_bw_frac=bw_frac(b_pd, t_pd, bw),
                               kvbuffer_bw_frac=bw_frac(b_kv, t, bw), speedup=t_pd / t,
                               per_draft_state_slots=T + 1, kvbuffer_state_slots=1)
                    res["rows"].append(row)
                    common.save(res, out)
                    print(f"{tp:>2} {sname:>5} {N:>4} {D:>2} {t_pd * 1e3:9.1f} {t * 1e3:8.1f} "
                          f"{t_pd / t:7.2f}", flush=True)
                    for k in ("per_draft_error", "kvbuffer_error"):
                        if k in row:
                            print("  ", k, row[k][:200])
    if args.smoke:
        common.finish_smoke(res, ("per_draft_max_rel_err", "kvbuffer_max_rel_err"), SMOKE_TOL, out)
    if args.plot:
        common.plot(res, out.with_suffix(".png"), x="batch",
                    series={"per-draft states": "per_draft_ms", "KVBuffer verify+accept":
                            "kvbuffer_ms"}, title="Speculative verify step",
                    group=("tp", "state_dtype", "drafts"))
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
