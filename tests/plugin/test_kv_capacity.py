"""The capacity claim with vLLM's own arithmetic (benchmarks/kv_capacity.py), Qwen3-Next-80B and
Qwen3.5 configurations, 4 MTP draft tokens, fp32 state, C = 16: stock per-request
linear-attention bytes over KVBuffer's >= 4.0 (the ideal is 5: stock keeps 1 + 4 state slots,
KVBuffer one state plus its buffer), and vLLM's maximum concurrency grows accordingly."""

import pytest


@pytest.fixture(scope="module")
def capacity():
    import vllm.plugins

    from benchmarks import kv_capacity

    vllm.plugins.load_general_plugins()
    return kv_capacity


@pytest.mark.parametrize("model_name,gdn_layers",
                         [("Qwen3-Next-80B-A3B", 36), ("Qwen3.5 (Qwen3_5TextConfig defaults)", 24)])
@pytest.mark.parametrize("tp", [1, 4])
def test_four_drafts_fp32_state(capacity, tmp_path, tp, model_name, gdn_layers):
    model = capacity._model_dir(tmp_path, model_name)
    stock = capacity.measure(model, tp=tp, num_spec=4, state="float32", kvbuffer=False)
    kvb = capacity.measure(model, tp=tp, num_spec=4, state="float32", kvbuffer=True)
    assert stock["architecture"] == capacity.MODELS[model_name][1]
    assert stock["mamba_blocks_per_request"] == 5 and kvb["mamba_blocks_per_request"] == 1
    assert stock["gdn_layers"] == kvb["gdn_layers"] == gdn_layers
    ratio = stock["linear_bytes_per_request"] / kvb["linear_bytes_per_request"]
    assert 4.0 <= ratio <= 5.0, ratio
    assert kvb["max_concurrency"] > 1.9 * stock["max_concurrency"]
