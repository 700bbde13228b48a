"""``python -m benchmarks.bench_capacity --smoke`` runs end to end: a stock and a KVBuffer
``vllm serve`` (tiny shapes, one ngram draft, prefix caching off, a 4 MiB KV budget) each get
more requests than fit; the JSON records a peak of running requests for both, and the PNG is
drawn."""

import json
import subprocess
import sys

import pytest

from tests import utils

pytest.importorskip("vllm")
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_bench_capacity_smoke(tmp_path):
    # Its own process, as the benchmark is run: it imports vLLM and loads the plugins for the
    # arithmetic, and starts two servers one after the other.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_capacity", "--smoke",
                           "--out", str(tmp_path)], cwd=str(utils.ROOT), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((tmp_path / "capacity.json").read_text())
    assert res["smoke"] is True and res["versions"]["vllm"]
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"stock-D1-pcoff", "kvbuffer-D1-pcoff"}
    for label, r in rows.items():
        assert r["status"] == "ok", (label, r.get("error_line"), r.get("error"))
        assert r["peak_running"] > 0, (label, r)
        assert r["drafted"] > 0, (label, r)
        assert r["max_concurrency"] and r["max_concurrency"] > 0, (label, r)
        assert r["requests_fired"] > r["max_concurrency"], (label, r)
    assert rows["kvbuffer-D1-pcoff"]["accepted"] > 0, rows    # KVBuffer's commits were exercised
    # vLLM's start-up line and the arithmetic for the same checkpoint and budget agree.
    for kind in ("stock", "kvbuffer"):
        arith = res["arithmetic"][f"{kind}-D1"]["max_concurrency"]
        assert rows[f"{kind}-D1-pcoff"]["max_concurrency"] == pytest.approx(arith, rel=1e-3)
    assert res["table"][0]["peak_ratio"] > 0
    png = tmp_path / "capacity.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
