"""The plugin is found and called by vLLM's own loader; register() is re-entrant and guarded."""

import importlib.metadata as md
import logging

import pytest

import vllm_kvbuffer


@pytest.fixture
def fresh_plugin(monkeypatch):
    monkeypatch.setattr(vllm_kvbuffer, "_registered", False)
    monkeypatch.setattr(vllm_kvbuffer, "_compatible", None)
    return vllm_kvbuffer


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps.get("kvbuffer") == "vllm_kvbuffer:register"


def test_vllm_loader_calls_register(fresh_plugin, monkeypatch, caplog):
    import vllm.plugins as vp

    monkeypatch.setattr(vp, "plugins_loaded", False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.kvbuffer"):
        vp.load_general_plugins()
    assert fresh_plugin._registered
    assert fresh_plugin.vllm_compatible()
    msgs = [r.getMessage() for r in caplog.records if r.name == "vllm.kvbuffer"]
    assert any(m.startswith("vllm-kvbuffer 0.1.0 loaded (vLLM 0.32.") for m in msgs), msgs


def test_register_is_idempotent(fresh_plugin, caplog):
    with caplog.at_level(logging.INFO, logger="vllm.kvbuffer"):
        fresh_plugin.register()
        fresh_plugin.register()
    assert sum("loaded" in r.getMessage() for r in caplog.records) == 1


def test_wrong_vllm_version_stays_inactive(fresh_plugin, monkeypatch, caplog):
    monkeypatch.setattr(fresh_plugin, "_vllm_version", lambda: "0.31.2")
    with caplog.at_level(logging.INFO, logger="vllm.kvbuffer"):
        fresh_plugin.register()
    assert not fresh_plugin.vllm_compatible()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["vllm-kvbuffer 0.1.0 supports vLLM 0.32.x, found 0.31.2: the plugin stays "
                      "inactive"]


def test_vllm_plugins_filter_excludes_it(fresh_plugin, monkeypatch):
    """VLLM_PLUGINS names the plugins to load; one that does not name kvbuffer skips it."""
    import vllm.plugins as vp

    monkeypatch.setattr(vp, "plugins_loaded", False)
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    vp.load_general_plugins()
    assert not fresh_plugin._registered
