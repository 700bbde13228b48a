"""benchmarks/bench_capacity.py by direct calls: its table, figure and log reading on the saved
results of its last real run (``benchmarks/results/capacity-cpu/capacity.json``), so that the
suite starts no server for it. The real run (two servers per configuration, minutes) is
``python -m benchmarks.bench_capacity [--smoke]``."""

import json

from benchmarks import bench_capacity
from tests import utils

RESULTS = utils.ROOT / "benchmarks" / "results" / "capacity-cpu" / "capacity.json"


def test_table_and_figure_from_saved_results(tmp_path):
    res = json.loads(RESULTS.read_text())
    tab = bench_capacity.table(res["rows"], res["arithmetic"])
    by = {(t["drafts"], t["prefix_caching"]): t for t in tab}
    d4 = by[(4, False)]
    # The saved run: KVBuffer's drafts were accepted, and the ratio is the peaks' ratio.
    assert d4["kvbuffer_drafted_accepted"][1] > 0
    assert d4["peak_ratio"] == d4["kvbuffer_peak_running"] / d4["stock_peak_running"]
    assert d4["arithmetic_ratio"] == d4["arithmetic_kvbuffer"] / d4["arithmetic_stock"]
    # A stock row that failed keeps its status in the table; the prefix-caching rows have no
    # arithmetic (it is prefix caching off's).
    assert by[(4, True)]["stock_status"] != "ok" and by[(4, True)]["arithmetic_stock"] is None
    text = bench_capacity.print_table(tab)
    assert "| 4 | off |" in text
    png = bench_capacity.plot(res, tmp_path / "capacity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_facts(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "(EngineCore pid=1) INFO 12-07 [kv_cache_utils.py:1] Maximum concurrency for 512 tokens "
        "per request: 49.75x\n"
        "(EngineCore pid=1) INFO 12-07 [hybrid.py:2] KVBuffer active: chunk_size=16, backend=auto"
        ", 6 GDN layers on this rank\n"
        "(Worker pid=2) ERROR 12-07 [x.py:3] RuntimeError: The size of tensor a (7) must match "
        "the size of tensor b (4) at non-singleton dimension 1\n")
    facts = bench_capacity.log_facts(log)
    assert facts["max_concurrency"] == 49.75
    assert facts["kvbuffer_line"].startswith("KVBuffer active: chunk_size=16")
    assert facts["error_line"].startswith("RuntimeError: The size of tensor a (7)")


def test_prompts_walk_distinct_cycles():
    a, b = bench_capacity.prompt(0, 12), bench_capacity.prompt(1, 12)
    assert a[:6] == [100, 101, 102, 103, 104, 100] and b[0] == 105 and a != b
