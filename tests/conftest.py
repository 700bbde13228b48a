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


#: Session fixtures that start something (a server, a cluster) every test using them must share:
#: their tests form one pytest-xdist group, whatever module they are in. (Other session fixtures
#: are files on disk, or run once per run through :func:`once_per_run`.)
SHARED_STARTS = {"kvbuffer_server": "kvbuffer_server", "ray_cluster": "ray"}


def _xdist_groups(items) -> dict[str, str]:
    """nodeid -> group: tests connected through a module- or class-scoped fixture, a
    :data:`SHARED_STARTS` fixture or an ``xdist_group`` marker are one group (union-find); any
    other test is a group of its own."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for item in items:
        keys = [f"{item.module.__name__}::{name}"
                for name, defs in item._fixtureinfo.name2fixturedefs.items()
                if defs and defs[-1].scope in ("module", "class", "package")]
        keys += [SHARED_STARTS[name] for name in item.fixturenames if name in SHARED_STARTS]
        marker = item.get_closest_marker("xdist_group")
        if marker is not None:
            keys.append(marker.args[0] if marker.args else marker.kwargs["name"])
        for key in keys:
            parent[find(key)] = find(item.nodeid)
    # Short names (xdist appends "@<group>" to each test id), the same on every worker.
    names: dict[str, str] = {}
    return {item.nodeid: names.setdefault(find(item.nodeid), f"g{len(names)}")
            for item in items}


def _starts_ray(item) -> bool:
    marker = item.get_closest_marker("xdist_group")
    return "ray_cluster" in item.fixturenames or (marker is not None and "ray" in marker.args)


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (``pytest.mark.gpu(reason=...)``) are skipped, with the marker's
    reason, where no CUDA device is present.

    ``make test`` runs on 2 pytest-xdist workers with ``--dist loadgroup``: a worker takes whole
    groups, so that every module fixture, server and cluster is started once
    (:func:`_xdist_groups`), and the rest spreads over both workers test by test.
    """
    groups = _xdist_groups(items)
    # The groups that start a Ray cluster are the longest chain of the second pass: scheduled
    # first (``--no-loadscope-reorder`` keeps this order), they do not leave one worker alone
    # at the end.
    first = {groups[item.nodeid] for item in items if _starts_ray(item)}
    items.sort(key=lambda item: groups[item.nodeid] not in first)     # stable
    for item in items:
        # xdist joins every xdist_group name a test carries: keep only the merged group's.
        item.own_markers = [m for m in item.own_markers if m.name != "xdist_group"]
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
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
def tiny_qwen3_5_fp32() -> str:
    return utils.family_checkpoint("qwen3_5")


@pytest.fixture(scope="session")
def kvbuffer_server(tiny_qwen3_5_fp32, tmp_path_factory):
    """One real ``vllm serve`` of the tiny float32 Qwen3.5 (``Qwen3_5ForCausalLM``; Qwen3-Next is
    served over Ray by examples/ray_tp_serve.py) with ``--load-plugin kvbuffer
    --kvbuffer-chunk-size 8`` and vLLM's defaults otherwise (prefix caching on, multiprocess
    engine), shared by every test that talks to it (tests/plugin/test_cli.py,
    tests/test_examples.py). ``.base``: the server root URL; ``.log_path``: its log."""
    log_path = tmp_path_factory.mktemp("kvbuffer-server") / "server.log"
    # vLLM's own thread count (OMP_NUM_THREADS unset, which make test sets to 1 for its other
    # engines): this server runs the KVBuffer kernels on every core of the machine.
    with utils.vllm_server([tiny_qwen3_5_fp32, "--load-plugin", "kvbuffer",
                            "--kvbuffer-chunk-size", "8", "--dtype", "float32", "--enforce-eager",
                            "--max-model-len", "512", "--served-model-name", "tiny"],
                           log_path=log_path, env={"OMP_NUM_THREADS": None}) as base:
        yield types.SimpleNamespace(base=base, log_path=log_path)
