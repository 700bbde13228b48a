"""Qwen3-Next with KVBuffer GDN layers, registered over vLLM's ``Qwen3NextForCausalLM``.

Inactive (no ``additional_config["kvbuffer"]``, no ``VLLM_KVBUFFER=1``): the class is vLLM's own,
unchanged, bit for bit (every override returns ``super()``'s result). Active: every GDN layer is
promoted to :class:`~.gdn_layer.KVBufferGatedDeltaNet`, and the Mamba state classmethods that vLLM
uses to size the cache page append the same KVBuffer states as the layers.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.qwen3_next import Qwen3NextForCausalLM

from ..config import KVBufferSettings, settings_of
from .cache_spec import kvbuffer_state_dtypes, kvbuffer_state_shapes
from .gdn_layer import KVBufferGatedDeltaNet

logger = logging.getLogger("vllm.kvbuffer")


def check_supported(vllm_config) -> None:
    """Refuse, at start-up, the modes this version does not serve correctly with KVBuffer."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and not vllm_config.model_config.enforce_eager:
        # The batches vLLM captures (decode-only, uniform speculative) take gdn_core's graph-safe
        # paths, which the CPU tests check for host syncs; their capture/replay test
        # (tests/model_executor/test_gdn_core_gpu.py) and a CUDA-graph run inside vLLM have not
        # run on a GPU yet. Remove this refusal once both pass.
        raise ValueError(
            "KVBuffer: serving under CUDA graphs is not validated in this version of "
            "vllm-kvbuffer (the layer has been validated in vLLM on the CPU only); pass "
            "--enforce-eager (LLM(enforce_eager=True))")
    if getattr(vllm_config, "use_v2_model_runner", False):
        # Model Runner V2 (vLLM's CUDA default when Triton is present) runs hybrid models
        # through MambaHybridModelState: prompt tails with placeholder drafts run as speculative
        # rows of requests whose slot was never reset, align mode copies states with fused
        # kernels sized by the first state, and one group's metadata is reused for the others.
        # None of that can run on the CPU machines this plugin is validated on
        # (docs/plugin-design.md, "Model runners").
        raise ValueError(
            "KVBuffer: vLLM's Model Runner V2 is not supported by this version of "
            "vllm-kvbuffer; set VLLM_USE_V2_MODEL_RUNNER=0 in the environment of vLLM "
            "(for example `VLLM_USE_V2_MODEL_RUNNER=0 vllm serve ...`; the Docker images set "
            "it)")
    scheduler = getattr(vllm_config, "scheduler_config", None)
    if (vllm_config.speculative_config is not None
            and getattr(scheduler, "async_scheduling", False)):
        # With async scheduling a request that sat out one step comes back with
        # num_accepted_tokens = 1 (vLLM's update_num_computed_tokens_for_batch_change only
        # corrects rows of the previous batch), so the commit of its pending drafts would keep
        # too few (docs/plugin-design.md, "Speculative decoding and async scheduling").
        raise ValueError(
            "KVBuffer: speculative decoding together with async scheduling is not supported "
            "yet; pass --no-async-scheduling (LLM(async_scheduling=False))")
    mode = vllm_config.cache_config.mamba_cache_mode
    if mode not in ("none", "align"):
        raise ValueError(f"KVBuffer: mamba_cache_mode={mode!r} is not supported; pass "
                         f"--no-enable-prefix-caching or use the default 'align' mode")
    if mode == "align" and vllm_config.speculative_config is not None:
        raise ValueError(
            "KVBuffer: prefix caching together with speculative decoding is not supported yet "
            "(vLLM snapshots per-draft states at block boundaries); pass "
            "--no-enable-prefix-caching (LLM(enable_prefix_caching=False)) or drop "
            "--speculative-config")


def _num_spec(vllm_config) -> int:
    spec = vllm_config.speculative_config
    return spec.num_speculative_tokens if spec is not None else 0


class KVBufferQwen3NextForCausalLM(Qwen3NextForCausalLM):
    """vLLM's Qwen3-Next; with KVBuffer settings present, its GDN layers run KVBuffer."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(vllm_config)
        self._kvbuffer: KVBufferSettings | None = settings
        if settings is None:
            return
        check_supported(vllm_config)
        layers = [mod for mod in self.modules() if type(mod) is QwenGatedDeltaNetAttention]
        for layer in layers:
            KVBufferGatedDeltaNet.promote(layer, settings)
        logger.info("KVBuffer active: chunk_size=%d, backend=%s, %d GDN layers on this rank",
                    settings.chunk_size, settings.backend, len(layers))

    def get_mamba_state_copy_funcs(self, mamba_types):
        """Prefix caching ("align" mode) snapshots a request's linear state at block boundaries
        by copying its page. A KVBuffer slot is fully described by its page (state, buffer and
        cursor), so copying every KVBuffer state whole gives an exact snapshot; the stock funcs
        would copy only the first two states and leave a stale buffer behind."""
        funcs = super().get_mamba_state_copy_funcs(mamba_types)
        if self._kvbuffer is None:
            return funcs
        extra = (get_temporal_copy_spec,) * len(kvbuffer_state_dtypes(torch.float32))
        return {kind: tuple(f) + extra for kind, f in funcs.items()}

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        shapes = super().get_mamba_state_shape_from_config(vllm_config)
        settings = settings_of(vllm_config)
        if settings is None:
            return shapes
        check_supported(vllm_config)
        hf = vllm_config.model_config.hf_text_config
        return tuple(shapes) + kvbuffer_state_shapes(
            tp_size=vllm_config.parallel_config.tensor_parallel_size,
            num_k_heads=hf.linear_num_key_heads, num_v_heads=hf.linear_num_value_heads,
            head_k_dim=hf.linear_key_head_dim, head_v_dim=hf.linear_value_head_dim,
            chunk_size=settings.chunk_size, max_draft_tokens=_num_spec(vllm_config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        dtypes = super().get_mamba_state_dtype_from_config(vllm_config)
        if settings_of(vllm_config) is None:
            return dtypes
        return tuple(dtypes) + kvbuffer_state_dtypes(vllm_config.model_config.dtype)
