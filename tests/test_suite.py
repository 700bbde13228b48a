"""The test suite's own machinery: ``make test`` runs on pytest-xdist workers that must take whole
groups of tests (tests/conftest.py), or module fixtures, servers and clusters start twice."""

import os
import subprocess
import sys

import pytest

GROUPED = '''
import os
import pytest

@pytest.mark.xdist_group("one")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    with open(os.environ["WORKERS_FILE"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_free(i):
    pass
'''


def test_xdist_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    workers = tmp_path / "workers.txt"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-n", "2", "--dist", "loadgroup", "test_grouped.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORKERS_FILE": str(workers)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran_on = workers.read_text().split()
    assert len(ran_on) == 6 and len(set(ran_on)) == 1, ran_on


def test_engine_launcher_forks_across_tests():
    """Engines fork from the session's launcher (vLLM imported once) whenever the environment
    differs from the launcher's start only in variables read at use (``VLLM_*``, ``RAY_*``,
    pytest's own: ``PYTEST_CURRENT_TEST`` differs between any two tests) or in those that
    importing vLLM sets (this process may import vLLM after the launcher started). Any other
    difference gets a fresh interpreter."""
    from tests.utils import _EngineLauncher
    launcher = _EngineLauncher()
    started = {"PATH": "/bin", "PYTEST_CURRENT_TEST": "a.py::t (call)", "VLLM_X": "1",
               "LD_LIBRARY_PATH": "/lib"}
    launcher.set_env(started, dict(started, LD_LIBRARY_PATH="/cv2:/lib",
                                   TORCHINDUCTOR_COMPILE_THREADS="1"))
    assert launcher.unforkable(dict(started, PYTEST_CURRENT_TEST="b.py::u (setup)",
                                    VLLM_X="2", RAY_DEDUP_LOGS="0")) == []
    # This process imported vLLM since: the same variables, set the same way.
    assert launcher.unforkable(dict(started, LD_LIBRARY_PATH="/cv2:/lib",
                                    TORCHINDUCTOR_COMPILE_THREADS="1")) == []
    assert launcher.unforkable(dict(started, OMP_NUM_THREADS="2")) == ["OMP_NUM_THREADS"]
    assert launcher.unforkable(dict(started, TORCHINDUCTOR_COMPILE_THREADS="4")) == \
        ["TORCHINDUCTOR_COMPILE_THREADS"]
