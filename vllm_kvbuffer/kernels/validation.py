"""Argument checks shared by the public KVBuffer operations.

Every failure is a ``ValueError`` whose message names the argument, the expected and the actual
value. Shape, dtype and device checks are free (no device access) and always run. Checks of tensor
*values* (slot ranges, duplicate slots, ``num_accepted`` ranges, buffer capacity, pending verify
tokens) read device memory, i.e. synchronise with the host; they run unless turned off with
:func:`set_value_checks` or ``VLLM_KVBUFFER_VALUE_CHECKS=0`` (what a CUDA-graph-captured serving
path does: there the engine guarantees these invariants).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import envs

_value_checks: bool = envs.get("VLLM_KVBUFFER_VALUE_CHECKS")


def value_checks_enabled() -> bool:
    return _value_checks


class set_value_checks:
    """Turn the value checks (host syncs) on or off, like ``torch.set_grad_enabled``.

    A plain call switches them for the rest of the process::

        set_value_checks(False)

    and as a context manager the setting reverts to the one before the ``with`` on exit::

        with set_value_checks(False):
            ...
    """

    def __init__(self, enabled: bool) -> None:
        global _value_checks
        self.prev, _value_checks = _value_checks, bool(enabled)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        global _value_checks
        _value_checks = self.prev


def check(cond: bool, name: str, expected: Any, actual: Any) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {actual}")


def check_int(name: str, value: Any, *, minimum: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool), name, "an int",
          type(value).__name__)
    check(value >= minimum, name, f">= {minimum}", value)


def check_tensor(t: Any, name: str, *, shape: tuple, dtypes: tuple | None = None,
                 device: torch.device | None = None) -> None:
    """``shape`` entries may be None (any size). Messages are built only on failure: this runs
    on every kernel call, also in serving."""
    if not isinstance(t, torch.Tensor):
        check(False, name, "a torch.Tensor", type(t).__name__)
    ts = t.shape
    # torch.Size == tuple is one C call; a pattern with None entries needs the loop.
    if ts != shape and (len(ts) != len(shape)
                        or any(e is not None and e != a for e, a in zip(shape, ts))):
        check(False, f"{name}.shape", tuple("*" if e is None else e for e in shape),
              tuple(t.shape))
    if dtypes is not None and t.dtype not in dtypes:
        check(False, f"{name}.dtype", dtypes[0] if len(dtypes) == 1 else f"one of {dtypes}",
              t.dtype)
    if device is not None and t.device != device:
        check(False, f"{name}.device", device, t.device)


def check_slots_tensor(slots: Any, num_slots: int, device: torch.device, *, name: str = "slots",
                       allow_duplicates: bool = False, allow_padding: bool = True) -> None:
    """``slots``: ``[N]`` int32/int64 ids in ``[0, num_slots)``; negative ids are padding."""
    check_tensor(slots, name, shape=(None,), dtypes=(torch.int32, torch.int64), device=device)
    if not _value_checks or slots.numel() == 0:
        return
    vals = slots.tolist()
    bad = [s for s in vals if s >= num_slots or (s < 0 and not allow_padding)]
    lo = 0 if not allow_padding else "negative (padding) or 0"
    check(not bad, f"{name} values", f"in [{lo}, {num_slots})", bad[:8])
    if not allow_duplicates:
        seen: set[int] = set()
        dup = sorted({s for s in vals if s >= 0 and (s in seen or seen.add(s))})
        check(not dup, f"{name} values", "distinct slot ids (each slot once per call)", dup[:8])
