"""``torchvision.transforms.v2`` of the development stand-in."""

from . import functional  # noqa: F401  (submodule, as the real package exposes it)
from .functional import InterpolationMode  # noqa: F401  (re-exported, as torchvision does)


def __getattr__(name: str):
    from ..._missing import missing

    return missing("torchvision.transforms.v2", name)
