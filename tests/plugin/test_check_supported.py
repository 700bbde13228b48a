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
    with pytest.raises(ValueError, match=r"prefix caching together with speculative decoding"):
        qwen3_next.check_supported(_config(enforce_eager=True, mode="align", spec=object()))
    with pytest.raises(ValueError, match=r"mamba_cache_mode='all' is not supported"):
        qwen3_next.check_supported(_config(enforce_eager=True, mode="all"))
