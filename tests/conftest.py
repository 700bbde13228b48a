"""Test-session defaults (caches and temp files inside the project; Triton interpreted on the
CPU) and the session's shared fixtures: tiny checkpoints, one reference engine run, one
``vllm serve``. Plain helpers live in ``tests/utils.py``."""

import fcntl
import json
import os
import types

import pytest

from tests import utils
from vllm_kvbuffer.tools.local_env import apply_local_env

apply_local_env(utils.ROOT)

# torch reads the cache locations at import, so it comes after apply_local_env. Triton kernels
# run interpreted on machines without a GPU; the flag must be set before any kernel is
# decorated, i.e. before vllm_kvbuffer.kernels' Triton modules are imported.
import torch  # noqa: E402  (after apply_local_env, see above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


#: Fixtures that start something (a server, a cluster) every test using them must share: their
#: tests form one pytest-xdist group, whatever module they are in.
SHARED_STARTS = {"kvbuffer_server": "kvbuffer_server", "ray_cluster": "ray"}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (``pytest.mark.gpu(reason=...)``) are skipped, with the marker's
    reason, where no CUDA device is present.

    ``make test`` runs on 2 pytest-xdist workers with ``--dist loadgroup``: a worker takes whole
    groups. Each test's group is its module (module fixtures are built once), or the group of the
    shared start-up fixture it uses (:data:`SHARED_STARTS`), or its own ``xdist_group`` marker.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = next((g for f, g in SHARED_STARTS.items() if f in item.fixturenames),
                         item.module.__name__)
            item.add_marker(pytest.mark.xdist_group(group))
        marker = item.get_closest_marker("gpu")
        if marker is not None and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=marker.kwargs.get("reason",
                                                                      "needs a CUDA device")))


def once_per_run(tmp_path_factory, name: str, compute):
    """``compute()`` (JSON-serialisable) once per test run: pytest-xdist workers share it through
    a file in the run's temp folder, the first one computing it while the others wait."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent          # the run's folder, above every worker's own
    path = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())


# Tiny checkpoints: built once per session (and reused from .cache/models across sessions).
@pytest.fixture(scope="session")
def tiny_fp32() -> str:
    return utils.tiny_checkpoint("float32")


@pytest.fixture(scope="session")
def tiny_bf16() -> str:
    return utils.tiny_checkpoint("bfloat16")


@pytest.fixture(scope="session")
def tiny_mtp_fp32() -> str:
    return utils.tiny_checkpoint("float32", mtp=True)


@pytest.fixture(scope="session")
def tiny_cyclic_mtp_fp32() -> str:
    return utils.tiny_cyclic_mtp_checkpoint()


@pytest.fixture(scope="session")
def greedy_fp32_c4(tiny_fp32, tmp_path_factory):
    """One engine per test run (shared by the workers, :func:`once_per_run`): tiny float32
    checkpoint, KVBuffer C = 4, ``utils.PROMPTS``, 300 greedy tokens each (TP 1, eager,
    in-process). The reference of every test that compares another way of serving the same
    requests (HF, torch.compile, tensor parallel, Ray) against plain TP 1: shorter runs compare
    with its first tokens. Returns ``(outputs, process)``: the process's ``stdout``, ``stderr``,
    ``returncode`` and ``info``."""
    def run():
        outs, proc = utils.run_engine(dict(model=tiny_fp32, dtype="float32",
                                           prompts=utils.PROMPTS, max_tokens=300,
                                           additional_config={"kvbuffer": {"chunk_size": 4}}))
        return {"outputs": outs, "stdout": proc.stdout, "stderr": proc.stderr,
                "returncode": proc.returncode, "info": proc.info}

    done = once_per_run(tmp_path_factory, "greedy_fp32_c4", run)
    return done["outputs"], types.SimpleNamespace(**{k: v for k, v in done.items()
                                                     if k != "outputs"})


@pytest.fixture(scope="session")
def kvbuffer_server(tiny_fp32, tmp_path_factory):
    """One real ``vllm serve`` of the tiny float32 checkpoint with ``--load-plugin kvbuffer
    --kvbuffer-chunk-size 8`` and vLLM's defaults otherwise (prefix caching on, multiprocess
    engine), shared by every test that talks to it (tests/plugin/test_cli.py,
    tests/test_examples.py). ``.base``: the server root URL; ``.log_path``: its log."""
    log_path = tmp_path_factory.mktemp("kvbuffer-server") / "server.log"
    # vLLM's own thread count (OMP_NUM_THREADS unset, which make test sets to 1 for its other
    # engines): this server runs the KVBuffer kernels on every core of the machine.
    with utils.vllm_server([tiny_fp32, "--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", "8",
                            "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                            "--served-model-name", "tiny"], log_path=log_path,
                           env={"OMP_NUM_THREADS": None}) as base:
        yield types.SimpleNamespace(base=base, log_path=log_path)
