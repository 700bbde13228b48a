"""Pick per-shape launch configs for the KVBuffer Triton kernels and save them per device.

For each kernel kind (``decode``; ``verify``; ``flush`` = accept; ``block`` = prefill keeps its
built-in defaults) and each shape (TP 1 and TP 4 heads of Qwen3-Next, state dtype, flush interval
C, batch bucket) this times every candidate config (CUDA graph, median; decode amortised over a
whole flush cycle) with ``tuning.CONFIG_OVERRIDE`` and keeps the fastest. The result goes to
``vllm_kvbuffer/kernels/configs/<device>.json`` (format: :mod:`vllm_kvbuffer.kernels.tuning`),
which the kernels read at launch; shapes without an entry keep the built-in defaults.

Usage: python -m benchmarks.tune [--batch 8,64,256] [--tp 1,4] [--state-dtype fp32,bf16]
       [--out PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks import common

DECODE_SPACE = dict(BV=(16, 32), num_warps=(4, 8), num_stages=(3, 4, 5))
VERIFY_SPACE = dict(BV=(16, 32), num_warps=(2, 4), num_stages=(3, 4))
BLOCK_SPACE = dict(BV=(16, 32), num_warps=(2, 4, 8))


def candidates(space: dict):
    keys = list(space)
    return [dict(zip(keys, vals)) for vals in itertools.product(*space.values())]


def time_config(kind, cfg, N, H, HV, K, V, C, sdt, dev, in_dt, gen):
    from benchmarks.bench_decode import bench_kvbuffer
    from benchmarks.bench_verify import bench_kvbuffer_verify
    from vllm_kvbuffer.kernels import tuning
    tuning.CONFIG_OVERRIDE.clear()
    tuning.CONFIG_OVERRIDE[kind] = dict(cfg)
    try:
        if kind == "decode":
            return bench_kvbuffer(N, H, HV, K, V, C, sdt, dev, in_dt, gen, False)[0]
        # verify and flush are timed together (verify + accept, 4 drafts); only `kind` varies.
        return bench_kvbuffer_verify(N, 5, H, HV, K, V, sdt, dev, in_dt, gen, False)[0]
    finally:
        tuning.CONFIG_OVERRIDE.clear()


def _save(result, out):
    """Only a file the kernels' loader accepts is written."""
    from vllm_kvbuffer.kernels import tuning
    tuning.validate(result, out)
    common.save(result, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="8,64,256")
    ap.add_argument("--tp", default="1,4")
    ap.add_argument("--state-dtype", default="fp32")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--out", default=None, help="default: the package's configs/<device>.json")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole flow")
    args = ap.parse_args(argv)
    from vllm_kvbuffer.kernels import tuning
    dev, preset, in_dt = common.device_setup(args, "tune.py")
    if args.smoke:
        batches, tps, sdts, C = [2], [1], ["fp32"], 4
        spaces = {"decode": dict(BV=(16,), num_warps=(4,), num_stages=(2, 3)),
                  "verify": dict(BV=(16,), num_warps=(2,), num_stages=(2,)),
                  "flush": dict(BV=(16,), num_warps=(4,))}
        name = "cpu smoke"
    else:
        batches, tps, sdts = common.ints(args.batch), common.ints(args.tp), \
            args.state_dtype.split(",")
        C = args.chunk
        spaces = {"decode": DECODE_SPACE, "verify": VERIFY_SPACE, "flush": BLOCK_SPACE}
        name = torch.cuda.get_device_name()
    out = common.pathlib.Path(args.out) if args.out else tuning.config_path(name)
    gen = torch.Generator(device=dev).manual_seed(0)
    import triton
    result = {"device": name, "triton": triton.__version__, "torch": torch.__version__,
              "tuned_by": "benchmarks/tune.py", "kinds": {k: [] for k in spaces}, "timings": []}
    for tp, sname, N in itertools.product(tps, sdts, batches):
        H, HV, K, V = common.heads(tp, preset)
        sdt = common.DTYPES[sname]
        for kind, space in spaces.items():
            timed = []
            for cfg in candidates(space):
                try:
                    ms = time_config(kind, cfg, N, H, HV, K, V, C, sdt, dev, in_dt, gen)
                except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
                    ms, err = float("nan"), repr(e)[:200]
                else:
                    err = None
                timed.append((ms, cfg))
                result["timings"].append(dict(kind=kind, tp=tp, state_dtype=sname, batch=N,
                                              config=cfg, ms=ms, error=err))
            ok = [(ms, cfg) for ms, cfg in timed if ms == ms]
            if not ok:
                continue
            ms, best = min(ok, key=lambda x: x[0])
            shape = dict(H=H, HV=HV, K=K, V=V, state_dtype=str(sdt).replace("torch.", ""))
            if kind == "decode":
                shape["C"] = C
            result["kinds"][kind].append(dict(shape=shape, batch_le=N, config=best,
                                              ms=round(ms, 6)))
            print(f"tp={tp} {sname} N={N} {kind}: best {best} {ms * 1e3:.1f} us "
                  f"(of {len(ok)})", flush=True)
            _save(result, out)      # after every shape: a time-limited run keeps what it found
    _save(result, out)
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
