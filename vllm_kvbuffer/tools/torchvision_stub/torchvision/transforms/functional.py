"""``torchvision.transforms.functional`` of the development stand-in (the same functions as v2)."""

from .v2.functional import (  # noqa: F401  (re-exported, as torchvision does)
    InterpolationMode,
    center_crop,
    crop,
    normalize,
    pad,
    pil_to_tensor,
    resize,
)
