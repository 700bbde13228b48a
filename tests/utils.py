"""Test utilities shared by every test module: tiny checkpoints, one engine per process, a real
``vllm serve``, the examples as subprocesses, free ports.

Fixtures live in ``tests/conftest.py`` (session-scoped: each checkpoint is built once, and one
``vllm serve`` per configuration is shared by the tests that need it); this module holds the plain
functions they and the tests call, so that nothing imports from a conftest.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "models"
EXAMPLES = ROOT / "examples"
VLLM = str(pathlib.Path(sys.executable).with_name("vllm"))

#: Prompts of the shared greedy reference (fixture ``greedy_fp32_c4``) and of the engine tests;
#: the last is shorter than every chunk size (it starts on the short-context path).
PROMPTS = ["Hello world, the quick brown fox", "Once upon a time there was a tiny model that",
           "a b"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Tiny checkpoints (the same folders the examples build and reuse)
# ----------------------------------------------------------------------------------------------


def tiny_checkpoint(dtype: str = "float32", *, mtp: bool = False) -> str:
    """The project's tiny random Qwen3-Next (built once under ``.cache/models``, then reused)."""
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    name = "tiny-qwen3-next" + ("-mtp" if mtp else "") + {"float32": "-fp32",
                                                            "bfloat16": ""}[dtype]
    return str(build_tiny_qwen3_next(MODELS / name, dtype=dtype, mtp=mtp))


#: The other GDN families (tests/plugin/test_models.py): family -> the tiny checkpoint's builder
#: fields, its architecture name. ``qwen3_5_vl``: the Qwen3.5 vision-language class.
FAMILIES = {
    "qwen3_5": (dict(arch="qwen3_5", mtp=True), "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": (dict(arch="qwen3_5_moe", mtp=True), "Qwen3_5MoeForCausalLM"),
    "olmo_hybrid": (dict(arch="olmo_hybrid", neg_eigval=True), "OlmoHybridForCausalLM"),
}
VL_FIELDS = dict(arch="qwen3_5", vision=True)
#: Successor checkpoints' cycle length: greedy text walks groups of this many token ids.
SUCCESSOR_PERIOD = 5


def successor_fields(arch: str) -> dict:
    """Builder fields that make a family's checkpoint a successor variant: greedy text mostly
    walks cycles of :data:`SUCCESSOR_PERIOD` token ids, with the family's layer scale
    (``SUCCESSOR_LAYER_SCALES``), so that n-gram and MTP drafts are both accepted and rejected
    (random weights alone give almost no accepted drafts)."""
    from vllm_kvbuffer.tools.tiny_checkpoint import SUCCESSOR_LAYER_SCALES

    return dict(successor_period=SUCCESSOR_PERIOD, layer_scale=SUCCESSOR_LAYER_SCALES[arch])


def family_checkpoint(family: str, *, successor: bool = False) -> str:
    """The tiny float32 checkpoint of a :data:`FAMILIES` family (or ``qwen3_5_vl``), built once
    under ``.cache/models``; ``successor``: its successor variant (:func:`successor_fields`)."""
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_checkpoint

    fields = dict(VL_FIELDS if family == "qwen3_5_vl" else FAMILIES[family][0])
    name = f"tiny-{family.replace('_', '-')}-fp32"
    if successor:
        fields.update(successor_fields(fields["arch"]))
        name += "-successor"
    return str(build_tiny_checkpoint(MODELS / name, dtype="float32", **fields))


def tiny_cyclic_mtp_checkpoint() -> str:
    """The tiny float32 Qwen3-Next with an MTP layer, successor variant
    (:func:`successor_fields`): n-gram and MTP drafts both partly accepted, partly rejected."""
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_checkpoint

    return str(build_tiny_checkpoint(MODELS / "tiny-qwen3-next-mtp-fp32-successor",
                                     dtype="float32", mtp=True,
                                     **successor_fields("qwen3_next")))


# ----------------------------------------------------------------------------------------------
# HF transformers float32, the reference of the engine tests
# ----------------------------------------------------------------------------------------------

#: HF's own top-1 margin below which a different engine token is a tie, and the bound on
#: |engine logprob - HF logprob| of every generated token.
HF_MARGIN = 1e-3
HF_LOGPROB_TOL = 1e-4


class HFReference:
    """HF transformers float32, teacher-forced: log-softmax over a whole token sequence."""

    def __init__(self, path: str):
        import torch
        import transformers

        arch = json.loads((pathlib.Path(path) / "config.json").read_text())["architectures"][0]
        self.model = getattr(transformers, arch).from_pretrained(
            path, dtype=torch.float32).eval()

    def check(self, outputs: list[dict], *, what: str, inputs: list[dict] | None = None
              ) -> None:
        """``inputs``: per output, extra keyword inputs of the HF model (images)."""
        import torch

        for i, o in enumerate(outputs):
            prompt, gen = o["prompt_token_ids"], o["token_ids"]
            ids = torch.tensor([prompt + gen])
            with torch.no_grad():
                lp = torch.log_softmax(self.model(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    **(inputs[i] if inputs else {})).logits[0].float(), -1)
            for t, tok in enumerate(gen):
                row = lp[len(prompt) + t - 1]
                margin = float(row.max() - row[tok])
                assert margin <= HF_MARGIN, (
                    f"{what}, request {i}, token {t}: engine token {tok}, HF argmax "
                    f"{int(row.argmax())} by {margin:.3g} logprob (expected <= {HF_MARGIN})")
                diff = abs(o["logprobs"][t] - float(row[tok]))
                assert diff <= HF_LOGPROB_TOL, (
                    f"{what}, request {i}, token {t}: logprob {o['logprobs'][t]} vs HF "
                    f"{float(row[tok])} (expected |difference| <= {HF_LOGPROB_TOL})")



# ----------------------------------------------------------------------------------------------
# One engine per process
# ----------------------------------------------------------------------------------------------


class _EngineLauncher:
    """The session's ``python -m tests.engine_run --serve``: started on first use, it forks one
    child per engine (see tests/engine_run.py), so vLLM is imported once per session instead of
    once per engine. Stopped at interpreter exit."""

    #: Variables read when they are used, not when a library loads: a child may set them
    #: differently from the launcher. Any other difference (``OMP_NUM_THREADS``, ``LD_PRELOAD``,
    #: ``NUMBA_*``, ...: read by libraries the launcher has loaded) gets a plain subprocess.
    #: ``PYTEST_*``: pytest's own (``PYTEST_CURRENT_TEST`` names the running test, so it differs
    #: between any two tests), read by no library.
    LATE_READ_PREFIXES = ("VLLM_", "RAY_", "PYTEST_")

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}           # the environment it was started with
        self.imported: dict[str, str] = {}      # variables its own imports set (vLLM's)
        self.folder = ROOT / ".cache" / "tmp" / f"engines-{os.getpid()}"

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.engine_run", "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.folder / "launcher.log", "w"), text=True,
                                     cwd=str(ROOT), env=os.environ.copy())
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the engine launcher died:\n"
                               + (self.folder / "launcher.log").read_text()[-4000:])
        self.set_env(dict(os.environ), json.loads(line)["env"])

    def set_env(self, started: dict, after_import: dict) -> None:
        self.env = started
        self.imported = {k: v for k, v in after_import.items() if started.get(k) != v}

    def unforkable(self, env: dict) -> list[str]:
        """The variables that keep a child forked from the launcher from seeing what a fresh
        interpreter given ``env`` would (empty: fork). Allowed differences from the launcher's
        start: late-read variables, and those importing vLLM sets (the same in both, whether or
        not this process has imported vLLM since the launcher started)."""
        bad = []
        for k in sorted(env.keys() | self.env.keys()):
            v = env.get(k)
            if v == self.env.get(k) or k.startswith(self.LATE_READ_PREFIXES):
                continue
            if k in self.imported and v in (None, self.imported[k]):
                continue
            bad.append(k)
        return bad

    def run(self, spec: dict, env: dict, timeout: int) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        unforkable = self.unforkable(env)
        if unforkable:
            proc = subprocess.run([sys.executable, "-m", "tests.engine_run", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=str(ROOT))
            proc.unforkable = unforkable
            return proc
        name = uuid.uuid4().hex[:8]
        out, err = self.folder / f"{name}.out", self.folder / f"{name}.err"
        request = {"spec": spec, "env": env, "cwd": str(ROOT), "stdout": str(out),
                   "stderr": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the engine launcher died:\n"
                               + (self.folder / "launcher.log").read_text()[-4000:])
        reply = json.loads(line)
        stdout, stderr = out.read_text(), err.read_text()
        out.unlink()
        err.unlink()
        args = [sys.executable, "-m", "tests.engine_run", json.dumps(spec)]
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
        proc = subprocess.CompletedProcess(args, reply["returncode"], stdout, stderr)
        proc.cpu_s = reply["cpu_s"]
        return proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_launcher = _EngineLauncher()
atexit.register(_launcher.stop)


def run_engine(spec: dict, *, env: dict | None = None, expect_ok: bool = True,
               timeout: int = 600):
    """Run one engine (``tests/engine_run.py``) in a fresh process forked by the session's engine
    launcher, with ``os.environ`` plus ``env`` as its environment; return its parsed outputs and
    the finished process (``proc.stdout``, ``proc.stderr``, ``proc.returncode``; ``proc.info``:
    the runner's info dict), or with ``expect_ok=False`` the process only."""
    proc = _launcher.run(spec, dict(os.environ, **(env or {})), timeout)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    proc.info = result["info"]
    return result["outputs"], proc


def assert_drafts_accepted(proc, what: str) -> tuple[float, float]:
    """The drafted and accepted draft tokens of an engine run (vLLM's metrics), printed with its
    prefix-cache hits. A speculative run in which no draft, or every draft, was accepted tested
    one side of the commit only: it fails."""
    m = proc.info["metrics"]
    drafted = m["vllm:spec_decode_num_draft_tokens"]
    accepted = m["vllm:spec_decode_num_accepted_tokens"]
    print(f"{what}: drafted {drafted}, accepted {accepted}, prefix cache hits "
          f"{m.get('vllm:prefix_cache_hits')}")
    assert 0 < accepted < drafted, (what, m)
    return drafted, accepted


def assert_same_greedy(got: list[dict], ref: list[dict], *, logprob_tol: float | None = 5e-5,
                       prefix: bool = False) -> None:
    """Per request: the same prompt and generated tokens as ``ref`` (with ``prefix``: the first
    ``len(got)`` tokens of a longer reference run), logprobs within ``logprob_tol``."""
    assert len(got) == len(ref), (len(got), len(ref))
    for a, b in zip(got, ref):
        n = len(a["token_ids"])
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == (b["token_ids"][:n] if prefix else b["token_ids"])
        if logprob_tol is not None:
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"][:n])) \
                <= logprob_tol


# ----------------------------------------------------------------------------------------------
# A real vllm serve
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def vllm_server(argv: list[str], *, log_path: pathlib.Path, env: dict | None = None,
                timeout: float = 240, launcher: list[str] | None = None):
    """Run ``vllm serve <argv> --host 127.0.0.1 --port P`` (``launcher`` replaces ``[vllm]``,
    e.g. ``[python, -m, module]``; ``env`` adds variables, or removes those given as None); wait
    for ``/health``; yield ``http://127.0.0.1:P``.

    The server gets its own process group; SIGINT at the end, SIGKILL if it does not stop within
    a minute. Its output goes to ``log_path`` (the tail is in the failure message if it dies).
    """
    port = free_port()
    log = open(log_path, "w+")
    cmd = [*(launcher or [VLLM]), "serve", *argv, "--host", "127.0.0.1", "--port", str(port)]
    server_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    for key, value in (env or {}).items():     # a value of None removes a variable
        if value is None:
            server_env.pop(key, None)
        else:
            server_env[key] = value
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                              start_new_session=True, env=server_env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert server.poll() is None, pathlib.Path(log_path).read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"server did not come up in {timeout} s"
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def post_json(url: str, body: dict, timeout: float = 120) -> str:
    """POST ``body`` as JSON; the response text."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


# ----------------------------------------------------------------------------------------------
# The examples
# ----------------------------------------------------------------------------------------------


def run_example(name: str, *argv: str, timeout: int = 300,
                env: dict | None = None) -> tuple[str, str, str]:
    """Run ``examples/<name>``; return its stdout, stdout + stderr, and a tail for messages."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))
    log = f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    return proc.stdout, proc.stdout + proc.stderr, log


# ----------------------------------------------------------------------------------------------
# A throw-away local Ray cluster
# ----------------------------------------------------------------------------------------------
# ``ray start --head --block`` runs as a child of the test; stopping it (SIGTERM) makes Ray end the
# processes of that node. Whatever survives (found by the cluster's own temp folder or address in
# its command line) is killed by process id. ``ray stop`` is never used: it would end every Ray
# process on the machine, other people's clusters included.

RAY = str(pathlib.Path(sys.executable).with_name("ray"))


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def cluster_pids(markers: list[str]) -> list[int]:
    """Processes whose command line names one of ``markers``, and their descendants."""
    found = [int(p.name) for p in pathlib.Path("/proc").iterdir() if p.name.isdigit()
             and int(p.name) != os.getpid() and any(m in _cmdline(int(p.name)) for m in markers)]
    todo, seen = list(found), set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += _children(pid)
    return sorted(seen)


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class LocalRayCluster:
    def __init__(self, *, num_cpus: int = 2, num_gpus: int = 0,
                 object_store_bytes: int = 100 * 1024 * 1024, env: dict | None = None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short: Ray's socket paths live under it and AF_UNIX paths are limited to 107 bytes.
        self.temp_dir = ROOT / ".cache" / f"ray-{uuid.uuid4().hex[:8]}"
        self.num_cpus, self.num_gpus, self.object_store_bytes = num_cpus, num_gpus, \
            object_store_bytes
        # ``env``: variables for the cluster's processes (a value of None removes one). Ray
        # workers inherit them, and vLLM's Ray executor copies the driver's VLLM_* variables only
        # where a worker lacks them (setdefault): a variable set here wins over the driver's.
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        for key, value in {"RAY_ADDRESS": None, **(env or {})}.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.proc: subprocess.Popen | None = None
        self.log = self.temp_dir.with_suffix(".log")

    def start(self, timeout: float = 120) -> "LocalRayCluster":
        self.temp_dir.mkdir(parents=True)
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(self.port), "--num-cpus", str(self.num_cpus),
               "--num-gpus", str(self.num_gpus), "--object-store-memory",
               str(self.object_store_bytes), "--include-dashboard", "false",
               "--dashboard-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()),
               "--ray-client-server-port", str(free_port()),
               "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            st = subprocess.run([RAY, "status", "--address", self.address], capture_output=True,
                                text=True, env=self.env, timeout=60)
            if st.returncode == 0 and "Active:" in st.stdout:
                return self
            time.sleep(1)
        raise TimeoutError("Ray head did not come up:\n" + self.log.read_text()[-3000:])

    def pids(self) -> list[int]:
        return cluster_pids([str(self.temp_dir), f":{self.port} ", f":{self.port}\0"])

    def stop(self, grace: float = 20) -> list[int]:
        """End this cluster's processes; returns those still alive afterwards (none expected)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        leftover = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftover:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_alive(p) for p in leftover):
                time.sleep(0.5)
            leftover = [p for p in leftover if _alive(p)]
            if not leftover:
                break
        if not leftover:   # kept for a post-mortem otherwise
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.log.unlink(missing_ok=True)
        return leftover
