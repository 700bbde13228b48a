"""``torchvision.transforms.functional`` of the development stand-in (the same functions as v2)."""

from .v2.functional import (  # noqa: F401  (re-exported, as torchvision does)
    InterpolationMode,
    center_crop,
    crop,
    grayscale_to_rgb,
    normalize,
    pad,
    pil_to_tensor,
    resize,
    to_pil_image,
    to_tensor,
)


def __getattr__(name: str):
    from .._missing import missing

    return missing("torchvision.transforms.functional", name)
