"""``torchvision.io`` names transformers imports; decoding is not implemented in the stand-in."""

import enum


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = RGB_ALPHA


def __getattr__(name: str):
    from ._missing import missing

    return missing("torchvision.io", name)
