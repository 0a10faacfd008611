"""Reading a user's photo: any common format, orientation, bit depth or channel layout, as RGB.

`read_photo` returns an 8-bit RGB array the right way up (EXIF orientation applied), plus the
photo's own alpha channel when it has a meaningful one (a cut-out PNG is a free person mask).
Everything a user can get wrong raises `PhotoError` with a message naming the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AvatarError

MIN_SIDE = 64  # smaller photos cannot hold a person at any useful resolution
MAX_SIDE = 4096  # larger photos are downscaled on load (the pipeline works well below 2k)
MAX_PIXELS = 300_000_000  # refuse decompression bombs before decoding


class PhotoError(AvatarError):
    """A photo that cannot be used; the message names the file and the problem."""


@dataclass
class Photo:
    rgb: np.ndarray  # [H, W, 3] uint8, upright
    alpha: np.ndarray | None  # [H, W] float32 in [0, 1] when the file had a real alpha channel
    path: str
    original_size: tuple[int, int]  # (width, height) before any downscaling
    scale: float  # original pixels per returned pixel (>= 1)


def _to_rgb8(img) -> tuple[np.ndarray, np.ndarray | None]:
    """Any PIL mode -> RGB uint8 (+ alpha float). 16-bit and float images are rescaled."""

    alpha = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), None
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        a = rgba[..., 3].astype(np.float32) / 255.0
        if a.min() < 0.99:  # a real cut-out, not an opaque alpha channel
            alpha = a
        # composite on white so colours under soft edges stay sensible
        rgb = rgba[..., :3].astype(np.float32) * a[..., None] + 255.0 * (1 - a[..., None])
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), alpha
    return np.asarray(img.convert("RGB")), None


def read_photo(path: str | os.PathLike, max_side: int = MAX_SIDE) -> Photo:
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise PhotoError(f"{path}: a folder, not a photo")
    if not path.is_file():
        raise PhotoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise PhotoError(f"{path}: the file is empty")
    try:
        with warnings.catch_warnings():  # our own limit below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise PhotoError(f"{path}: {img.width}x{img.height} is too large to load")
                img.load()
                img = ImageOps.exif_transpose(img)
                original = (img.width, img.height)
                rgb, alpha = _to_rgb8(img)
    except Image.DecompressionBombError:
        raise PhotoError(f"{path}: the image is too large to load") from None
    except UnidentifiedImageError:
        raise PhotoError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise PhotoError(f"{path}: the image data is corrupt or truncated ({exc})") from None
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise PhotoError(f"{path}: {w}x{h} is too small; the shorter side needs {MIN_SIDE}+ px")
    scale = max(h, w) / max_side
    if scale > 1:
        size = (round(w / scale), round(h / scale))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
        if alpha is not None:
            a8 = Image.fromarray((alpha * 255).astype(np.uint8))
            alpha = np.asarray(a8.resize(size, Image.Resampling.BILINEAR), np.float32) / 255
    return Photo(rgb, alpha, str(path), original, max(scale, 1.0))
