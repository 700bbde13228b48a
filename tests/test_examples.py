"""The examples, run for real as subprocesses against tiny float32 checkpoints on the CPU.

The engine tests start one or two vLLM engines (or a ``vllm serve``) each and are marked slow:
together about 2 minutes on 2 cores. The header/README checks take a second.
"""

from __future__ import annotations

import ast
import contextlib
import xml.dom.minidom
import pathlib
import re
import subprocess
import sys

import pytest

from .servers import vllm_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = ROOT / ".cache" / "models"

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


def _run_example(name: str, *argv: str, timeout: int = 300) -> tuple[str, str, str]:
    """Run ``examples/<name>``; return its stdout, stdout + stderr, and a tail for messages."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    log = f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    return proc.stdout, proc.stdout + proc.stderr, log


def _tiny_fp32(mtp: bool = False) -> str:
    """The tiny checkpoints the examples build by default (and tests/plugin uses)."""
    from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

    name = "tiny-qwen3-next-mtp-fp32" if mtp else "tiny-qwen3-next-fp32"
    return str(build_tiny_qwen3_next(MODELS / name, dtype="float32", mtp=mtp))


@pytest.mark.slow
def test_offline_generate():
    out, full, log = _run_example("offline_generate.py", "--max-tokens", "8", "--ignore-eos",
                                  "--kvbuffer-chunk-size", "4")
    assert "KVBuffer active: chunk_size=4" in full, log
    prompts = re.findall(r"^prompt: +(.*)$", out, re.M)
    completions = re.findall(r"^completion: (.*) \((\d+) tokens, finish_reason=length\)$", out,
                             re.M)
    assert len(prompts) == len(completions) == 3, log
    assert ast.literal_eval(prompts[0]) == "Hello world, the quick brown fox"
    for text, n_tokens in completions:
        assert int(n_tokens) == 8 and ast.literal_eval(text), log
    assert "generated 24 tokens for 3 prompts" in out, log


@pytest.fixture(scope="module")
def cyclic_mtp_checkpoint():
    """A tiny checkpoint on which n-gram and MTP drafts are partly accepted, partly rejected
    (random weights alone give almost no accepted drafts)."""
    from tests.plugin.conftest import make_cyclic_checkpoint

    return make_cyclic_checkpoint(_tiny_fp32(mtp=True),
                                  MODELS / "tiny-qwen3-next-mtp-fp32-cyclic-4", layer_scale=4.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_spec_decode_check_equals_greedy(cyclic_mtp_checkpoint, method):
    out, full, log = _run_example("spec_decode.py", "--method", method, "--model",
                                  cyclic_mtp_checkpoint, "--max-tokens", "32", "--ignore-eos",
                                  "--kvbuffer-chunk-size", "4", "--check")
    assert "KVBuffer active: chunk_size=4" in full, log
    assert f"({method}, 3 drafts, KVBuffer chunk_size=4)" in out, log
    assert re.search(r"^check ok: speculative output equals greedy \(2 prompts, 64 tokens\)$",
                     out, re.M), log
    m = re.search(r"^drafts: (\d+)  draft tokens: (\d+)  accepted tokens: (\d+)$", out, re.M)
    assert m, log
    drafts, drafted, accepted = map(int, m.groups())
    assert drafts > 0 and 0 < accepted < drafted, log    # drafts both accepted and rejected
    assert re.search(r"^acceptance rate: 0\.\d+  mean acceptance length: \d\.\d\d$", out, re.M)


@pytest.mark.slow
def test_spec_decode_default_checkpoint():
    """As written in its docstring: the default (tiny, random, with an MTP layer) checkpoint."""
    _tiny_fp32(mtp=True)
    out, _, log = _run_example("spec_decode.py", "--method", "mtp", "--max-tokens", "8")
    completions = re.findall(r"^completion: (.*) \((\d+) tokens\)$", out, re.M)
    assert len(completions) == 2, log
    assert re.search(r"^drafts: \d+  draft tokens: \d+  accepted tokens: \d+$", out, re.M), log


@contextlib.contextmanager
def _vllm_serve(model: str, *argv: str, log_path: pathlib.Path, timeout: float = 240):
    """A real ``vllm serve`` on 127.0.0.1 (free port); yields the OpenAI API root URL."""
    with vllm_server([model, *argv], log_path=log_path, timeout=timeout) as base:
        yield base + "/v1"


@pytest.mark.slow
def test_openai_client_against_vllm_serve(tmp_path):
    log_path = tmp_path / "server.log"
    with _vllm_serve(_tiny_fp32(), "--load-plugin", "kvbuffer", "--kvbuffer-chunk-size", "8",
                     "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                     "--served-model-name", "tiny", log_path=log_path) as base_url:
        out, _, log = _run_example("openai_client.py", "--base-url", base_url,
                                   "--max-tokens", "12", "--ignore-eos", timeout=180)
    assert "KVBuffer active: chunk_size=8" in log_path.read_text()
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
def test_ray_tp_serve():
    """Tensor parallel 2 through vLLM's Ray executor on a local Ray head the example starts and
    stops itself; the plugin is active on both ranks (Ray forwards the workers' logs)."""
    out, full, log = _run_example("ray_tp_serve.py", "--max-tokens", "8", timeout=400)
    assert len(re.findall(r"^\[TP2/ray\] '.*' -> '.+'$", out, re.M)) == 2, log
    assert out.rstrip().endswith("ray_tp_serve: ok, 2 prompts, 8 tokens each, "
                                 "tensor_parallel_size=2 over Ray"), log
    ranks = set(re.findall(r"\((Worker_TP\d) pid=\d+\).*KVBuffer active: chunk_size=4, "
                           r"backend=\w+, \d+ GDN layers on this rank", full))
    assert ranks == {"Worker_TP0", "Worker_TP1"}, log
    left = subprocess.run(["pgrep", "-f", str(ROOT / ".cache" / "ray-")], capture_output=True,
                          text=True)
    assert left.stdout.strip() == "", f"Ray processes left running: {left.stdout}"
