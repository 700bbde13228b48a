"""KVBuffer decode vs flash-linear-attention's fused recurrent kernel, same card, same run.

For each batch size, chunk size (flush interval C) and state dtype this times
- ``fla``: ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`` (what vLLM's GDN decode
  derives from): reads the fp32 state and writes a new fp32 state every step;
- ``kvbuffer``: ``vllm_kvbuffer.kernels.decode`` (Triton), amortised over whole flush cycles: one
  timed unit is C consecutive decode steps of every sequence (each sequence flushes once in it;
  sequences start at staggered buffer positions, as in serving), reported per step.
Both are captured in CUDA graphs (as vLLM runs decode), timed with CUDA events via
``triton.testing.do_bench`` (median). Bytes come from the byte model of
``shared/design/kvbuffer-math.md`` (minimum DRAM traffic); achieved bandwidth is reported against
the measured device-to-device copy bandwidth (bytes read + written). Results go to JSON.

Usage: python benchmarks/bench_decode.py [--batch 1,8,64,512] [--chunk 8,16,32,64]
       [--state-dtype fp32,bf16] [--tp 1,4] [--out benchmarks/results/decode-<card>.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_NEXT = dict(H=16, HV=32, K=128, V=128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def esz(dt):
    return torch.empty((), dtype=dt).element_size()


def copy_bandwidth(nbytes=1 << 30):
    import triton.testing as tt
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def graph_time(fn, reps_ms=100):
    """Median ms of one replay of a CUDA graph capturing ``fn`` (after an eager warm-up)."""
    import triton.testing as tt
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return tt.do_bench(g.replay, warmup=25, rep=reps_ms, return_mode="median")


def io_bytes(N, H, HV, K, V, in_dt=torch.bfloat16):
    # q, k, v, o in the model dtype; g, beta fp32
    return N * ((2 * H * K + 2 * HV * V) * esz(in_dt) + 2 * HV * 4)


def model_bytes_recurrent(N, H, HV, K, V, state_dt):
    s = HV * K * V * esz(state_dt)
    return 2 * N * s + io_bytes(N, H, HV, K, V)


def model_bytes_kvbuffer(N, H, HV, K, V, C, state_dt):
    """Per decode step, amortised over a flush cycle: read S0 every step, write it once per C,
    read the history rows (mean (C-1)/2 of them), append one row."""
    s = HV * K * V * esz(state_dt)
    row = H * K * 2 + HV * V * 4 + HV * 4
    return N * (s * (1 + 1 / C) + row * (C - 1) / 2 + row) + io_bytes(N, H, HV, K, V)


def make_inputs(N, H, HV, K, V, gen, n=1):
    dev = "cuda"
    out = []
    for _ in range(n):
        q = torch.randn(N, H, K, generator=gen, device=dev).to(torch.bfloat16)
        k = torch.randn(N, H, K, generator=gen, device=dev).to(torch.bfloat16)
        v = torch.randn(N, HV, V, generator=gen, device=dev).to(torch.bfloat16)
        g = -torch.rand(N, HV, generator=gen, device=dev) * 0.1
        b = torch.rand(N, HV, generator=gen, device=dev)
        out.append((q, k, v, g, b))
    return out


def bench_fla(N, H, HV, K, V, state_dt, gen):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fr
    (q, k, v, g, b), = make_inputs(N, H, HV, K, V, gen)
    h0 = torch.randn(N, HV, K, V, generator=gen, device="cuda").to(state_dt) * 0.01

    def step():
        fla_fr(q[:, None], k[:, None], v[:, None], g=g[:, None], beta=b[:, None],
               initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    return graph_time(step)


def bench_kvbuffer(N, H, HV, K, V, C, state_dt, gen):
    from vllm_kvbuffer.kernels import allocate_cache, decode, prefill, reset_slots
    from vllm_kvbuffer.kernels import set_value_checks
    pool = N + 7
    cache = allocate_cache(pool, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, dtype=torch.bfloat16, state_dtype=state_dt,
                           device="cuda")
    slots = torch.randperm(pool, device="cuda")[:N].to(torch.int32)
    reset_slots(cache, slots)
    # Every sequence gets a state and a staggered buffer position: C + r_i prompt tokens.
    lens = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(N)) + C
    T = int(lens.sum())
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    q = torch.randn(T, H, K, device="cuda").to(torch.bfloat16)
    k = torch.randn(T, H, K, device="cuda").to(torch.bfloat16)
    v = torch.randn(T, HV, V, device="cuda").to(torch.bfloat16)
    # Set-up only (not timed): the exact torch backend brings every slot to its position.
    prefill(cache, slots, q, k, v, -torch.rand(T, HV, device="cuda") * 0.1,
            torch.rand(T, HV, device="cuda"), cu.cuda(), backend="torch")
    steps = make_inputs(N, H, HV, K, V, gen, n=C)

    def cycle():
        for (q1, k1, v1, g1, b1) in steps:
            decode(cache, slots, q1, k1, v1, g1, b1, backend="triton")
    with set_value_checks(False):
        ms = graph_time(cycle)
    return ms / C


def versions():
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "fla"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable: {e}"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32,64,128,256,512")
    ap.add_argument("--chunk", default="8,16,32,64")
    ap.add_argument("--state-dtype", default="fp32,bf16")
    ap.add_argument("--tp", default="1")
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep decode launch configs at batch 128, C=16, fp32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA device")
    card = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    result = {"benchmark": "decode", "card": card, "date": datetime.datetime.now().isoformat(),
              "versions": versions(), "copy_bandwidth_Bps": bw, "preset": QWEN3_NEXT, "rows": []}
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" /
                       f"decode-{card.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {card}; copy bandwidth {bw / 1e12:.2f} TB/s; {result['versions']}")
    print(f"{'tp':>2} {'state':>5} {'N':>4} {'C':>3} {'fla_us':>8} {'kvb_us':>8} {'ratio':>6} "
          f"{'fla_bw%':>7} {'kvb_bw%':>7}")
    for tp in [int(x) for x in args.tp.split(",")]:
        H, HV, K, V = (QWEN3_NEXT["H"] // tp, QWEN3_NEXT["HV"] // tp, QWEN3_NEXT["K"],
                       QWEN3_NEXT["V"])
        for sname in args.state_dtype.split(","):
            sdt = DTYPES[sname]
            for N in [int(x) for x in args.batch.split(",")]:
                try:
                    t_fla = bench_fla(N, H, HV, K, V, torch.float32, gen)
                except Exception as e:  # noqa: BLE001
                    t_fla, fla_err = float("nan"), repr(e)[:300]
                else:
                    fla_err = None
                b_fla = model_bytes_recurrent(N, H, HV, K, V, torch.float32)
                for C in [int(x) for x in args.chunk.split(",")]:
                    row = dict(tp=tp, state_dtype=sname, batch=N, chunk_size=C,
                               fla_ms=t_fla, fla_state_dtype="fp32", fla_error=fla_err,
                               fla_model_bytes=b_fla)
                    try:
                        t = bench_kvbuffer(N, H, HV, K, V, C, sdt, gen)
                        b = model_bytes_kvbuffer(N, H, HV, K, V, C, sdt)
                        row.update(kvbuffer_ms=t, kvbuffer_model_bytes=b,
                                   ratio_vs_fla=t / t_fla,
                                   fla_bw_frac=b_fla / (t_fla * 1e-3) / bw,
                                   kvbuffer_bw_frac=b / (t * 1e-3) / bw)
                        print(f"{tp:>2} {sname:>5} {N:>4} {C:>3} {t_fla * 1e3:8.1f} "
                              f"{t * 1e3:8.1f} {t / t_fla:6.3f} {row['fla_bw_frac'] * 100:6.1f}% "
                              f"{row['kvbuffer_bw_frac'] * 100:6.1f}%", flush=True)
                    except Exception as e:  # noqa: BLE001
                        row["kvbuffer_error"] = repr(e)[:500]
                        print(f"{tp:>2} {sname:>5} {N:>4} {C:>3} ERROR {e!r}"[:300], flush=True)
                    result["rows"].append(row)
                    out.write_text(json.dumps(result, indent=1))
    if args.sweep:
        from vllm_kvbuffer.kernels import triton_impl
        result["sweep"] = []
        H, HV, K, V = (QWEN3_NEXT[x] for x in ("H", "HV", "K", "V"))
        for BV in (16, 32):
            for nw in (4, 8):
                for flush_dot in (False, True):
                    cfg = dict(BV=BV, num_warps=nw, flush_dot=flush_dot)
                    triton_impl.CONFIG_OVERRIDE.clear()
                    triton_impl.CONFIG_OVERRIDE["decode"] = cfg
                    for N in (8, 128):
                        try:
                            t = bench_kvbuffer(N, H, HV, K, V, 16, torch.float32, gen)
                            result["sweep"].append(dict(cfg, batch=N, ms=t))
                            print(f"sweep N={N} {cfg}: {t * 1e3:.1f} us", flush=True)
                        except Exception as e:  # noqa: BLE001
                            result["sweep"].append(dict(cfg, batch=N, error=repr(e)[:300]))
        triton_impl.CONFIG_OVERRIDE.clear()
        out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
