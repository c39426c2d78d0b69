"""Image pipeline: every PIL mode to a normalised [3, 224, 224], and clear errors for bad files."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conchshell.constants import IMAGE_MEAN, IMAGE_STD
from conchshell.data.image import image_from_pil, load_image
from conchshell.errors import DataError


def expected(rgb: tuple[float, float, float]) -> torch.Tensor:
    """The normalised value of a solid 8-bit colour, per channel."""
    return torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(rgb, IMAGE_MEAN, IMAGE_STD)])


def assert_solid(tensor: torch.Tensor, rgb: tuple[float, float, float]) -> None:
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    want = expected(rgb).view(3, 1, 1).expand(3, 224, 224)
    torch.testing.assert_close(tensor, want, atol=1e-5, rtol=0)


def test_solid_rgb_png_has_the_exact_normalised_value(tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (300, 180), (255, 0, 128)).save(path)
    assert_solid(load_image(path), (255, 0, 128))


def palette_image(color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("P", (50, 40), 3)
    img.putpalette([0, 0, 0] * 3 + list(color) + [0, 0, 0] * 252)
    return img


def make_16bit(mode: str) -> Image.Image:
    return Image.fromarray(np.full((40, 30), 257 * 100, dtype=np.uint16 if mode == "I;16" else np.int32))


@pytest.mark.parametrize(
    "make, rgb",
    [
        (lambda: Image.new("L", (50, 40), 100), (100, 100, 100)),
        (lambda: Image.new("1", (50, 40), 1), (255, 255, 255)),
        (lambda: palette_image((10, 200, 30)), (10, 200, 30)),
        (lambda: Image.new("RGBA", (50, 40), (10, 200, 30, 255)), (10, 200, 30)),
        (lambda: Image.new("RGBA", (50, 40), (10, 200, 30, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("LA", (50, 40), (0, 0)), (255, 255, 255)),
        (lambda: make_16bit("I;16"), (100, 100, 100)),  # 16-bit scaled, not clipped to white
        (lambda: make_16bit("I"), (100, 100, 100)),
        (lambda: Image.new("CMYK", (50, 40), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("CMYK", (50, 40), (0, 0, 0, 0)), (255, 255, 255)),
    ],
    ids=["L", "1", "P", "RGBA-opaque", "RGBA-transparent", "LA", "I;16", "I", "CMYK-red", "CMYK-white"],
)
def test_every_mode_becomes_normalised_rgb(make, rgb):
    img = make()
    assert_solid(image_from_pil(img), rgb)


def test_half_transparent_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    value = 255 - round(255 * 128 / 255)  # black over white at alpha 128/255
    tensor = image_from_pil(img)
    torch.testing.assert_close(tensor[:, 0, 0], expected((value,) * 3), atol=0.5 / 255 / min(IMAGE_STD), rtol=0)


def test_palette_with_transparency_and_16bit_png_from_disk(tmp_path):
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert_solid(load_image(tmp_path / "p.png"), (255, 255, 255))
    make_16bit("I;16").save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert_solid(load_image(tmp_path / "g16.png"), (100, 100, 100))


def test_file_and_pil_paths_agree_and_resize_any_shape(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 310, 3), dtype=np.uint8))
    img.save(tmp_path / "noise.png")
    from_file = load_image(tmp_path / "noise.png")
    assert from_file.shape == (3, 224, 224)
    torch.testing.assert_close(from_file, image_from_pil(img), atol=0, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    # Left half red, right half blue; EXIF orientation 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    tensor = load_image(tmp_path / "rotated.jpg")
    red = float(expected((255, 0, 0))[0])
    # Unrotated, the top-right corner would be blue and the bottom-left red.
    assert float(tensor[0, 10, 214]) == pytest.approx(red, abs=0.2)
    assert float(tensor[0, 214, 10]) < red - 2.0


def test_truncated_jpeg_raises_data_error_naming_the_file(tmp_path):
    path = tmp_path / "truncated.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_image(path)


def test_non_image_and_missing_file_raise_data_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello, I am not a picture")
    with pytest.raises(DataError, match="notes.jpg"):
        load_image(text)
    with pytest.raises(DataError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but carries no pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 60000])  # above our 64 MP limit; and above PIL's own hard limit
def test_decompression_bomb_raises_data_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    with pytest.raises(DataError, match="bomb.png"):
        load_image(path)


def test_pixel_limit_is_a_parameter(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(DataError, match="big.png.*above the limit"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10000).shape == (3, 224, 224)
