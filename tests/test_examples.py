"""The examples, run for real as subprocesses against tiny float32 checkpoints on the CPU.

The engine tests start one or two vLLM engines each (the OpenAI client talks to the session's
shared ``vllm serve``, fixture ``kvbuffer_server``) and are marked slow. The header/README checks
take a second.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
import xml.dom.minidom

import pytest

from tests.utils import EXAMPLES, ROOT, assert_same_greedy, cluster_pids, run_example

EXAMPLE_FILES = ["offline_generate.py", "openai_client.py", "spec_decode.py"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_header_and_help(name):
    """Each example says how to run it on a GPU and on the CPU, and parses its arguments with
    argparse (``--help`` works without starting anything)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    assert "On a GPU" in doc and "On the CPU" in doc, doc
    assert f"examples/{name}" in doc, doc
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--model" in proc.stdout, proc.stdout + proc.stderr


def test_readme_lists_the_examples_and_the_picture():
    readme = (ROOT / "README.md").read_text()
    for name in EXAMPLE_FILES + ["generate_tiny.py"]:
        assert f"(examples/{name})" in readme, name
    assert "(docs/kvbuffer.svg)" in readme
    svg = xml.dom.minidom.parse(str(ROOT / "docs" / "kvbuffer.svg")).documentElement
    assert svg.tagName == "svg" and svg.getAttribute("viewBox")


@pytest.mark.slow
def test_demo_runs_offline_generate(tiny_fp32):
    """``make demo`` (examples/generate_tiny.py) is examples/offline_generate.py with the demo's
    settings, so one run checks both: the demo's options reach the offline example's parser and
    the engine (chunk size 8 is neither script's default), three prompts, fixed-length greedy
    completions, the demo's verdict."""
    out, full, log = run_example("generate_tiny.py", "--max-tokens", "8",
                                 "--kvbuffer-chunk-size", "8")
    assert "KVBuffer active: chunk_size=8" in full, log
    assert "(KVBuffer, chunk_size=8)" in out, log
    prompts = re.findall(r"^prompt: +(.*)$", out, re.M)
    completions = re.findall(r"^completion: (.*) \((\d+) tokens, finish_reason=length\)$", out,
                             re.M)
    assert len(prompts) == len(completions) == 3, log
    assert ast.literal_eval(prompts[0]) == "Hello world, the quick brown fox"
    for text, n_tokens in completions:
        assert int(n_tokens) == 8 and ast.literal_eval(text), log   # full length, non-empty
    assert "generated 24 tokens for 3 prompts" in out, log
    assert re.search(r"^demo ok: 3 prompts$", out, re.M), log


@pytest.mark.slow
def test_spec_decode_check_equals_greedy(tiny_cyclic_mtp_fp32):
    """``--check`` (a no-draft reference run, then the speculative run, token for token) on the
    cyclic checkpoint, where drafts are both accepted and rejected. MTP here; that n-gram drafts
    give greedy tokens too is tests/plugin/test_engine.py's (320 tokens, both methods)."""
    out, full, log = run_example("spec_decode.py", "--method", "mtp", "--model",
                                 tiny_cyclic_mtp_fp32, "--max-tokens", "32", "--ignore-eos",
                                 "--kvbuffer-chunk-size", "4", "--check")
    assert "KVBuffer active: chunk_size=4" in full, log
    assert "(mtp, 3 drafts, KVBuffer chunk_size=4)" in out, log
    assert re.search(r"^check ok: speculative output equals greedy \(2 prompts, 64 tokens\)$",
                     out, re.M), log
    m = re.search(r"^drafts: (\d+)  draft tokens: (\d+)  accepted tokens: (\d+)$", out, re.M)
    assert m, log
    drafts, drafted, accepted = map(int, m.groups())
    assert drafts > 0 and 0 < accepted < drafted, log    # drafts both accepted and rejected
    assert re.search(r"^acceptance rate: 0\.\d+  mean acceptance length: \d\.\d\d$", out, re.M)


@pytest.mark.slow
def test_spec_decode_default_checkpoint(tiny_mtp_fp32):
    """As written in its docstring: the default checkpoint (tiny, random, with an MTP layer),
    here with n-gram drafts."""
    out, full, log = run_example("spec_decode.py", "--method", "ngram", "--max-tokens", "8",
                                 "--ignore-eos", "--kvbuffer-chunk-size", "4")
    assert "KVBuffer active: chunk_size=4" in full, log
    assert "(ngram, 3 drafts, KVBuffer chunk_size=4)" in out, log
    completions = re.findall(r"^completion: (.*) \((\d+) tokens\)$", out, re.M)
    assert len(completions) == 2 and {n for _, n in completions} == {"8"}, log
    assert re.search(r"^drafts: \d+  draft tokens: \d+  accepted tokens: \d+$", out, re.M), log
    assert re.search(r"^acceptance rate: \d\.\d+  mean acceptance length: \d\.\d\d$", out, re.M)


@pytest.mark.slow
def test_openai_client_against_vllm_serve(kvbuffer_server):
    out, _, log = run_example("openai_client.py", "--base-url", kvbuffer_server.base + "/v1",
                              "--max-tokens", "12", "--ignore-eos", timeout=180)
    assert "KVBuffer active: chunk_size=8" in kvbuffer_server.log_path.read_text()
    assert re.search(r"^model: tiny$", out, re.M), log
    text = re.search(r"^\[completion\] text: (.*) \(12 tokens, finish_reason=length\)$", out, re.M)
    assert text and ast.literal_eval(text.group(1)), log
    chat = re.search(r"^\[chat\] assistant: (.*) \(12 tokens\)$", out, re.M)
    assert chat and ast.literal_eval(chat.group(1)), log
    stream = re.search(r"^\[stream\] text: (.*) \((\d+) chunks\)$", out, re.M)
    assert stream and int(stream.group(2)) >= 2, log
    assert ast.literal_eval(stream.group(1)) == ast.literal_eval(text.group(1)), log
    assert "[stream] equals the completion: True" in out, log


@pytest.mark.slow
@pytest.mark.xdist_group("ray")       # one Ray cluster at a time (tests/plugin/test_ray.py's)
def test_ray_tp_serve_matches_tp1(greedy_fp32_c4, tmp_path):
    """examples/ray_tp_serve.py: a real ``vllm serve --tensor-parallel-size 2
    --distributed-executor-backend ray`` on a local Ray head the example starts (without the
    KVBuffer variables) and stops itself. Every rank is a distinct Ray actor process that loads
    the plugin and runs KVBuffer with the server's settings (chunk_size from the
    ``--kvbuffer-chunk-size`` flag; backend from VLLM_KVBUFFER_BACKEND, which only vLLM's copy of
    the engine's VLLM_* variables brings to the workers); /v1/completions returns the greedy
    tokens and logprobs of TP 1 (the shared reference engine); no Ray process is left."""
    ref, _ = greedy_fp32_c4
    ref = [ref[0], ref[2]]                    # one prompt on the short-context path ("a b")
    result = tmp_path / "tp2.json"
    out, full, log = run_example(
        "ray_tp_serve.py", "--max-tokens", "40", "--prompt", "Hello world, the quick brown fox",
        "--prompt", "a b", "--json", str(result), timeout=500,
        env={"RAY_DEDUP_LOGS": "0", "VLLM_KVBUFFER_BACKEND": "torch"})
    assert len(re.findall(r"^\[TP2/ray\] '.*' -> '.+'$", out, re.M)) == 2, log
    assert out.rstrip().endswith("ray_tp_serve: ok, 2 prompts, 40 tokens each, "
                                 "tensor_parallel_size=2 over Ray"), log
    tp2 = json.loads(result.read_text())
    server_log = pathlib.Path(tp2["server_log"]).read_text()
    loaded = set(re.findall(r"\(RayWorkerProc pid=(\d+)\).*vllm-kvbuffer \S+ loaded", server_log))
    assert len(loaded) == 2, (loaded, server_log[-3000:])
    for rank in (0, 1):
        lines = re.findall(rf"^\[server\] \(RayWorkerProc pid=(\d+)\).*Worker_TP{rank} .*KVBuffer "
                           r"active: chunk_size=4, backend=torch, (\d+) GDN layers on this rank",
                           out, re.M)
        assert len(lines) == 1 and lines[0][0] in loaded, (rank, lines, log)
        assert int(lines[0][1]) == 3
    assert all(len(o["token_ids"]) == 40 for o in tp2["outputs"])
    assert_same_greedy(tp2["outputs"], ref, prefix=True)
    temp = re.search(r"^\[ray head\] temp dir (\S+)$", out, re.M)
    assert temp, log
    assert not cluster_pids([temp.group(1)]), "Ray processes of the example left running"
