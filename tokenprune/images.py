"""Opening user images: every failure a clear `InputError`, every mode converted to RGB.

PIL opens lazily and decodes on first use, so a truncated file, a decompression bomb or a 0x0
image would fail deep inside a processor; here they fail at once, naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from .errors import InputError

MAX_PIXELS = 89_478_485
"""Larger images are refused before decoding (PIL's own decompression-bomb threshold; a
processor resizes every image to well under a megapixel anyway)."""


def load_image(path: str | Path) -> Image.Image:
    """The image at `path`, decoded and converted to RGB.

    Transparent images (RGBA, LA, P with transparency) are composited on white; 16-bit and float
    grayscale are scaled to 8 bits; CMYK, palette and 1-bit images are converted; a multi-frame file
    gives its first frame.

    Raises:
        FileNotFoundError: no such file.
        InputError: a directory, an empty, truncated or unreadable file, a 0x0 image, or more than
            `MAX_PIXELS` pixels.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"image {str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"image file {str(path)!r} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InputError(
                        f"image {str(path)!r} is {width}x{height} pixels, more than the {MAX_PIXELS} allowed "
                        "(a decompression bomb, or an image to downscale first)"
                    )
                if width == 0 or height == 0:
                    raise InputError(f"image {str(path)!r} is {width}x{height} pixels; it has no content")
                previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
                try:
                    image.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = previous
                return to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(
            f"image {str(path)!r} has more than {MAX_PIXELS} pixels (a decompression bomb, or an image to "
            "downscale first)"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot read image {str(path)!r}: {first} (a corrupt, truncated or unsupported image file)"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see `load_image` for how each mode is converted)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0) / 255.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
