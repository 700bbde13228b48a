"""Run one vLLM engine (in its own process) and print its outputs as JSON on the last line.

Usage (from the repository root): python -m tests.engine_run '<json spec>'; tests call it through
:func:`tests.utils.run_engine`. Spec keys: model, dtype, enforce_eager (default True), prompts (str
or token-id lists), max_tokens (one for all, or a list with one per prompt), max_model_len,
max_num_seqs, max_num_batched_tokens, additional_config, enable_prefix_caching,
speculative_config, prompt_logprobs, tensor_parallel_size, num_gpu_blocks_override,
distributed_executor_backend, metrics (report vLLM's spec-decode, prefix-cache and preemption
counters), abort ({"ids": prompt indices, "after_steps": n}: every request in
flight at once in vLLM's streaming engine loop, those aborted after n steps).
Tests start each engine in a fresh process: vLLM keeps process-global state (plugins, registry,
distributed groups) that one engine per process keeps honest.
"""

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=spec["model"], dtype=spec.get("dtype", "float32"),
                  enforce_eager=spec.get("enforce_eager", True),
                  max_model_len=spec.get("max_model_len", 1024),
                  max_num_seqs=spec.get("max_num_seqs", 8),
                  enable_prefix_caching=spec.get("enable_prefix_caching", False), seed=0)
    if spec.get("metrics"):
        kwargs["disable_log_stats"] = False
    for key in ("additional_config", "speculative_config", "max_num_batched_tokens",
                "tensor_parallel_size", "num_gpu_blocks_override", "distributed_executor_backend"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    llm = LLM(**kwargs)
    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p
               for p in spec["prompts"]]
    max_tokens = spec.get("max_tokens", 16)
    per_prompt = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1,
                             prompt_logprobs=spec.get("prompt_logprobs")) for n in per_prompt]
    if spec.get("abort") is None:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        # Streaming engine loop: every request in flight at once, some aborted mid-way.
        engine = llm.llm_engine
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params[i])
        abort_ids = [str(i) for i in spec["abort"]["ids"]]
        finished, steps = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            steps += 1
            if steps == spec["abort"]["after_steps"]:
                engine.abort_request(abort_ids)
        outs = [finished[str(i)] for i in range(len(prompts)) if str(i) in finished
                and str(i) not in abort_ids]
    result = []
    for o in outs:
        c = o.outputs[0]
        item = {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(c.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]}
        if o.prompt_logprobs is not None:
            item["prompt_logprobs"] = [None] + [
                lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
        result.append(item)
    import vllm_kvbuffer
    from vllm import ModelRegistry

    entry = ModelRegistry.models.get("Qwen3NextForCausalLM")
    metrics = {}
    if spec.get("metrics"):
        for mt in llm.get_metrics():
            if any(k in mt.name for k in ("spec_decode", "prefix_cache", "preemption")) \
                    and hasattr(mt, "value"):
                metrics[mt.name] = mt.value
    info = {"metrics": metrics, "plugin_registered": vllm_kvbuffer._registered,
            "qwen3_next_class": getattr(entry, "class_name", None) or repr(entry),
            "qwen3_next_module": getattr(entry, "module_name", None), "pid": os.getpid()}
    print("RESULT " + json.dumps({"outputs": result, "info": info}))


if __name__ == "__main__":
    main()
