"""KVBuffer kernels for Gated DeltaNet: an exact torch backend and Triton GPU kernels.

Public API::

    cache = allocate_cache(num_slots, num_k_heads=..., num_v_heads=..., head_k_dim=...,
                           head_v_dim=..., chunk_size=16, max_draft_tokens=0)
    reset_slots(cache, slots)
    o = prefill(cache, slots, q, k, v, g, beta, cu_seqlens)
    g, beta = gdn_gates(A_log, dt_bias, a, b)             # the layer's gates
    o = decode(cache, slots, q, k, v, g, beta)
    o = verify(cache, slots, q, k, v, g, beta); accept(cache, slots, num_accepted)
    S = materialize_state(cache, slots)
    o, S = recurrent_gated_delta_rule(q, k, v, g, beta)    # token-by-token ground truth
"""

from .api import (BACKENDS, accept, auto_backend, decode, gdn_gates, materialize_state, prefill,
                  verify)
from .cache import KVBufferCache, allocate_cache, reset_slots
from .recurrent import recurrent_gated_delta_rule
from .validation import set_value_checks, value_checks_enabled

__all__ = [
    "BACKENDS",
    "KVBufferCache",
    "accept",
    "allocate_cache",
    "auto_backend",
    "decode",
    "gdn_gates",
    "materialize_state",
    "prefill",
    "recurrent_gated_delta_rule",
    "reset_slots",
    "set_value_checks",
    "value_checks_enabled",
    "verify",
]
