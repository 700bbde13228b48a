"""KVBuffer on vLLM's Gated DeltaNet hybrid models: one mechanism for every host architecture.

:func:`kvbuffer_host` derives, from a vLLM model class, the class the plugin registers under the
same architecture name. Inactive (no ``additional_config["kvbuffer"]``, no ``VLLM_KVBUFFER=1``), it
is vLLM's class unchanged, bit for bit (every override returns ``super()``'s result). Active:

- the start-up checks run (:func:`check_supported`);
- every GDN layer of a class in the host's promotion table is promoted to its KVBuffer class
  (:mod:`.gdn_layer`), and one line is logged: ``KVBuffer active: chunk_size=..., backend=...,
  N GDN layers on this rank``;
- the Mamba state classmethods that vLLM uses to size the cache page append the same KVBuffer
  states as the layers (:mod:`.cache_spec`), from the text config's ``linear_*`` sizes;
- prefix caching copies whole KVBuffer slots
  (:meth:`KVBufferHybridMixin.get_mamba_state_copy_funcs`).

Hosts: :mod:`.qwen3_next`, :mod:`.qwen3_5` (dense, MoE, and the vision-language classes, whose
language model holds the GDN layers), :mod:`.olmo_hybrid`. The MTP drafters of these families need
nothing: their layers are full attention and their cache is sized by the target's classmethods.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable, ContextManager

import torch
from vllm.model_executor.layers.mamba.mamba_utils import MambaCopySpec

from ..config import KVBufferSettings, settings_of
from .cache_spec import kvbuffer_state_dtypes, kvbuffer_state_shapes

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
    mode = vllm_config.cache_config.mamba_cache_mode
    if mode not in ("none", "align"):
        raise ValueError(f"KVBuffer: mamba_cache_mode={mode!r} is not supported; pass "
                         f"--no-enable-prefix-caching or use the default 'align' mode")


def kvbuffer_slot_copy_spec(state: torch.Tensor, block_ids: list[int], cur_block_idx: int,
                            num_accepted_tokens: int) -> MambaCopySpec:
    """One KVBuffer state of a request's running block, whole: what vLLM's align mode copies
    into the request's next block (``preprocess_mamba``). Unlike vLLM's copy specs it ignores
    ``num_accepted_tokens``: there are no per-draft blocks to pick from (tentative tokens travel
    with the slot and are committed by position, :mod:`.gdn_core`)."""
    src = state[block_ids[cur_block_idx]]
    return MambaCopySpec(start_addr=src.data_ptr(), num_elements=src.numel())


def _num_spec(vllm_config) -> int:
    spec = vllm_config.speculative_config
    return spec.num_speculative_tokens if spec is not None else 0


class KVBufferHybridMixin:
    """The KVBuffer behaviour of a host model; first in the bases of a :func:`kvbuffer_host`
    class, so that its overrides wrap vLLM's (``super()``)."""

    #: stock GDN layer class -> its KVBuffer class (:class:`.gdn_layer.KVBufferGDNLayerMixin`).
    _kvbuffer_promotions: dict[type, type] = {}
    _kvbuffer: KVBufferSettings | None = None

    def _kvbuffer_init(self, vllm_config) -> None:
        """After vLLM's ``__init__``: promote the GDN layers when KVBuffer is requested."""
        settings = settings_of(vllm_config)
        self._kvbuffer = settings
        if settings is None:
            return
        check_supported(vllm_config)
        from ..patches import apply_align_spec_patch
        apply_align_spec_patch()
        layers = [m for m in self.modules() if type(m) in self._kvbuffer_promotions]
        for layer in layers:
            self._kvbuffer_promotions[type(layer)].promote(layer, settings)
        logger.info("KVBuffer active: chunk_size=%d, backend=%s, %d GDN layers on this rank",
                    settings.chunk_size, settings.backend, len(layers))

    def get_mamba_state_copy_funcs(self, mamba_types):
        """Prefix caching ("align" mode) copies a request's running slot into its next block
        when the request moves on. A KVBuffer slot is fully described by its page (state,
        buffer, cursors, conv window), so every state is copied whole
        (:func:`kvbuffer_slot_copy_spec`); vLLM's funcs would copy only the first two and leave a
        stale buffer behind, and with drafts they pick per-draft blocks KVBuffer does not
        have."""
        funcs = super().get_mamba_state_copy_funcs(mamba_types)
        if self._kvbuffer is None:
            return funcs
        states = 2 + len(kvbuffer_state_dtypes(torch.float32))     # vLLM's (conv, ssm) + ours
        return {kind: (kvbuffer_slot_copy_spec,) * states for kind in funcs}

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


def kvbuffer_host(base: type, promotions: dict[type, type], *, module: str,
                  construct: Callable[[Any], ContextManager] | None = None) -> type:
    """The KVBuffer class of the vLLM model class ``base``: ``KVBuffer<base name>``, defined in
    ``module`` (the module that binds it, for the registry's lazy ``"module:Class"`` lookup).

    ``promotions`` maps each stock GDN layer class of ``base`` to its KVBuffer layer class.
    ``construct(vllm_config)``: a context that vLLM's ``__init__`` runs in, for a host whose stock
    constructor needs a compatibility shim (see :mod:`vllm_kvbuffer.patches`). The class keeps
    vLLM's constructor signature ``(*, vllm_config, prefix=<base's default>)``, which vLLM's model
    loader inspects.
    """
    prefix_default = inspect.signature(base.__init__).parameters["prefix"].default

    def __init__(self, *, vllm_config, prefix: str = prefix_default):
        with (construct(vllm_config) if construct is not None else contextlib.nullcontext()):
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self._kvbuffer_init(vllm_config)

    name = f"KVBuffer{base.__name__}"
    __init__.__qualname__ = f"{name}.__init__"
    return type(name, (KVBufferHybridMixin, base), {
        "__init__": __init__, "__module__": module, "__qualname__": name,
        "_kvbuffer_promotions": dict(promotions),
        "__doc__": f"vLLM's ``{base.__name__}``; with KVBuffer settings present, its GDN layers "
                   f"run KVBuffer (:mod:`vllm_kvbuffer.model_executor.hybrid`)."})
