"""Development stand-in for torchvision (see ``vllm_kvbuffer.tools.torchvision_stub``): only
found when no real torchvision is installed."""

__version__ = "0.0.0"
__kvbuffer_stub__ = True

from . import io, transforms  # noqa: F401  (submodules, as the real package exposes them)


def __getattr__(name: str):
    from ._missing import missing

    return missing("torchvision", name)
