"""End to end: examples/generate_tiny.py starts vLLM on the CPU and generates text."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "generate_tiny.py"


@pytest.mark.slow
def test_generate_tiny_demo():
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--max-tokens", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, log
    assert re.search(r"^demo ok: 3 prompts$", proc.stdout, re.M), log
    assert "(KVBuffer, chunk_size=16)" in proc.stdout, log
    assert "KVBuffer active: chunk_size=16" in proc.stdout + proc.stderr, log

    completions = re.findall(r"^completion: (.*) \((\d+) tokens\)$", proc.stdout, re.M)
    assert len(completions) == 3, log
    for text, n_tokens in completions:
        assert int(n_tokens) == 8, log  # ignore_eos: always the full length
        assert ast.literal_eval(text), log  # printed with repr(); non-empty text
