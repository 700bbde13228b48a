"""``--load-plugin kvbuffer`` through vLLM's real parser, and a real ``vllm serve`` on 127.0.0.1."""

import json
import os
import re
import sys

import pytest

from tests.utils import post_json
from vllm_kvbuffer.envs import BACKENDS


def _parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())   # loads the plugin first


def _engine_args(model, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _parser().parse_args(["--model", model] + argv)   # loads the plugin (patches) first
    return AsyncEngineArgs.from_cli_args(args)


def test_flags_fold_into_additional_config(tiny_fp32):
    ea = _engine_args(tiny_fp32, ["--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", "8",
                                  "--kvbuffer-backend", "torch"])
    assert ea.additional_config == {"kvbuffer": {"chunk_size": 8, "backend": "torch"}}
    ea = _engine_args(tiny_fp32, ["--load-plugin", "kvbuffer", "--additional-config",
                                  '{"kvbuffer": {"chunk_size": 4}, "other": 1}'])
    assert ea.additional_config == {"kvbuffer": {"chunk_size": 4}, "other": 1}
    assert not _engine_args(tiny_fp32, []).additional_config     # inactive: nothing added


@pytest.mark.parametrize("argv,match", [
    (["--load-plugin", "nope"], r"argument --load-plugin: invalid choice: 'nope'"),
    (["--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", "0"],
     r"argument --kvbuffer-chunk-size: must be an integer >= 1, got '0'"),
    (["--kvbuffer-backend", "cuda"], r"argument --kvbuffer-backend: invalid choice: 'cuda'"),
])
def test_bad_flags_are_parse_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--model", "m"] + argv)
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_options_without_load_plugin_are_an_error(tiny_fp32):
    with pytest.raises(ValueError, match=r"--kvbuffer-chunk-size / --kvbuffer-backend need "
                                         r"--load-plugin kvbuffer"):
        _engine_args(tiny_fp32, ["--kvbuffer-chunk-size", "8"])


def test_patches_are_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvbuffer import patches

    _parser()
    add, frm = EngineArgs.add_cli_args, EngineArgs.__dict__["from_cli_args"].__func__
    patches.apply()
    patches.apply()
    assert EngineArgs.add_cli_args is add
    assert EngineArgs.__dict__["from_cli_args"].__func__ is frm
    assert not getattr(add.__wrapped__, "_kvbuffer_patch", False)
    parser = patches.add_kvbuffer_args(_parser())           # a second group is never added
    assert sum(a.dest == "load_plugin" for a in parser._actions) == 1


def _vllm_cli(argv, monkeypatch, capsys):
    """``vllm <argv>`` run in this process: the function the ``vllm`` executable calls, without a
    new Python importing vLLM for every call (the real executable serves in ``kvbuffer_server``).
    Returns the exit code, stdout and stderr."""
    from vllm.entrypoints.cli.main import main

    monkeypatch.setattr(sys, "argv", ["vllm", *argv])
    # vLLM's CLI sets this for its own process; keep it from leaking into later tests.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD",
                       os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_vllm_serve_help_lists_the_options(monkeypatch, capsys):
    code, out, err = _vllm_cli(["serve", "--help"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    # argparse wraps the group description to the terminal's width
    assert "KVBuffer linear-attention cache for Gated DeltaNet models" in " ".join(out.split())
    assert "--load-plugin kvbuffer" in out
    code, section, err = _vllm_cli(["serve", "--help=kvbuffer"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    for flag in ("--load-plugin NAME", "--kvbuffer-chunk-size C",
                 "--kvbuffer-backend {" + ",".join(BACKENDS) + "}"):
        assert flag in section, section


@pytest.mark.parametrize("argv,match", [
    (["--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", "0"],
     "argument --kvbuffer-chunk-size: must be an integer >= 1, got '0'"),
    (["--load-plugin", "kvbuffr"], "argument --load-plugin: invalid choice: 'kvbuffr'"),
])
def test_vllm_serve_bad_settings_fail_at_startup(tiny_fp32, argv, match, monkeypatch, capsys):
    code, _, err = _vllm_cli(["serve", tiny_fp32, *argv], monkeypatch, capsys)
    assert code == 2
    assert match in err


@pytest.mark.slow
def test_vllm_serve_with_load_plugin(kvbuffer_server):
    """vLLM's defaults (prefix caching on, multiprocess engine) plus the plugin flags (the
    session's shared server of a tiny Qwen3.5, tests/conftest.py): completion, chat completion,
    streaming."""
    base = kvbuffer_server.base
    body = {"model": "tiny", "prompt": "Hello world, the quick brown fox", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    comp = json.loads(post_json(base + "/v1/completions", body))
    text = comp["choices"][0]["text"]
    assert comp["usage"]["completion_tokens"] == 24 and text
    chat = json.loads(post_json(base + "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 12, "temperature": 0, "ignore_eos": True}))
    assert chat["usage"]["completion_tokens"] == 12
    assert chat["choices"][0]["message"]["content"]
    stream = post_json(base + "/v1/completions", dict(body, stream=True))
    chunks = [json.loads(line[len("data: "):]) for line in stream.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(chunks) >= 2 and stream.rstrip().endswith("data: [DONE]")
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    log = kvbuffer_server.log_path.read_text()
    assert "Resolved architecture: Qwen3_5ForCausalLM" in log
    assert "KVBuffer active: chunk_size=8, backend=auto, 3 GDN layers" in log


def test_plugin_env_vars_are_declared_to_vllm(monkeypatch):
    """vLLM validates VLLM_* variables (strictly with hard_fail); the plugin's are known."""
    from vllm.platforms.interface import Platform

    from vllm_kvbuffer import patches

    _parser()
    patches.apply()
    for name in patches.ENV_VARS:
        monkeypatch.setenv(name, "1")
    Platform.validate_environ(hard_fail=True)
    monkeypatch.setenv("VLLM_KVBUFFERZ", "1")
    with pytest.raises(ValueError, match="Unknown vLLM environment variable detected: "
                                         "VLLM_KVBUFFERZ"):
        Platform.validate_environ(hard_fail=True)
