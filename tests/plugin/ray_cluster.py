"""A throw-away local Ray cluster for tests: one head node, its own ports and temp folder.

``ray start --head --block`` runs as a child of the test; stopping it (SIGTERM) makes Ray end the
processes of that node. Whatever survives (found by the cluster's own temp folder or address in
its command line) is killed by process id. ``ray stop`` is never used: it would end every Ray
process on the machine, other people's clusters included.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[2]
RAY = str(pathlib.Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@contextlib.contextmanager
def local_ray_cluster(**kwargs):
    cluster = LocalRayCluster(**kwargs)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
