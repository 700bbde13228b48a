"""Launch policy of the Triton kernels: built-in defaults per shape, refined by per-device
configs written by ``benchmarks/tune.py``, overridden by :data:`CONFIG_OVERRIDE`.

``configs/<device>.json`` (device name with every run of non-alphanumerics replaced by ``_``,
e.g. ``NVIDIA_H100_80GB_HBM3.json``) holds, per kernel kind, entries chosen by shape::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "kinds": {"decode": [{"shape": {"H": 16, "HV": 32, "K": 128, "V": 128, "C": 16,
                                     "state_dtype": "float32"},
                           "batch_le": 64,
                           "config": {"BV": 16, "num_warps": 4, "splits": 1}}, ...],
               "block": [...], "flush": [...]}}

An entry applies when every key of its ``shape`` equals the cache's value; among those, the one
with the smallest ``batch_le`` >= the batch wins (an entry without ``batch_le`` matches any
batch). No file for the device: the built-in defaults, with one warning naming the device and the
missing file. A malformed file raises ``ValueError`` naming the file and the key.
Lookups are cached per (kind, shape, batch): no file access on the hot path after the first.
"""

from __future__ import annotations

import functools
import json
import math
import logging
import pathlib
import re
import warnings

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
SHAPE_KEYS = ("H", "HV", "K", "V", "C", "state_dtype")
# Launch parameters each kind accepts, with their type.
ALLOWED = {
    "decode": {"BV": int, "num_warps": int, "num_stages": int, "splits": int},
    "verify": {"BV": int, "num_warps": int, "num_stages": int, "splits": int},
    "block": {"BV": int, "num_warps": int},
    "flush": {"BV": int, "num_warps": int},
}
logger = logging.getLogger(__name__)
_warned: set = set()


def device_key(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def config_path(device_name: str, config_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (config_dir or CONFIG_DIR) / f"{device_key(device_name)}.json"


def _bad(path, key, what):
    raise ValueError(f"{path}: malformed tuning file at key '{key}': {what}")


def validate(data, path) -> dict:
    """Check the structure of a loaded tuning file; returns ``data["kinds"]``."""
    if not isinstance(data, dict):
        _bad(path, "<root>", f"expected an object, got {type(data).__name__}")
    kinds = data.get("kinds")
    if not isinstance(kinds, dict):
        _bad(path, "kinds", "expected an object of kernel kinds")
    for kind, entries in kinds.items():
        if kind not in ALLOWED:
            _bad(path, f"kinds.{kind}", f"unknown kernel kind (known: {sorted(ALLOWED)})")
        if not isinstance(entries, list):
            _bad(path, f"kinds.{kind}", "expected a list of entries")
        for i, e in enumerate(entries):
            at = f"kinds.{kind}[{i}]"
            if not isinstance(e, dict):
                _bad(path, at, "expected an object")
            shape = e.get("shape", {})
            if not isinstance(shape, dict) or any(k not in SHAPE_KEYS for k in shape):
                _bad(path, f"{at}.shape", f"expected an object with keys among {SHAPE_KEYS}")
            if "batch_le" in e and (not isinstance(e["batch_le"], int)
                                    or isinstance(e["batch_le"], bool) or e["batch_le"] < 1):
                _bad(path, f"{at}.batch_le", f"expected a positive int, got {e['batch_le']!r}")
            cfg = e.get("config")
            if not isinstance(cfg, dict):
                _bad(path, f"{at}.config", "expected an object of launch parameters")
            for k, v in cfg.items():
                typ = ALLOWED[kind].get(k)
                if typ is None:
                    _bad(path, f"{at}.config.{k}",
                         f"unknown parameter for {kind} (allowed: {sorted(ALLOWED[kind])})")
                if type(v) is not typ or (typ is int and v < 1):
                    _bad(path, f"{at}.config.{k}", f"expected a {typ.__name__}"
                         f"{' >= 1' if typ is int else ''}, got {v!r}")
    return kinds


@functools.lru_cache(maxsize=None)
def load(path: pathlib.Path) -> dict | None:
    """The validated ``kinds`` of a tuning file, or None if it does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed tuning file (not JSON): {e}") from None
    return validate(data, path)


def _device_name(device) -> str | None:
    import torch
    if getattr(device, "type", None) != "cuda":
        return None        # CPU / interpreter: launch parameters do not matter
    return torch.cuda.get_device_name(device)


def select(kinds: dict, kind: str, shape: dict, batch: int | None) -> dict:
    best, best_le = {}, None
    for e in kinds.get(kind, []):
        if any(shape.get(k) != v for k, v in e.get("shape", {}).items()):
            continue
        le = e.get("batch_le")
        if le is not None and batch is not None and batch > le:
            continue
        key = le if le is not None else float("inf")
        if best_le is None or key < best_le:
            best, best_le = dict(e["config"]), key
    return best


_memo: dict = {}


def lookup(kind: str, shape: dict, batch: int | None, device,
           config_dir: pathlib.Path | None = None) -> dict:
    """Tuned launch parameters for ``kind`` at ``shape`` (keys of ``SHAPE_KEYS``) and ``batch``
    on ``device``; ``{}`` means "use the built-in defaults"."""
    memo_key = (kind, tuple(sorted(shape.items())), batch, str(device), config_dir)
    hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    name = _device_name(device)
    cfg: dict = {}
    if name is not None:
        path = config_path(name, config_dir)
        kinds = load(path)
        if kinds is None:
            if path not in _warned:
                _warned.add(path)
                msg = (f"vllm-kvbuffer: no tuned launch configs for device '{name}' ({path.name} "
                       f"not found in {path.parent}); using the built-in defaults. Run "
                       f"benchmarks/tune.py on this device to create it.")
                warnings.warn(msg, stacklevel=3)
                logger.warning(msg)
        else:
            cfg = select(kinds, kind, shape, batch)
    _memo[memo_key] = cfg
    return cfg


def clear_caches() -> None:
    """Forget loaded files, memoised lookups and issued warnings (tests, after re-tuning)."""
    load.cache_clear()
    _memo.clear()
    _warned.clear()


# ------------------------------------------------------------------------------------------------
# Launch policy
# ------------------------------------------------------------------------------------------------
# Benchmarks and the tuning script may pin launch parameters here, per kernel kind:
# {"decode": {"BV": .., "num_warps": .., "num_stages": .., "splits": ..}, "block": {...}, ...}.
CONFIG_OVERRIDE: dict = {}
# Below this many (sequence, value head) programs the decode V tiles are split over several
# programs so that every SM has work (a shape decision, never a data one: CUDA-graph safe).
DECODE_SPLIT_BELOW = 2048


def pow2(x: int, lo: int = 16) -> int:
    """Smallest power of two >= max(x, lo) (tl.dot needs every block dim >= 16)."""
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def tuning_shape(cache, kind: str) -> dict:
    """The shape keys a tuned config is chosen by (see :data:`SHAPE_KEYS`)."""
    shape = dict(H=cache.num_k_heads, HV=cache.num_v_heads, K=cache.head_k_dim,
                 V=cache.head_v_dim, state_dtype=str(cache.state_dtype).replace("torch.", ""))
    if kind == "decode":
        shape["C"] = cache.chunk_size
    return shape


def launch_config(cache, kind: str = "decode", batch: int | None = None) -> dict:
    """Fixed per-shape launch parameters (no runtime autotune for kernels that write state).

    decode: a program per (sequence, value head) streams the head's state in ``[BV, BK]`` tiles
    through a loop Triton software-pipelines (``num_stages`` tiles in shared memory, async
    copies). For fp32 K = V = 128, 16-row tiles with 4 stages keep three 8 KB tiles in flight per
    program at 96 registers, five programs per SM (``python -m vllm_kvbuffer.kernels.audit``
    reports these numbers for a shape); 32-row tiles need 128 registers and spill.
    At small batch the tiles are split over ``splits`` programs per head to fill the GPU.
    verify: the same tile loop with the T tokens' tile-independent terms computed once per
    program; 2 warps (245 registers, no spills) give four programs and 96 KB in flight per SM
    at fp32 K = V = 128, D = 4.
    block (prefill) and flush: one program per (sequence, value head, V tile).
    """
    K, V = cache.head_k_dim, cache.head_v_dim
    BK = pow2(K)
    if kind in ("decode", "verify"):
        BV = min(pow2(V), 16)
        nv = -(-V // BV)
        programs = (batch or 1) * cache.num_v_heads
        cfg = dict(BK=BK, BV=BV, num_warps=4 if kind == "decode" else 2, num_stages=4,
                   splits=nv if programs < DECODE_SPLIT_BELOW else 1)
    else:
        BV = min(pow2(V), 16 if BK >= 128 else 32)
        cfg = dict(BK=BK, BV=BV, num_warps=4)
    # Per-device tuned configs (benchmarks/tune.py) refine the defaults; overrides win over both.
    cfg.update(lookup(kind, tuning_shape(cache, kind), batch, cache.device))
    cfg.update(CONFIG_OVERRIDE.get(kind, {}))
    return cfg
