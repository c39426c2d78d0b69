"""Image pipeline: any picture -> normalised float tensor [3, 224, 224].

Training, validation and inference all call :func:`load_image` (or :func:`image_from_pil`
for an image already in memory), so a model never sees pixels prepared differently from
the ones it was trained on.

Steps, in order:

1. Open with PIL and refuse decompression bombs: an image whose header claims more than
   ``max_pixels`` (default 8192 x 8192, about 67 MP) is rejected *before* decoding, with
   a :class:`DataError` instead of PIL's warning or error.
2. Decode fully (``img.load()``): PIL opens lazily, so a truncated or corrupt file would
   otherwise only fail later, inside a DataLoader worker, far from its name.
3. Apply the EXIF orientation, so a phone photo is upright as its owner saw it.
4. Convert to RGB (:func:`to_rgb`):
   - transparency (RGBA, LA, palette or grey images with a transparent colour) is
     composited onto **white**, the way a transparent picture shows on a page; dropping
     the alpha would instead expose whatever colour the transparent pixels happen to hold;
   - 16-bit grey (``I;16*``) and 32-bit integer (``I``, assumed to hold 16-bit data, the
     way PIL opens 16-bit PNG/TIFF) are scaled by 255/65535 to the 8-bit range; PIL's own
     conversion would clip them at 255 and turn most such pictures white;
   - float (``F``) is taken to be in the 8-bit range already and clipped to it;
   - grey, bilevel, palette, CMYK and YCbCr use PIL's conversion.
5. Resize to 224 x 224 with PIL's bilinear filter, which antialiases when shrinking
   (as torchvision's ``Resize((224, 224))`` on PIL images, which the original used); the
   aspect ratio is not kept, as in the original.
6. Scale to [0, 1] and normalise per channel with the BOPD statistics
   :data:`~conchshell.constants.IMAGE_MEAN` / :data:`~conchshell.constants.IMAGE_STD`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from conchshell.constants import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD
from conchshell.errors import DataError

DEFAULT_MAX_PIXELS = 8192 * 8192
_WHITE = (255, 255, 255, 255)
_MEAN = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)


def open_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, or raise :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # The size limit is ours (max_pixels); PIL's global one would only warn.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is too large to decode safely (decompression bomb?): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path} is not an image PIL can read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot open image {path}: {_first_line(exc)}") from exc
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise DataError(
            f"image {path} is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (decompression bomb?)"
        )
    try:
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken data
        img.close()
        raise DataError(f"image {path} is truncated or corrupt: {_first_line(exc)}") from exc
    return img


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read an image file as the model's input: float32 [3, 224, 224], normalised."""
    with open_image(path, max_pixels=max_pixels) as img:
        return image_from_pil(img, source=str(path))


def image_from_pil(img: Image.Image, *, source: str = "<PIL image>") -> torch.Tensor:
    """Prepare an in-memory PIL image exactly as :func:`load_image` prepares a file."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not cost the picture itself
        pass
    rgb = to_rgb(img, source=source)
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((pixels - _MEAN) / _STD).contiguous()


def to_rgb(img: Image.Image, *, source: str = "<PIL image>") -> Image.Image:
    """Any PIL mode -> 8-bit RGB, following the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img, dtype=np.float64)
        scaled = np.clip(values, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataError(f"image {source} has mode {mode}, which cannot be converted to RGB: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
