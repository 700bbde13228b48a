"""Qwen3-Next with KVBuffer GDN layers, registered over vLLM's ``Qwen3NextForCausalLM``
(the mechanism: :mod:`.hybrid`)."""

from __future__ import annotations

from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.models.qwen3_next import Qwen3NextForCausalLM

from .gdn_layer import KVBufferGatedDeltaNet
from .hybrid import check_supported, kvbuffer_host

KVBufferQwen3NextForCausalLM = kvbuffer_host(
    Qwen3NextForCausalLM, {QwenGatedDeltaNetAttention: KVBufferGatedDeltaNet}, module=__name__)

__all__ = ["KVBufferQwen3NextForCausalLM", "check_supported"]
