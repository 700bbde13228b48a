"""``torchvision.io`` names transformers imports; decoding is not implemented in the stand-in."""

import enum


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = RGB_ALPHA


def _missing(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision.io.{name}: not available in the development stand-in for torchvision "
            f"(vllm_kvbuffer.tools.torchvision_stub); install torchvision's CPU build")
    fn.__name__ = name
    return fn


decode_image = _missing("decode_image")
read_image = _missing("read_image")
read_video = _missing("read_video")
