"""Every benchmark script runs end to end in --smoke mode (CPU, interpreted Triton, tiny shapes),
checks its outputs against the float64 recurrence, and writes JSON with the expected keys."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

HEADER = {"benchmark", "card", "device", "smoke", "date", "versions", "copy_bandwidth_Bps",
          "preset", "byte_model", "rows"}
ROW_KEYS = {
    "decode": {"tp", "state_dtype", "batch", "chunk_size", "fla_ms", "fla_model_bytes",
               "fla_bw_frac", "stock_ms", "replayssm_ms", "replayssm_model_bytes",
               "replayssm_bw_frac", "kvbuffer_ms", "kvbuffer_model_bytes", "kvbuffer_bw_frac",
               "ratio_vs_fla", "ratio_vs_replayssm"},
    "short_context": {"tp", "batch", "buffered_tokens", "fla_ms", "stock_ms", "kvbuffer_ms",
                      "rewind_ms", "kvbuffer_model_bytes", "fla_model_bytes", "speedup_vs_fla",
                      "speedup_vs_stock"},
    "verify": {"tp", "state_dtype", "batch", "drafts", "per_draft_ms", "kvbuffer_ms",
               "per_draft_model_bytes", "kvbuffer_model_bytes", "speedup", "mean_accepted"},
    "layer_stack": {"state_dtype", "batch", "layers", "stock_ms", "kvbuffer_ms",
                    "stock_model_bytes", "kvbuffer_model_bytes", "ratio"},
}


@pytest.mark.parametrize("name", ["decode", "short_context", "verify", "layer_stack"])
def test_smoke_runs_and_checks(name, tmp_path, capsys):
    import importlib
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    out = tmp_path / f"{name}.json"
    mod.main(["--smoke", "--out", str(out), "--plot"])
    res = json.loads(out.read_text())
    assert HEADER <= set(res)
    assert res["benchmark"] == name and res["smoke"] is True and res["rows"]
    for row in res["rows"]:
        assert ROW_KEYS[name] <= set(row), ROW_KEYS[name] - set(row)
        assert not any(row.get(k) for k in row if k.endswith("_error")
                       and k not in ("fla_error", "replayssm_error"))
    assert res["smoke_check"]["passed"], res["smoke_check"]
    # No matplotlib here: the PNG is skipped with a clear message, the JSON stays.
    try:
        import matplotlib  # noqa: F401  (whether it imports is the question)
    except ImportError:
        assert "--plot needs matplotlib" in capsys.readouterr().err
    else:
        assert out.with_suffix(".png").is_file()


def test_tune_smoke_writes_a_loadable_file(tmp_path):
    from benchmarks import tune
    from vllm_kvbuffer.kernels import tuning
    out = tmp_path / "cpu.json"
    tune.main(["--smoke", "--out", str(out)])
    kinds = tuning.load(out)
    assert set(kinds) == {"decode", "verify", "flush"}
    cfg = tuning.select(kinds, "decode", dict(H=2, HV=4, K=16, V=16, C=4,
                                              state_dtype="float32"), 2)
    assert cfg["BV"] == 16 and cfg["num_stages"] in (2, 3)
