"""Qwen3.5 (dense, MoE, and the vision-language classes) with KVBuffer GDN layers, registered
over vLLM's classes of the same names (the mechanism: :mod:`.hybrid`).

All four build their linear layers from ``QwenGatedDeltaNetAttention``, as Qwen3-Next does. The
MTP drafters (``Qwen3_5MTP``, ``Qwen3_5MoeMTP``) stay vLLM's: their layer is full attention and
the cache page is sized by the target model's classmethods.
"""

from __future__ import annotations

from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.models import qwen3_5 as _vllm

from .gdn_layer import KVBufferGatedDeltaNet
from .hybrid import kvbuffer_host

_PROMOTIONS = {QwenGatedDeltaNetAttention: KVBufferGatedDeltaNet}

KVBufferQwen3_5ForCausalLM = kvbuffer_host(
    _vllm.Qwen3_5ForCausalLM, _PROMOTIONS, module=__name__)
KVBufferQwen3_5MoeForCausalLM = kvbuffer_host(
    _vllm.Qwen3_5MoeForCausalLM, _PROMOTIONS, module=__name__)
KVBufferQwen3_5ForConditionalGeneration = kvbuffer_host(
    _vllm.Qwen3_5ForConditionalGeneration, _PROMOTIONS, module=__name__)
KVBufferQwen3_5MoeForConditionalGeneration = kvbuffer_host(
    _vllm.Qwen3_5MoeForConditionalGeneration, _PROMOTIONS, module=__name__)
