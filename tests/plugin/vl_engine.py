"""Run one vLLM engine on a tiny Qwen3.5 vision-language checkpoint with a text prompt and an
image prompt; print the outputs as JSON on the last line (``RESULT {...}``).

Usage (from the repository root): ``python -m tests.plugin.vl_engine '<json spec>'``, spec keys:
``model``, ``max_tokens``, ``additional_config``. The image is :func:`tiny_image` (deterministic).
tests/plugin/test_models.py runs it: ``tests.engine_run`` takes text and token prompts only.
"""

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXT_PROMPT = "Hello world, the quick brown fox"
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the picture:"


def tiny_image(height: int = 64, width: int = 96):
    """A deterministic random RGB image (4 x 6 patches of 16 pixels: 2 x 3 merged tokens)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def main() -> None:
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=2, seed=0, additional_config=spec.get("additional_config"),
              limit_mm_per_prompt={"image": 1, "video": 0})
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16),
                            ignore_eos=True, logprobs=1)
    prompts = [TEXT_PROMPT, {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": tiny_image()}}]
    result = []
    for o in llm.generate(prompts, params, use_tqdm=False):
        c = o.outputs[0]
        result.append({"prompt_token_ids": list(o.prompt_token_ids),
                       "token_ids": list(c.token_ids),
                       "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    print("RESULT " + json.dumps({"outputs": result}), flush=True)


if __name__ == "__main__":
    main()
