"""Keep every cache and temp file of vLLM, Triton, torch and HF inside the project.

vLLM and its dependencies write to ``~/.cache`` and ``/tmp`` by default (compiled graphs, Triton
kernels, zmq sockets, torchinductor artefacts). Examples and tests call :func:`apply_local_env`
before importing vLLM so that those files land under ``<repo>/.cache`` instead, which is
gitignored and removed by ``make clean``. The Makefile exports the same layout; values that are
already set (by the Makefile, CI or the user) always win.
"""

from __future__ import annotations

import os
import pathlib

# Environment variable -> folder under the cache root. Same layout as the Makefile.
_CACHE_DIRS = {
    "VLLM_CACHE_ROOT": "vllm",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "NUMBA_CACHE_DIR": "numba",          # vLLM's numba kernels (n-gram proposer)
    "TORCH_EXTENSIONS_DIR": "torch_extensions",  # the CPU backend's compiled extension
    "XDG_CACHE_HOME": "xdg",
    "HF_HOME": "hf",
    "TMPDIR": "tmp",
}

# There is no model hub here: fail fast instead of waiting for network timeouts.
_FLAGS = {
    "HF_HUB_OFFLINE": "1",
}


def repo_root() -> pathlib.Path:
    """The checkout this package lives in (``vllm_kvbuffer/tools/`` is two levels down)."""
    return pathlib.Path(__file__).resolve().parents[2]


def default_cache_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    """``$KVB_CACHE`` if set, else ``<root>/.cache`` with ``root`` defaulting to the repo root."""
    if root is None and os.environ.get("KVB_CACHE"):
        return pathlib.Path(os.environ["KVB_CACHE"])
    return pathlib.Path(root if root is not None else repo_root()) / ".cache"


def apply_local_env(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Point cache/temp environment variables into the project's cache folder, if unset.

    Must run before vLLM, Triton, torch._inductor or huggingface_hub are imported: several of
    them read these variables once at import time. Child processes (vLLM's spawned engine core
    and workers) inherit the values.

    Args:
        root: folder whose ``.cache`` subfolder is used. When omitted: ``$KVB_CACHE`` (the
            cache folder itself, as the Makefile exports it) if set, else ``<repo root>/.cache``.

    Returns:
        The variables this call set (name -> value); variables that were already set are left
        untouched and not listed.
    """
    cache = default_cache_root(root)
    applied: dict[str, str] = {}
    for name, sub in _CACHE_DIRS.items():
        if os.environ.get(name):
            continue
        path = cache / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
        applied[name] = str(path)
    for name, value in _FLAGS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    # tempfile caches its folder on first use (pytest asks before any conftest runs, so its
    # tmp_path would stay in /tmp): drop a cached folder that is not TMPDIR.
    import tempfile

    if tempfile.tempdir is not None and tempfile.tempdir != os.environ["TMPDIR"]:
        tempfile.tempdir = None
    return applied
