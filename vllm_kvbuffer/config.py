"""KVBuffer settings: where they come from and how they are checked.

One source of truth per engine: ``vllm_config.additional_config["kvbuffer"]`` (a dict; its
presence activates KVBuffer). ``VLLM_KVBUFFER=1`` activates it from the environment (for entry
points that cannot pass ``additional_config``), with ``VLLM_KVBUFFER_CHUNK_SIZE`` and
``VLLM_KVBUFFER_BACKEND``; values in ``additional_config`` win over the environment. vLLM ships the
whole ``VllmConfig`` to every engine and worker process, so they all read the same settings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

CONFIG_KEY = "kvbuffer"
ENV_ENABLE = "VLLM_KVBUFFER"
ENV_CHUNK_SIZE = "VLLM_KVBUFFER_CHUNK_SIZE"
ENV_BACKEND = "VLLM_KVBUFFER_BACKEND"
BACKENDS = ("auto", "torch", "triton")
_TRUE = ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class KVBufferSettings:
    """``chunk_size``: flush interval C in tokens. ``backend``: kernel backend (``"auto"``:
    Triton on CUDA, the exact torch backend on the CPU)."""

    chunk_size: int = 16
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
                or self.chunk_size < 1:
            raise ValueError(f"kvbuffer.chunk_size: expected an int >= 1, got "
                             f"{self.chunk_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"kvbuffer.backend: expected one of {BACKENDS}, got "
                             f"{self.backend!r}")


def _env_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an int, got {value!r}") from None


def resolve_settings(additional_config: Mapping[str, Any] | None,
                     environ: Mapping[str, str] | None = None) -> KVBufferSettings | None:
    """The active settings, or None when KVBuffer is not requested."""
    environ = os.environ if environ is None else environ
    from_config = (additional_config or {}).get(CONFIG_KEY)
    env_on = environ.get(ENV_ENABLE, "").strip().lower() in _TRUE
    if from_config is None and not env_on:
        return None
    if from_config is not None and not isinstance(from_config, Mapping):
        raise ValueError(f"additional_config['{CONFIG_KEY}']: expected a dict of settings, got "
                         f"{type(from_config).__name__}")
    values: dict[str, Any] = {}
    if environ.get(ENV_CHUNK_SIZE):
        values["chunk_size"] = _env_int(ENV_CHUNK_SIZE, environ[ENV_CHUNK_SIZE])
    if environ.get(ENV_BACKEND):
        values["backend"] = environ[ENV_BACKEND]
    known = {f.name for f in dataclasses.fields(KVBufferSettings)}
    unknown = sorted(set(from_config or {}) - known)
    if unknown:
        raise ValueError(f"additional_config['{CONFIG_KEY}']: unknown settings {unknown}; "
                         f"expected some of {sorted(known)}")
    values.update(from_config or {})
    return KVBufferSettings(**values)


def settings_of(vllm_config) -> KVBufferSettings | None:
    """Settings for an engine (``None``: KVBuffer not requested, everything stays stock)."""
    return resolve_settings(getattr(vllm_config, "additional_config", None))
