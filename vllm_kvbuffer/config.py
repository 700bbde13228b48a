"""KVBuffer settings: where they come from and how they are checked.

One source of truth per engine: ``vllm_config.additional_config["kvbuffer"]`` (a dict; its
presence activates KVBuffer). ``VLLM_KVBUFFER=1`` activates it from the environment (for entry
points that cannot pass ``additional_config``), with ``VLLM_KVBUFFER_CHUNK_SIZE`` and
``VLLM_KVBUFFER_BACKEND``; values in ``additional_config`` win over the environment. vLLM ships the
whole ``VllmConfig`` to every engine and worker process, so they all read the same settings.
The variables, their defaults and their parsing: :mod:`vllm_kvbuffer.envs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from . import envs
from .envs import BACKENDS

CONFIG_KEY = "kvbuffer"


@dataclasses.dataclass(frozen=True)
class KVBufferSettings:
    """``chunk_size``: flush interval C in tokens. ``backend``: kernel backend (``"auto"``: the
    kernels pick one per device). Defaults: those of the variables in :mod:`vllm_kvbuffer.envs`."""

    chunk_size: int = envs.ENV_VARS["VLLM_KVBUFFER_CHUNK_SIZE"].default
    backend: str = envs.ENV_VARS["VLLM_KVBUFFER_BACKEND"].default

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
                or self.chunk_size < 1:
            raise ValueError(f"kvbuffer.chunk_size: expected an int >= 1, got "
                             f"{self.chunk_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"kvbuffer.backend: expected one of {BACKENDS}, got "
                             f"{self.backend!r}")


def resolve_settings(additional_config: Mapping[str, Any] | None,
                     environ: Mapping[str, str] | None = None) -> KVBufferSettings | None:
    """The active settings, or None when KVBuffer is not requested (``environ``: the process
    environment unless given)."""
    from_config = (additional_config or {}).get(CONFIG_KEY)
    env_on = envs.get("VLLM_KVBUFFER", environ)
    if from_config is None and not env_on:
        return None
    if from_config is not None and not isinstance(from_config, Mapping):
        raise ValueError(f"additional_config['{CONFIG_KEY}']: expected a dict of settings, got "
                         f"{type(from_config).__name__}")
    values: dict[str, Any] = {}
    for key, name in (("chunk_size", "VLLM_KVBUFFER_CHUNK_SIZE"),
                      ("backend", "VLLM_KVBUFFER_BACKEND")):
        if envs.is_set(name, environ):
            values[key] = envs.get(name, environ)
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
