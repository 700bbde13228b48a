"""The host architectures: every one registered under vLLM's own name to a class made by the one
mechanism (vllm_kvbuffer.model_executor.hybrid), and one log line for an architecture the plugin
does not serve. Engine runs of each family: tests/plugin/test_models.py."""

import importlib
import inspect
import logging
import types

import pytest

import vllm_kvbuffer
from vllm_kvbuffer import HOSTS, patches


@pytest.fixture(scope="module")
def registry():
    import vllm.plugins
    from vllm import ModelRegistry

    vllm.plugins.load_general_plugins()
    return ModelRegistry


@pytest.mark.parametrize("arch", list(HOSTS))
def test_host_registered_lazily_under_vllms_name(registry, arch):
    entry = registry.models[arch]
    module, cls = HOSTS[arch].split(":")
    assert (entry.module_name, entry.class_name) == (module, cls)


@pytest.mark.parametrize("arch", list(HOSTS))
def test_host_class_is_vllms_class_plus_the_mixin(registry, arch):
    """A subclass of vLLM's class with the mixin first, vLLM's constructor signature (the loader
    inspects it, the vision-language classes default to prefix "model"), and a promotion table
    whose KVBuffer layer classes promote exactly the stock GDN layer class."""
    from vllm_kvbuffer.model_executor.gdn_layer import KVBufferGDNLayerMixin
    from vllm_kvbuffer.model_executor.hybrid import KVBufferHybridMixin

    module, name = HOSTS[arch].split(":")
    cls = getattr(importlib.import_module(module), name)
    stock = cls.__mro__[2]                     # vLLM's class, right after the mixin
    assert cls.__mro__[1] is KVBufferHybridMixin and stock.__name__ == arch
    assert cls.__module__ == module and cls.__name__ == name
    params = inspect.signature(cls.__init__).parameters
    base_params = inspect.signature(stock.__init__).parameters
    assert params["prefix"].default == base_params["prefix"].default
    assert params["vllm_config"].kind is inspect.Parameter.KEYWORD_ONLY
    assert cls._kvbuffer_promotions
    for stock_layer, kvb_layer in cls._kvbuffer_promotions.items():
        assert issubclass(kvb_layer, (KVBufferGDNLayerMixin, stock_layer))
        assert kvb_layer.stock_class is stock_layer


def _config(archs, additional_config=None):
    return types.SimpleNamespace(model_config=types.SimpleNamespace(architectures=archs),
                                 additional_config=additional_config)


def test_uncovered_architecture_logs_one_line(caplog, monkeypatch):
    monkeypatch.delenv("VLLM_KVBUFFER", raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.kvbuffer"):
        assert patches.log_if_uncovered(_config(["KimiLinearForCausalLM"], {"kvbuffer": {}}))
        assert not patches.log_if_uncovered(_config(["KimiLinearForCausalLM"]))   # not asked
        assert not patches.log_if_uncovered(_config(["Qwen3_5ForCausalLM"], {"kvbuffer": {}}))
        monkeypatch.setenv("VLLM_KVBUFFER", "1")
        assert patches.log_if_uncovered(_config(["LlamaForCausalLM"]))
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.kvbuffer"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("KVBuffer was requested but KimiLinearForCausalLM is not an "
                               "architecture vllm-kvbuffer serves (it serves Qwen3NextForCausalLM")
    assert lines[0].endswith("this model runs stock vLLM")
    assert "LlamaForCausalLM" in lines[1]


def test_create_engine_config_is_wrapped_once(registry):
    from vllm.engine.arg_utils import EngineArgs

    vllm_kvbuffer.patches.apply()
    wrapped = EngineArgs.create_engine_config
    assert getattr(wrapped, patches._MARK, False)
    assert not getattr(wrapped.__wrapped__, patches._MARK, False)
