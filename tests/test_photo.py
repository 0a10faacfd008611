"""Loading users' photos: formats, orientation, depth, channels, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from avatar.photo import PhotoError, read_photo


def _gradient(h=120, w=80) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8)


def test_rgb_jpeg_and_png(tmp_path):
    img = _gradient()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    assert np.array_equal(read_photo(tmp_path / "a.png").rgb, img)
    jpg = read_photo(tmp_path / "a.jpg")
    assert jpg.rgb.shape == img.shape and np.abs(jpg.rgb.astype(int) - img).mean() < 3


def test_exif_rotation_is_applied(tmp_path):
    img = _gradient(120, 80)  # portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored landscape, shown portrait
    Image.fromarray(np.rot90(img, k=1)).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_photo(tmp_path / "r.jpg").rgb
    assert out.shape == (120, 80, 3)
    assert np.abs(out.astype(int) - img).mean() < 4


def test_greyscale_16bit_and_rgba(tmp_path):
    Image.fromarray(_gradient()[..., 0]).save(tmp_path / "g.png")
    g = read_photo(tmp_path / "g.png")
    assert g.rgb.shape == (120, 80, 3) and (g.rgb[..., 0] == g.rgb[..., 2]).all()
    deep = (np.linspace(0, 65535, 120 * 80).reshape(120, 80)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    d = read_photo(tmp_path / "d.png")
    assert d.rgb.dtype == np.uint8 and d.rgb.max() >= 250 and d.rgb.min() <= 2
    rgba = np.concatenate([_gradient(), np.zeros((120, 80, 1), np.uint8)], -1)
    rgba[30:90, 20:60, 3] = 255  # an opaque "person" in a transparent frame
    Image.fromarray(rgba).save(tmp_path / "c.png")
    c = read_photo(tmp_path / "c.png")
    assert c.alpha is not None and c.alpha[60, 40] == 1 and c.alpha[5, 5] == 0
    assert (c.rgb[5, 5] == 255).all()  # transparent pixels become white
    opaque = rgba.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(tmp_path / "o.png")
    assert read_photo(tmp_path / "o.png").alpha is None


def test_huge_photos_are_downscaled_tiny_refused(tmp_path):
    Image.fromarray(np.zeros((300, 5000, 3), np.uint8)).save(tmp_path / "wide.png")
    wide = read_photo(tmp_path / "wide.png", max_side=1000)
    assert wide.rgb.shape == (60, 1000, 3) and wide.scale == 5.0
    assert wide.original_size == (5000, 300)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(PhotoError, match="too small"):
        read_photo(tmp_path / "tiny.png")


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("missing.png", None, "no such file"),
        ("empty.jpg", b"", "empty"),
        ("notes.png", b"this is not an image at all", "not an image"),
        ("speech.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ", "not an image"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PhotoError, match=problem) as info:
        read_photo(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path):
    Image.fromarray(_gradient(400, 300)).save(tmp_path / "full.jpg", quality=95)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(PhotoError, match="corrupt or truncated"):
        read_photo(tmp_path / "cut.jpg")
