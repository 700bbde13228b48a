"""Run one vLLM engine (in its own process) and print its outputs as JSON on the last line.

Usage (from the repository root): python -m tests.engine_run '<json spec>'; tests call it through
:func:`tests.utils.run_engine`. Spec keys: model, dtype, enforce_eager (default True), prompts (str,
token-id lists, or ``{"prompt": str, "image": [height, width]}``: a text with one
:func:`tiny_image`), max_tokens (one for all, or a list with one per prompt), max_model_len,
max_num_seqs, max_num_batched_tokens, additional_config, enable_prefix_caching,
speculative_config, prompt_logprobs, tensor_parallel_size, num_gpu_blocks_override,
distributed_executor_backend, limit_mm_per_prompt, metrics (report vLLM's spec-decode,
prefix-cache and preemption counters), abort ({"ids": prompt indices, "after_steps": n}: every
request in flight at once in vLLM's streaming engine loop, those aborted after n steps).
Tests start each engine in a fresh process: vLLM keeps process-global state (plugins, registry,
distributed groups) that one engine per process keeps honest.

``python -m tests.engine_run --serve`` is what :func:`tests.utils.run_engine` starts once per test
session: a launcher that imports vLLM once (about 6 of the 9 seconds an engine process needs
before its first step on the project's 2-core machine), then forks one fresh child per engine.
Each child gets exactly the environment a subprocess would (the request carries it), its own
process group and its own stdout/stderr files, runs one engine as above and exits. vLLM's
engine state, plugins and registry are first touched in the child, never in the launcher.
"""

import contextlib
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_image(height: int, width: int):
    """A deterministic random RGB image (PIL), for vision-language prompts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _prompt(p):
    from vllm.inputs import TokensPrompt

    if isinstance(p, list):
        return TokensPrompt(prompt_token_ids=p)
    if isinstance(p, dict):
        return {"prompt": p["prompt"], "multi_modal_data": {"image": tiny_image(*p["image"])}}
    return p


def run(spec: dict) -> None:
    """Run the engine ``spec`` describes; print its outputs as the ``RESULT`` line."""
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], dtype=spec.get("dtype", "float32"),
                  enforce_eager=spec.get("enforce_eager", True),
                  max_model_len=spec.get("max_model_len", 1024),
                  max_num_seqs=spec.get("max_num_seqs", 8),
                  enable_prefix_caching=spec.get("enable_prefix_caching", False), seed=0)
    if spec.get("metrics"):
        kwargs["disable_log_stats"] = False
    for key in ("additional_config", "speculative_config", "max_num_batched_tokens",
                "tensor_parallel_size", "num_gpu_blocks_override", "distributed_executor_backend",
                "limit_mm_per_prompt"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    llm = LLM(**kwargs)
    prompts = [_prompt(p) for p in spec["prompts"]]
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
    print("RESULT " + json.dumps({"outputs": result, "info": info}), flush=True)


def _child(request: dict) -> None:
    """In the forked child: become the engine process the request describes, then exit."""
    code = 1
    try:
        os.setpgid(0, 0)            # the launcher ends the whole group on a timeout
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        run(request["spec"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (any failure is the engine's: report it, exit 1)
        import traceback

        traceback.print_exc()
    finally:
        # What interpreter exit would do for the engine (vLLM shuts its engine down from atexit
        # handlers and finalizers); then leave without returning into the launcher's loop.
        import atexit

        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _warm_logprobs() -> None:
    """Compile vLLM's ``batched_count_greater_than`` (a ``torch.compile`` function every engine
    that returns logprobs calls) once here, for every child: a child then pays about 0.3 s for
    it instead of about 4 s of Dynamo and Inductor on the project's 2-core machine. The shapes
    give the three graphs an engine needs: a static one, then both dimensions dynamic, then the
    one-row specialisation (Dynamo specialises sizes 0 and 1). One thread, so that no OpenMP
    pool exists in the launcher when it forks; the children set their own thread counts as
    vLLM's CPU worker does."""
    import torch
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows, cols in ((1, 256), (2, 257), (1, 258)):
            x = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
            batched_count_greater_than(x, x[:, :1])
    finally:
        torch.set_num_threads(threads)


def serve() -> None:
    """The launcher loop: once ready, one line with its environment after its imports
    (``ready``, ``env``); then one JSON request per stdin line (``spec``, ``env``, ``cwd``,
    ``stdout``, ``stderr``, ``timeout``), one JSON reply per stdout line (``returncode``,
    ``timed_out``, ``cpu_s``: the child's CPU seconds)."""
    import signal
    import time

    from vllm_kvbuffer.tools.local_env import apply_local_env

    # Replies go to a private copy of stdout; whatever the launcher itself prints (vLLM logs at
    # import) goes to stderr and cannot corrupt them.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    apply_local_env(ROOT)
    # The imports every engine child inherits (the point of the launcher): run()'s own.
    import vllm.entrypoints.llm  # noqa: F401  (imported for the children, see above)

    _warm_logprobs()
    # The environment the children start from (vLLM's import sets a few variables itself).
    reply.write(json.dumps({"ready": True, "env": dict(os.environ)}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        try:
            while True:
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    _, status, usage = os.wait4(pid, 0)
                    break
                time.sleep(0.05)
        except BaseException:
            # The launcher is interrupted (Ctrl-C reaches it with pytest): the engine's own
            # process group would not get the signal, so end it here.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            raise
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                "timed_out": timed_out,
                                "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")
        reply.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        run(json.loads(sys.argv[1]))
