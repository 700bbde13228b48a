"""Per-device tuned launch configs: lookup, fallback with one warning, malformed files."""

import json
import re
import warnings

import pytest
import torch

from vllm_kvbuffer.kernels import allocate_cache, tuning

SHAPE = dict(H=2, HV=4, K=16, V=16, C=8, state_dtype="float32")


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "_device_name", lambda device: "Fake GPU 9000 (SXM)")
    tuning.clear_caches()
    yield tmp_path / "Fake_GPU_9000_SXM.json"
    tuning.clear_caches()


def write(path, kinds):
    path.write_text(json.dumps({"device": "Fake GPU 9000 (SXM)", "kinds": kinds}))


def test_device_key():
    assert tuning.device_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuning.config_path("NVIDIA H200").name == "NVIDIA_H200.json"


def test_picks_config_by_shape_and_batch(fake_gpu):
    write(fake_gpu, {"decode": [
        {"shape": SHAPE, "batch_le": 8, "config": {"BV": 32, "num_warps": 8, "splits": 2}},
        {"shape": SHAPE, "batch_le": 256, "config": {"BV": 16, "num_warps": 2}},
        {"shape": dict(SHAPE, C=64), "config": {"BV": 64}},
    ], "block": [{"shape": {"K": 16}, "config": {"BV": 8, "num_warps": 2}}]})
    assert tuning.lookup("decode", SHAPE, 4, "cuda") == {"BV": 32, "num_warps": 8, "splits": 2}
    assert tuning.lookup("decode", SHAPE, 100, "cuda") == {"BV": 16, "num_warps": 2}
    assert tuning.lookup("decode", SHAPE, 1000, "cuda") == {}          # beyond every bucket
    assert tuning.lookup("decode", dict(SHAPE, C=64), 1000, "cuda") == {"BV": 64}
    # Through the Triton wrapper's config selection (the cache's shape is SHAPE).
    cache = allocate_cache(4, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                           chunk_size=8)
    cfg = tuning.launch_config(cache, "decode", batch=4)
    assert (cfg["BV"], cfg["num_warps"], cfg["splits"], cfg["BK"]) == (32, 8, 2, 16)
    assert tuning.launch_config(cache, "block")["BV"] == 8
    assert tuning.launch_config(cache, "flush")["BV"] == 16       # default kept


def test_override_beats_tuned(fake_gpu, monkeypatch):
    write(fake_gpu, {"decode": [{"shape": SHAPE, "config": {"BV": 32}}]})
    monkeypatch.setitem(tuning.CONFIG_OVERRIDE, "decode", {"BV": 64})
    cache = allocate_cache(4, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                           chunk_size=8)
    assert tuning.launch_config(cache, "decode", batch=1)["BV"] == 64


def test_missing_file_warns_once_and_uses_defaults(fake_gpu):
    cache = allocate_cache(4, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                           chunk_size=8)
    tuning.clear_caches()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfgs = [tuning.launch_config(cache, kind, batch=b)
                for kind in ("decode", "block", "flush") for b in (1, 64)]
    mine = [x for x in w if "no tuned launch configs" in str(x.message)]
    assert len(mine) == 1
    assert "Fake GPU 9000 (SXM)" in str(mine[0].message)
    assert "Fake_GPU_9000_SXM.json" in str(mine[0].message)
    tuning.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Defaults unchanged by the (missing) file.
        assert cfgs[0]["BV"] == 16 and cfgs[0]["num_warps"] == 4


def test_cpu_device_never_warns():
    tuning.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.lookup("decode", SHAPE, 1, torch.device("cpu")) == {}


@pytest.mark.parametrize("kinds,key", [
    ({"decode": [{"shape": SHAPE, "config": {"num_warps": "4"}}]},
     "kinds.decode[0].config.num_warps"),
    ({"decode": [{"shape": SHAPE, "config": {"BV": 16, "bogus": 1}}]},
     "kinds.decode[0].config.bogus"),
    ({"decode": [{"shape": {"Q": 1}, "config": {}}]}, "kinds.decode[0].shape"),
    ({"decode": [{"shape": SHAPE, "batch_le": 0, "config": {}}]}, "kinds.decode[0].batch_le"),
    ({"prefill": []}, "kinds.prefill"),
    ({"decode": {}}, "kinds.decode"),
    ({"block": [{"shape": SHAPE}]}, "kinds.block[0].config"),
])
def test_malformed_file_names_file_and_key(fake_gpu, kinds, key):
    write(fake_gpu, kinds)
    pattern = r"Fake_GPU_9000_SXM\.json: malformed tuning file at key '" + re.escape(key) + "'"
    with pytest.raises(ValueError, match=pattern):
        tuning.lookup("decode", SHAPE, 1, "cuda")


def test_not_json(fake_gpu):
    fake_gpu.write_text("{not json")
    with pytest.raises(ValueError, match=r"Fake_GPU_9000_SXM\.json: malformed tuning file "
                                         r"\(not JSON\)"):
        tuning.lookup("decode", SHAPE, 1, "cuda")
