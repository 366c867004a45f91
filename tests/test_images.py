"""Safe image loading: mode conversion, bombs, broken files, path containment, padding."""

import ast
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mumu_model.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    load_image,
    pad_to_square,
    resolve_image_path,
    to_rgb,
)


def _pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return tuple(int(v) for v in np.asarray(image)[xy[1], xy[0]])


def _close(actual, expected, tolerance=1):
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def _palette_image(transparency=None, palette_mode="RGB") -> Image.Image:
    image = Image.new("P", (2, 1))
    if palette_mode == "RGBA":
        image.putpalette([255, 0, 0, 128, 0, 255, 0, 255], "RGBA")
    else:
        image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 0), 1)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def _palette_alpha_image() -> Image.Image:
    image = Image.new("PA", (1, 1), (0, 128))
    image.putpalette([255, 0, 0])
    return image


def _with_transparency(image: Image.Image, value) -> Image.Image:
    image.info["transparency"] = value
    return image


def _int_image(mode: str, values) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def _float_image(values) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=np.float32))


# (image, expected RGB of each pixel along the first row)
CONVERSIONS = {
    "RGB": (Image.new("RGB", (1, 1), (10, 20, 30)), [(10, 20, 30)]),
    "RGBA half red": (Image.new("RGBA", (1, 1), (255, 0, 0, 128)), [(128, 0, 0)]),
    "RGBA transparent white is black": (Image.new("RGBA", (1, 1), (255, 255, 255, 0)), [(0,) * 3]),
    "LA": (Image.new("LA", (1, 1), (200, 128)), [(100, 100, 100)]),
    "PA": (_palette_alpha_image(), [(128, 0, 0)]),
    "RGBa premultiplied": (Image.new("RGBa", (1, 1), (100, 0, 0, 128)), [(100, 0, 0)]),
    "La premultiplied": (Image.new("La", (1, 1), (50, 128)), [(50, 50, 50)]),
    "P": (_palette_image(), [(255, 0, 0), (0, 255, 0)]),
    "P transparency index": (_palette_image(transparency=0), [(0, 0, 0), (0, 255, 0)]),
    "P transparency bytes": (_palette_image(transparency=b"\x80\xff"), [(128, 0, 0), (0, 255, 0)]),
    "P RGBA palette": (_palette_image(palette_mode="RGBA"), [(128, 0, 0), (0, 255, 0)]),
    "L": (Image.new("L", (1, 1), 77), [(77, 77, 77)]),
    "L transparency": (
        _with_transparency(_int_image("L", [5, 9]), 5),
        [(0, 0, 0), (9, 9, 9)],
    ),
    "RGB transparency": (
        _with_transparency(Image.new("RGB", (1, 1), (5, 6, 7)), (5, 6, 7)),
        [(0, 0, 0)],
    ),
    "1": (_int_image("1", [0, 1]), [(0, 0, 0), (255, 255, 255)]),
    "CMYK": (Image.new("CMYK", (1, 1), (0, 255, 255, 0)), [(255, 0, 0)]),
    "CMYK black": (Image.new("CMYK", (1, 1), (0, 0, 0, 255)), [(0, 0, 0)]),
    "YCbCr": (Image.new("RGB", (1, 1), (200, 40, 10)).convert("YCbCr"), [(200, 40, 10)]),
    "HSV": (Image.new("HSV", (1, 1), (0, 255, 255)), [(255, 0, 0)]),
    "LAB": (Image.new("LAB", (1, 1), (255, 128, 128)), [(255, 255, 255)]),
    "I;16": (_int_image("I;16", [0, 32768, 65535]), [(0,) * 3, (128,) * 3, (255,) * 3]),
    "I;16B": (_int_image("I;16B", [0, 65535]), [(0,) * 3, (255,) * 3]),
    "I;16L": (_int_image("I;16L", [0, 65535]), [(0,) * 3, (255,) * 3]),
    "I;16N": (_int_image("I;16N", [0, 65535]), [(0,) * 3, (255,) * 3]),
    "I;16 transparency": (
        _with_transparency(_int_image("I;16", [0, 65535]), 0),
        [(0,) * 3, (255,) * 3],
    ),
    "I 16-bit data": (_int_image("I", [-5, 0, 65535]), [(0,) * 3, (0,) * 3, (255,) * 3]),
    "I 8-bit data": (_int_image("I", [0, 255]), [(0,) * 3, (255,) * 3]),
    "I 32-bit data": (_int_image("I", [0, 2**31 - 1]), [(0,) * 3, (255,) * 3]),
    "F unit range": (_float_image([0.0, 0.5, 1.0]), [(0,) * 3, (128,) * 3, (255,) * 3]),
    "F byte range, clipped": (
        _float_image([-3.0, 128.0, 300.0, float("nan")]),
        [(0,) * 3, (128,) * 3, (255,) * 3, (0,) * 3],
    ),
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_to_rgb_converts_every_mode(name):
    image, expected = CONVERSIONS[name]
    mode_before, bytes_before = image.mode, image.tobytes()
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    assert converted is not image
    for x, rgb in enumerate(expected):
        # LAB and YCbCr are lossy colour-space round trips.
        tolerance = 3 if name in ("LAB", "YCbCr") else 1
        assert _close(_pixel(converted, (x, 0)), rgb, tolerance), (x, _pixel(converted, (x, 0)))
    assert (image.mode, image.tobytes()) == (mode_before, bytes_before)  # input untouched


def test_to_rgb_copies_rgb_input():
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    converted = to_rgb(image)
    converted.putpixel((0, 0), (9, 9, 9))
    assert image.getpixel((0, 0)) == (1, 2, 3)


# -- load_image -------------------------------------------------------------------------------


def _noise(height=32, width=48, channels=3, seed=0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_load_noise_jpeg_photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_noise()).save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)


def test_load_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write
    Image.fromarray(_noise(height=10, width=20)).save(path, exif=exif)
    assert load_image(path).size == (10, 20)


@pytest.mark.parametrize(
    "name, save, expected",
    [
        ("rgba.png", lambda p: Image.new("RGBA", (3, 3), (255, 0, 0, 128)).save(p), (128, 0, 0)),
        ("la.png", lambda p: Image.new("LA", (3, 3), (200, 0)).save(p), (0, 0, 0)),
        ("l.png", lambda p: Image.new("L", (3, 3), 50).save(p), (50, 50, 50)),
        ("cmyk.tif", lambda p: Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(p), (255, 0, 0)),
        (
            "gray16.png",
            lambda p: Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(p),
            (255, 255, 255),
        ),
        (
            "transparent.gif",
            lambda p: _palette_image(transparency=0).save(p, transparency=0),
            (0, 0, 0),
        ),
    ],
)
def test_load_non_rgb_files(tmp_path, name, save, expected):
    path = tmp_path / name
    save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert _close(_pixel(image), expected)


def _png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height: decoding it would fail as truncated."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data follows signature+length+type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(
    "width, height",
    [
        (9000, 9000),  # over our 64 Mpx limit, under Pillow's own warning threshold
        (10000, 10000),  # over Pillow's warning threshold: the warning must become an error
        (100000, 100000),  # over Pillow's error threshold
    ],
)
def test_decompression_bomb_rejected_from_header(tmp_path, width, height):
    assert width * height > DEFAULT_MAX_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming_size(width, height))
    # "too large" rather than "truncated" proves it was refused before decoding.
    with pytest.raises(ImageLoadError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(_noise(height=4, width=4)).save(path)
    assert load_image(path, max_pixels=16).size == (4, 4)
    with pytest.raises(ImageLoadError, match="4x4 pixels, at most 15"):
        load_image(path, max_pixels=15)


def _truncated_png(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_noise(height=64, width=64)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _corrupt_png(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_noise(height=64, width=64)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    data[start : start + 200] = bytes(200)  # zeroed compressed data: bad zlib stream and CRC
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.write_text("hello"), "not a recognised image file"),
        (lambda p: p.write_bytes(b""), "not a recognised image file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "not a recognised image"),
        (_truncated_png, "corrupt or truncated"),
        (_corrupt_png, "corrupt or truncated"),
    ],
    ids=["missing", "directory", "fifo", "text", "empty", "bad-png-header", "truncated", "corrupt"],
)
def test_load_rejects_bad_files(tmp_path, make, phrase):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageLoadError, match=phrase) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_load_rejects_risky_formats(tmp_path):
    path = tmp_path / "x.eps"  # EPS would run Ghostscript
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(ImageLoadError, match="not a recognised image file"):
        load_image(path)


def test_load_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)

    # chmod 0 does not stop root (CI containers), so make open() itself refuse.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("mumu_model.images.open", refuse, raising=False)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_load_leaves_no_file_open(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(_noise()).save(good)
    _truncated_png(bad)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        load_image(good)
        with pytest.raises(ImageLoadError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) == before


def test_image_load_error_is_value_error_and_pickles():
    err = ImageLoadError("a/b.png", "no such file")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == "a/b.png: no such file" and copy.problem == "no such file"


def test_no_scikit_image_dependency():
    import mumu_model.images as images

    tree = ast.parse(Path(images.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "skimage" not in imported


# -- resolve_image_path -----------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(root / "sub" / "a.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "outside.png")
    (root / "link_out.png").symlink_to(tmp_path / "outside.png")
    (root / "link_in.png").symlink_to(root / "sub" / "a.png")
    return root


def test_resolve_inside_root(root):
    target = (root / "sub" / "a.png").resolve()
    assert resolve_image_path("sub/a.png", root) == target
    assert resolve_image_path("sub/../sub/./a.png", root) == target
    assert resolve_image_path(str(target), root) == target  # absolute, but inside
    assert resolve_image_path("link_in.png", root) == target
    assert resolve_image_path("missing.png", root) == root.resolve() / "missing.png"


@pytest.mark.parametrize(
    "reference, phrase",
    [
        ("", "empty image reference"),
        ("../outside.png", "outside the allowed image root"),
        ("sub/../../outside.png", "outside the allowed image root"),
        ("link_out.png", "outside the allowed image root"),
        ("/etc/hostname", "outside the allowed image root"),
        ("a\x00b.png", "invalid image path"),
    ],
)
def test_resolve_rejects_escapes(root, reference, phrase):
    with pytest.raises(ImageLoadError, match=phrase):
        resolve_image_path(reference, root)


def test_resolve_rejects_absolute_path_outside_root(root):
    with pytest.raises(ImageLoadError, match="outside the allowed image root"):
        resolve_image_path(str(root.parent / "outside.png"), root)


# -- pad_to_square ----------------------------------------------------------------------------


@pytest.mark.parametrize("size, offset", [((4, 2), (0, 1)), ((2, 5), (1, 0)), ((5, 2), (0, 1))])
def test_pad_to_square_centres(size, offset):
    image = Image.new("RGB", size, (255, 255, 255))
    padded = pad_to_square(image)
    side = max(size)
    assert padded.size == (side, side)
    array = np.asarray(padded)
    left, top = offset
    assert (array[top : top + size[1], left : left + size[0]] == 255).all()
    assert array.sum() == 255 * 3 * size[0] * size[1]  # everything else is black


def test_pad_to_square_fill_and_copy():
    padded = pad_to_square(Image.new("RGB", (1, 3), (255, 255, 255)), fill=(0, 0, 255))
    assert padded.getpixel((0, 0)) == (0, 0, 255) and padded.getpixel((1, 1)) == (255, 255, 255)
    square = Image.new("RGB", (3, 3), (7, 7, 7))
    copy = pad_to_square(square)
    assert copy is not square and copy.tobytes() == square.tobytes()
