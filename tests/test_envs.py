"""The settings table (``vllm_kvbuffer/envs.py``): every ``VLLM_KVBUFFER*`` variable is in it, is
read only through it, with one truthiness rule; the settings, the value checks and patch P3 use
it; the README shows exactly its table."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

from vllm_kvbuffer import envs
from vllm_kvbuffer.config import KVBufferSettings, resolve_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_kvbuffer"


def _sources():
    for folder in ("vllm_kvbuffer", "examples", "benchmarks", "scripts", "docker"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".sh", ".yaml", "") and "__pycache__" not in \
                    p.parts:
                yield p


def test_every_variable_in_the_tree_is_in_the_table():
    names = set()
    for p in [*_sources(), ROOT / "README.md", ROOT / "Makefile"]:
        names |= set(re.findall(r"\bVLLM_KVBUFFER\w*", p.read_text(errors="replace")))
    assert names and names <= set(envs.ENV_VARS), names - set(envs.ENV_VARS)


def test_variables_are_read_only_through_envs():
    """No module but envs.py reads a VLLM_KVBUFFER* variable itself (writing one for a child
    process, as tools/ray_cpu.py does, is fine), and the core never imports the Ray CPU aid."""
    read = re.compile(r"(os\.getenv\(|os\.environ\.get\(|os\.environ\[|environ\.get\()"
                      r"[^\n]*VLLM_KVBUFFER")
    for p in PACKAGE.rglob("*.py"):
        if p.name == "envs.py":
            continue
        text = p.read_text()
        assert not read.search(text), p
        if "tools" not in p.relative_to(PACKAGE).parts:
            assert not re.search(r"^\s*(from \S*\btools\b\S* import|import \S*\btools\b)", text,
                                 re.M), p


@pytest.mark.parametrize("text,value", [
    ("1", True), ("true", True), ("True", True), (" YES ", True), ("on", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False),
])
def test_one_truthiness_rule(text, value):
    for name, var in envs.ENV_VARS.items():
        if var.kind == "bool":
            assert envs.get(name, {name: text}) is value, name


@pytest.mark.parametrize("name,text,match", [
    ("VLLM_KVBUFFER", "maybe", r"VLLM_KVBUFFER: expected one of \('1', 'true'"),
    ("VLLM_KVBUFFER_VALUE_CHECKS", "2", r"VLLM_KVBUFFER_VALUE_CHECKS: expected one of"),
    ("VLLM_KVBUFFER_CHUNK_SIZE", "x", r"VLLM_KVBUFFER_CHUNK_SIZE: expected an int >= 1, got 'x'"),
    ("VLLM_KVBUFFER_CHUNK_SIZE", "0", r"VLLM_KVBUFFER_CHUNK_SIZE: expected an int >= 1, got '0'"),
    ("VLLM_KVBUFFER_BACKEND", "cuda", r"VLLM_KVBUFFER_BACKEND: expected one of \('auto'"),
])
def test_malformed_values_name_the_variable(name, text, match):
    with pytest.raises(ValueError, match=match):
        envs.get(name, {name: text})


def test_defaults_attribute_access_and_raw(monkeypatch):
    for name in envs.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
        assert envs.get(name) == envs.ENV_VARS[name].default
        assert getattr(envs, name) == envs.ENV_VARS[name].default
        assert envs.raw(name) is None
    monkeypatch.setenv("VLLM_KVBUFFER_CHUNK_SIZE", " 32 ")
    assert envs.VLLM_KVBUFFER_CHUNK_SIZE == 32 and envs.raw("VLLM_KVBUFFER_CHUNK_SIZE") == " 32 "
    monkeypatch.setenv("VLLM_KVBUFFER_CHUNK_SIZE", "")          # empty = unset
    assert envs.VLLM_KVBUFFER_CHUNK_SIZE == 16
    with pytest.raises(KeyError, match="not a vllm-kvbuffer variable"):
        envs.get("VLLM_KVBUFFERZ")
    with pytest.raises(AttributeError):
        envs.VLLM_KVBUFFERZ  # noqa: B018  (the attribute access is the check)
    assert KVBufferSettings() == KVBufferSettings(
        chunk_size=envs.ENV_VARS["VLLM_KVBUFFER_CHUNK_SIZE"].default,
        backend=envs.ENV_VARS["VLLM_KVBUFFER_BACKEND"].default)


def test_settings_from_environment_and_additional_config():
    assert resolve_settings(None, {}) is None
    assert resolve_settings(None, {"VLLM_KVBUFFER": "off", "VLLM_KVBUFFER_CHUNK_SIZE": "5"}) \
        is None
    assert resolve_settings(None, {"VLLM_KVBUFFER": "on"}) == KVBufferSettings()
    env = {"VLLM_KVBUFFER": "1", "VLLM_KVBUFFER_CHUNK_SIZE": "5", "VLLM_KVBUFFER_BACKEND": "torch"}
    assert resolve_settings(None, env) == KVBufferSettings(chunk_size=5, backend="torch")
    # additional_config activates by itself and wins over the environment, key by key.
    assert resolve_settings({"kvbuffer": {"chunk_size": 7}}, env) == \
        KVBufferSettings(chunk_size=7, backend="torch")
    assert resolve_settings({"kvbuffer": {}}, {}) == KVBufferSettings()
    with pytest.raises(ValueError, match="VLLM_KVBUFFER_CHUNK_SIZE: expected an int >= 1"):
        resolve_settings({"kvbuffer": {}}, {"VLLM_KVBUFFER_CHUNK_SIZE": "-1"})
    with pytest.raises(ValueError, match="VLLM_KVBUFFER: expected one of"):
        resolve_settings(None, {"VLLM_KVBUFFER": "please"})


def test_value_checks_default_comes_from_the_table(monkeypatch):
    from vllm_kvbuffer.kernels import validation

    try:
        monkeypatch.setenv("VLLM_KVBUFFER_VALUE_CHECKS", "off")
        assert not importlib.reload(validation).value_checks_enabled()
        monkeypatch.setenv("VLLM_KVBUFFER_VALUE_CHECKS", "nope")
        with pytest.raises(ValueError, match="VLLM_KVBUFFER_VALUE_CHECKS: expected one of"):
            importlib.reload(validation)
    finally:
        monkeypatch.delenv("VLLM_KVBUFFER_VALUE_CHECKS")
        importlib.reload(validation)
    assert validation.value_checks_enabled()


def test_readme_shows_the_table():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- envs table \(python -m vllm_kvbuffer\.envs\) -->\n(.*?)\n"
                  r"<!-- end envs table -->", readme, re.S)
    assert m, "README: the envs table markers are missing"
    assert m.group(1) == envs.markdown_table(), "README's table differs from the module's"
    # The options table names the same defaults.
    assert re.search(r"`VLLM_KVBUFFER_CHUNK_SIZE` \| 16 \|", readme)
    assert envs.ENV_VARS["VLLM_KVBUFFER_CHUNK_SIZE"].default == 16
    assert re.search(r"`VLLM_KVBUFFER_BACKEND` \| `auto` \|", readme)
    row = next(ln for ln in readme.splitlines() if "`--kvbuffer-backend`" in ln)
    assert all(f"`{b}`" in row for b in envs.BACKENDS), row


def test_p3_declares_exactly_the_table_to_vllm(monkeypatch):
    import vllm.envs

    from vllm_kvbuffer import patches

    patches.apply()
    declared = {n for n in vllm.envs.environment_variables if n.startswith("VLLM_KVBUFFER")}
    assert declared == set(envs.ENV_VARS) == set(patches.ENV_VARS)
    # vLLM reads every declared variable when it caches or hashes its environment, also in
    # engines without KVBuffer: its view is the raw text, so a typo cannot break those.
    monkeypatch.setenv("VLLM_KVBUFFER_BACKEND", "typo")
    assert vllm.envs.environment_variables["VLLM_KVBUFFER_BACKEND"]() == "typo"


def test_backends_defined_once_and_auto_decided_once():
    """One list of backends (settings, CLI choices and kernels share it) and one place that
    decides what "auto" means (the kernels' auto_backend, which the vLLM layer calls too)."""
    import torch

    from vllm_kvbuffer import config, kernels, patches
    from vllm_kvbuffer.kernels import api

    assert kernels.BACKENDS is api.BACKENDS is config.BACKENDS is patches.BACKENDS \
        is envs.BACKENDS
    assert kernels.auto_backend(torch.device("cpu")) == "cpu"
    assert kernels.auto_backend(torch.device("cuda", 0)) == "triton"
    assert kernels.auto_backend(torch.device("meta")) == "torch"
    layer = (PACKAGE / "model_executor" / "gdn_layer.py").read_text()
    assert "kernels.auto_backend(" in layer and '"triton" if' not in layer
