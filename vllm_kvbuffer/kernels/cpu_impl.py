"""Native CPU kernels for KVBuffer (backend ``"cpu"``): a torch C++ extension.

The kernels are ``csrc/cpu_kernels.cpp`` (the layout of the work and the formulas are described
there and in ``docs/kvbuffer-math.md``); this module compiles them on first use and calls
them. Same semantics and in-place pool updates as :mod:`.torch_impl` (the exact reference); inputs
were validated by :mod:`vllm_kvbuffer.kernels.api`.

Threads: the kernels run on torch's intra-op thread pool (``at::parallel_for``), the OpenMP pool
that vLLM's CPU worker sizes and binds to the rank's cores, exactly as vLLM's own C++ kernels do.
The extension is linked against the OpenMP runtime torch has loaded already, so there is one
thread pool in the process, not two spinning on the same cores.

Compilation: ``torch.utils.cpp_extension.load`` builds the extension once per machine type with
the system C++ compiler (the one vLLM's CPU backend needs for ``torch.compile`` anyway), for the
host CPU (``-march=native``; the name carries a hash of the CPU's model and flags, so a cache
shared between different CPUs never loads code built for another one) and caches it in
``TORCH_EXTENSIONS_DIR`` (``.cache/torch_extensions`` under ``make`` and the tests; otherwise
torch's default, ``~/.cache/torch_extensions``). Concurrent first calls (tensor-parallel ranks,
test workers) wait on torch's build lock and load the same build.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import threading

import torch

from .cache import KVBufferCache

SOURCE = pathlib.Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]

_EXT = None
_LOCK = threading.Lock()


def _cpu_tag() -> str:
    """A short hash of the host CPU's model and instruction-set flags (``-march=native``)."""
    info = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.strip() == "":       # the first processor's block is enough
                    break
    except OSError:                          # not Linux: the machine name is what we have
        import platform
        info = platform.processor() or platform.machine()
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def extension_name() -> str:
    return f"vllm_kvbuffer_cpu_{_cpu_tag()}"


def _ninja_first_path() -> str:
    """``PATH`` with the interpreter's own ``bin`` folder first when it holds ``ninja`` (the pip
    package vLLM depends on). torch runs whichever ``ninja`` comes first on ``PATH``, and two
    ninja versions record different command hashes in the build's log, so each would rebuild
    what the other built (half a minute each time) depending on whether the virtual environment
    happens to be activated."""
    path = os.environ.get("PATH", "")
    bindir = os.path.dirname(sys.executable)
    if os.access(os.path.join(bindir, "ninja"), os.X_OK):
        return os.pathsep.join([bindir] + [p for p in path.split(os.pathsep) if p != bindir])
    return path


def extension():
    """The compiled extension (built or loaded on the first call, then memoised)."""
    global _EXT
    if _EXT is not None:
        return _EXT
    with _LOCK:
        if _EXT is None:
            from torch.utils.cpp_extension import load
            before = os.environ.get("PATH")
            os.environ["PATH"] = _ninja_first_path()
            try:
                _EXT = load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS,
                            extra_ldflags=["-fopenmp"], verbose=False)
            finally:
                if before is None:
                    os.environ.pop("PATH", None)
                else:
                    os.environ["PATH"] = before
    return _EXT


def build_directory() -> str:
    """Where the compiled extension lives (torch's rule: ``TORCH_EXTENSIONS_DIR`` or its
    default under the user's cache directory)."""
    from torch.utils.cpp_extension import _get_build_directory
    return _get_build_directory(extension_name(), verbose=False)


def _pool(cache: KVBufferCache) -> tuple:
    """The pool tensors (the extension checks that their rows are contiguous runs)."""
    return (cache.state, cache.buf_k, cache.buf_u, cache.buf_g, cache.meta, cache.chunk_size)


_NO_CU = torch.empty(0, dtype=torch.int64)


def _run_tokens(cache: KVBufferCache, slots, cu, per_seq: int, q, k, v, g, beta, *,
                commit: bool, scale: float, use_qk_l2norm: bool) -> torch.Tensor:
    """Inputs packed token-major: ``q, k [T, H, K]``, ``v [T, HV, V]``, ``g, beta [T, HV]``;
    sequence n owns tokens ``cu[n]:cu[n+1]`` (``n * per_seq`` when ``cu`` is empty). Returns the
    outputs ``[T, HV, V]`` in v's dtype."""
    pool = _pool(cache)
    acc = cache.acc_dtype
    if g.dtype != acc:
        g = g.to(acc)
    if beta.dtype != acc:
        beta = beta.to(acc)
    return extension().tokens(*pool, slots, cu, per_seq, q, k, v, g, beta, commit, float(scale),
                              use_qk_l2norm)


def _flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[N, T, ...]`` -> ``[N*T, ...]`` (a view for the layouts callers produce)."""
    return x.reshape((x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))


def decode(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    return _run_tokens(cache, slots, _NO_CU, 1, q, k, v, g, beta, commit=True, scale=scale,
                       use_qk_l2norm=use_qk_l2norm)


def verify(cache, slots, q, k, v, g, beta, *, scale, use_qk_l2norm):
    T = q.shape[1]
    out = _run_tokens(cache, slots, _NO_CU, T, *(_flat_tokens(x) for x in (q, k, v, g, beta)),
                      commit=False, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return out.view(v.shape)


def prefill(cache, slots, q, k, v, g, beta, cu_seqlens, *, scale, use_qk_l2norm):
    return _run_tokens(cache, slots, cu_seqlens, 0, q, k, v, g, beta, commit=True, scale=scale,
                       use_qk_l2norm=use_qk_l2norm)


def accept(cache, slots, num_accepted, *, use_qk_l2norm):
    extension().accept(*_pool(cache), slots, num_accepted, use_qk_l2norm)


def materialize_state(cache, slots, *, use_qk_l2norm):
    out = torch.empty(slots.shape[0], cache.num_v_heads, cache.head_k_dim, cache.head_v_dim,
                      dtype=cache.acc_dtype)
    extension().materialize(*_pool(cache), slots, out, use_qk_l2norm)
    return out


def loaded_openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (Linux): the extension must add none."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "libgomp" in line or "libiomp" in line})
    except OSError:
        return []



def conv_gates_supported(weight: torch.Tensor, bias, conv_state: torch.Tensor, x: torch.Tensor,
                         a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`conv_gates` takes these tensors (one dtype for all of them, as vLLM's layer
    allocates them); otherwise the layer runs the same steps as torch ops."""
    dt = x.dtype
    return (all(t.dtype == dt for t in (weight, conv_state, a, b))
            and (bias is None or bias.dtype == dt) and weight.dim() == 2 and a.dim() == 2)


def conv_gates(conv_state, meta, meta_col: int, weight, bias, silu: bool, blocks, x, *,
               T: int = 0, cu_seqlens=None, has_initial_state=None, keep_from: int = -1,
               meta_value: int = 0, A_log, dt_bias, a, b, beta_scale: float):
    """The layer's causal conv over each row's window and new inputs, the window update and the
    gates, in one call (see ``conv_gates`` in ``csrc/cpu_kernels.cpp``).

    Rows hold ``T`` tokens each, or ``cu_seqlens [N+1]`` delimits them; ``has_initial_state
    [N]`` (None: all) says which rows continue a window (the others start from zeros). The
    window written back is ``full[keep_from:]`` (``keep_from < 0``: the last ``W-1`` inputs)
    and the row's ``meta[:, meta_col]`` becomes ``meta_value``.

    Returns ``y [tokens, Dc]`` in x's dtype and ``g, beta [tokens, HV]`` in fp32 (float64 for
    float64 inputs), as the torch path computes them."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    y = torch.empty(n, weight.shape[0], dtype=x.dtype)
    g = torch.empty(n, a.shape[1], dtype=acc)
    beta = torch.empty(n, a.shape[1], dtype=acc)
    extension().conv_gates(
        conv_state, meta, meta_col, weight, bias if bias is not None else _NO_CU, silu, blocks,
        x, cu_seqlens if cu_seqlens is not None else _NO_CU, T,
        has_initial_state if has_initial_state is not None else _NO_CU, keep_from, meta_value,
        A_log, dt_bias, a, b, float(beta_scale), y, g, beta)
    return y, g, beta


def gates(A_log, dt_bias, a, b, *, beta_scale: float):
    return extension().gates(A_log, dt_bias, a, b, beta_scale)
