"""The image functions transformers' torchvision backend calls, in plain torch.

They follow torchvision's tensor semantics: images ``[..., C, H, W]``; ``resize`` interpolates in
float with ``torch.nn.functional.interpolate`` (the kernel torchvision itself calls for tensors,
antialiased for bilinear/bicubic) and rounds and clamps integer images back to their dtype.
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_TORCH_MODES = {InterpolationMode.NEAREST: "nearest", InterpolationMode.NEAREST_EXACT:
                "nearest-exact", InterpolationMode.BILINEAR: "bilinear",
                InterpolationMode.BICUBIC: "bicubic"}


def _mode(interpolation) -> InterpolationMode:
    if isinstance(interpolation, InterpolationMode):
        return interpolation
    if isinstance(interpolation, str):
        return InterpolationMode(interpolation)
    if isinstance(interpolation, int):   # PIL's resampling constants
        return {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS,
                2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC,
                4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}[interpolation]
    raise TypeError(f"interpolation: expected an InterpolationMode, got {interpolation!r}")


def resize(image: torch.Tensor, size, interpolation=InterpolationMode.BILINEAR,
           max_size=None, antialias=True) -> torch.Tensor:
    """``image [..., C, H, W]`` resized to ``size`` = ``(h, w)`` (an int: the shorter edge)."""
    mode = _mode(interpolation)
    if mode not in _TORCH_MODES:
        raise NotImplementedError(f"resize: interpolation {mode} is not available in the "
                                  f"development stand-in for torchvision")
    H, W = image.shape[-2:]
    if isinstance(size, int) or len(size) == 1:
        s = size if isinstance(size, int) else size[0]
        short, long = (H, W) if H <= W else (W, H)
        new_short, new_long = s, int(s * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        size = (new_short, new_long) if H <= W else (new_long, new_short)
    h, w = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return image
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:])
    dtype = x.dtype
    xf = x if x.is_floating_point() else x.float()
    kw = {}
    if _TORCH_MODES[mode] in ("bilinear", "bicubic"):
        kw = dict(align_corners=False, antialias=bool(antialias))
    y = F.interpolate(xf, size=(h, w), mode=_TORCH_MODES[mode], **kw)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        y = y.round_().clamp_(info.min, info.max).to(dtype)
    return y.reshape(*lead, *y.shape[-3:])


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              inplace: bool = False) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise TypeError(f"normalize: expected a floating-point tensor, got {tensor.dtype}")
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if inplace:
        return tensor.sub_(mean).div_(std)
    return (tensor - mean) / std


def pad(image: torch.Tensor, padding, fill=0, padding_mode: str = "constant") -> torch.Tensor:
    """``padding``: an int, ``[left/right, top/bottom]`` or ``[left, top, right, bottom]``."""
    if isinstance(padding, int):
        padding = [padding] * 4
    padding = list(padding)
    if len(padding) == 1:
        padding = padding * 4
    elif len(padding) == 2:
        padding = [padding[0], padding[1], padding[0], padding[1]]
    left, top, right, bottom = padding
    if padding_mode == "constant":
        return F.pad(image, (left, right, top, bottom), value=float(fill or 0))
    mode = {"edge": "replicate", "reflect": "reflect", "symmetric": "reflect"}[padding_mode]
    return F.pad(image, (left, right, top, bottom), mode=mode)


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    H, W = image.shape[-2:]
    if top < 0 or left < 0 or top + height > H or left + width > W:
        image = pad(image, [max(-left, 0), max(-top, 0), max(left + width - W, 0),
                            max(top + height - H, 0)])
        top, left = max(top, 0), max(left, 0)
    return image[..., top:top + height, left:left + width]


def center_crop(image: torch.Tensor, output_size) -> torch.Tensor:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    h, w = output_size[0], output_size[-1]
    H, W = image.shape[-2:]
    return crop(image, int(round((H - h) / 2.0)), int(round((W - w) / 2.0)), h, w)


def to_pil_image(pic, mode=None):
    """A ``[C, H, W]`` (or ``[H, W]``) tensor or an ``[H, W, C]`` array as a PIL image (uint8 as
    is, floats scaled by 255)."""
    from PIL import Image

    if isinstance(pic, torch.Tensor):
        t = pic if pic.dim() == 3 else pic.unsqueeze(0)
        if t.is_floating_point():
            t = (t * 255).round().clamp(0, 255)
        arr = t.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    else:
        arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr, mode=mode)


def grayscale_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """``[..., 1, H, W]`` repeated to three channels; other images unchanged."""
    return image.repeat_interleave(3, dim=-3) if image.shape[-3] == 1 else image


def to_tensor(pic) -> torch.Tensor:
    """A PIL image or ``[H, W, C]`` uint8 array as a float ``[C, H, W]`` tensor in [0, 1]."""
    t = pil_to_tensor(pic)
    return t if t.is_floating_point() else t.float().div_(255)


def pil_to_tensor(pic) -> torch.Tensor:
    """A PIL image as a ``[C, H, W]`` tensor of its own dtype (no scaling), as torchvision does."""
    arr = np.array(pic, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def __getattr__(name: str):
    from ..._missing import missing

    return missing("torchvision.transforms.v2.functional", name)
