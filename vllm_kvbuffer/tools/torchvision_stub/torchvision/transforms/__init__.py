"""``torchvision.transforms`` of the development stand-in."""

from . import functional, v2  # noqa: F401  (submodules, as the real package exposes them)
from .functional import InterpolationMode  # noqa: F401  (re-exported, as torchvision does)


def __getattr__(name: str):
    from .._missing import missing

    return missing("torchvision.transforms", name)
