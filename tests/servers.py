"""A real ``vllm serve`` for tests: started on 127.0.0.1 on a free port, always stopped."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
VLLM = str(pathlib.Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(argv: list[str], *, log_path: pathlib.Path, env: dict | None = None,
                timeout: float = 240, launcher: list[str] | None = None):
    """Run ``vllm serve <argv> --host 127.0.0.1 --port P`` (``launcher`` replaces ``[vllm]``,
    e.g. ``[python, -m, module]``); wait for ``/health``; yield ``http://127.0.0.1:P``.

    The server gets its own process group; SIGINT at the end, SIGKILL if it does not stop within
    a minute. Its output goes to ``log_path`` (the tail is in the failure message if it dies).
    """
    port = free_port()
    log = open(log_path, "w+")
    cmd = [*(launcher or [VLLM]), "serve", *argv, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                              start_new_session=True,
                              env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **(env or {})))
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
