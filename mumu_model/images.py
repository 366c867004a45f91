"""Safe image loading shared by the whole project (prompts, datasets, the demo).

Every image that enters MUMU goes through `load_image`, so a bad file fails here with one clear
`ImageLoadError` instead of deep inside a processor or a DataLoader worker. Images come out as
8-bit RGB; transparency is composited onto black because the project pads with black
(`pad_to_square`) and a segmented object on a removed background must look like padding.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb limit: far above any image the model uses (1024 px targets, 504 px crops)
# and far below what would exhaust memory when decoded (64 Mpx RGB is ~200 MB).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# Formats Pillow may try. An allow-list, because some Pillow plugins are risky on untrusted
# input (EPS runs Ghostscript) and nobody feeds a diffusion model an ICNS or a FITS file.
# Multi-picture JPEGs (MPO), as many cameras write, open through "JPEG".
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")

_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image file that cannot be used; `str(err)` is "{path}: {problem}"."""

    def __init__(self, path: str | os.PathLike, problem: str):
        # Both in args, so the error pickles intact out of DataLoader worker processes.
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def resolve_image_path(reference: str, image_root: str | os.PathLike) -> Path:
    """Turn a POSIX-style reference relative to `image_root` into a path inside the root.

    Symlinks are resolved on both sides first, so neither `../` nor a link can leave the root.
    """
    if not reference:
        raise ImageLoadError(repr(reference), "empty image reference")
    try:
        root = Path(image_root).resolve()
        # PurePosixPath so that the reference means the same on every OS; joining an absolute
        # reference replaces the root, and the containment check below then decides.
        path = root.joinpath(*PurePosixPath(reference).parts).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # null bytes, symlink loops
        raise ImageLoadError(reference, f"invalid image path ({err})") from err
    if not path.is_relative_to(root):
        raise ImageLoadError(reference, f"path is outside the allowed image root {root}")
    return path


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image file to RGB, or raise `ImageLoadError`.

    The size is checked from the header before anything is decoded. Pillow's own global limit
    (`Image.MAX_IMAGE_PIXELS`) still applies on top of `max_pixels`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "no such file")
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    if not path.is_file():  # FIFOs and devices would block or never end
        raise ImageLoadError(path, "is not a regular file")

    Image.init()  # registers all plugins, so the allow-list below only names available ones
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as file, Image.open(file, formats=formats) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        path, f"image too large: {width}x{height} pixels, at most {max_pixels}"
                    )
                image.load()  # decode now: truncated and corrupt files must fail here
                # Phones store rotation in EXIF; without this, their photos come out sideways.
                image = ImageOps.exif_transpose(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(path, f"image too large ({_one_line(err)})") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(
            path, f"not a recognised image file (allowed formats: {', '.join(formats)})"
        ) from err
    except PermissionError as err:
        raise ImageLoadError(path, "permission denied") from err
    except Exception as err:
        # Pillow's decoders signal damaged data with many exception types (OSError,
        # SyntaxError, struct.error, EOFError, zlib errors...); all mean the same to us.
        raise ImageLoadError(
            path, f"corrupt or truncated image ({type(err).__name__}: {_one_line(err)})"
        ) from err

    try:
        return to_rgb(image)
    except ValueError as err:
        raise ImageLoadError(path, str(err)) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB image; transparent pixels are composited onto black."""
    mode = image.mode
    if mode in _INTEGER_MODES or mode == "F":
        return _numeric_to_rgb(image)
    if not image.has_transparency_data:
        if mode == "RGB":
            return image.copy()
        try:
            return image.convert("RGB")
        except ValueError as err:
            raise ValueError(f"cannot convert image mode {mode!r} to RGB") from err

    if mode in ("RGBa", "La"):
        # Premultiplied alpha: the colour channels already are the colour over black.
        colour = np.asarray(image)[..., :-1]
        if mode == "La":
            colour = np.repeat(colour, 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(colour))
    # convert("RGBA") knows every way Pillow stores transparency: alpha bands, a palette with
    # alpha, and a "transparency" colour or palette index in image.info.
    rgba = np.asarray(image.convert("RGBA"))
    return Image.fromarray(_over_black(rgba[..., :3], rgba[..., 3]))


def pad_to_square(image: Image.Image, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """Centre `image` on a square canvas of side max(width, height) filled with `fill`."""
    width, height = image.size
    if width == height:
        return image.copy()
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    # An odd leftover pixel goes to the right/bottom.
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _numeric_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float images to RGB; numpy, because Pillow clips them at 255."""
    raw = np.asarray(image)
    values = raw.astype(np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        full_scale = 1.0 if _max(values) <= 1.0 else 255.0
    elif image.mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        # Mode "I" is 32-bit but usually holds 8- or 16-bit data (16-bit PNGs decode to it),
        # so scale by the smallest of those ranges that holds the data; negatives clip to 0.
        values = np.clip(values, 0, None)
        peak = _max(values)
        full_scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 2.0**31 - 1
    gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)

    transparency = image.info.get("transparency")
    if isinstance(transparency, (int, float)):  # a grey level marked transparent (PNG tRNS)
        alpha = np.where(raw == transparency, 0, 255).astype(np.uint8)
        rgb = _over_black(rgb, alpha)
    return Image.fromarray(rgb)


def _over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite uint8 colour (H, W, 3) with uint8 alpha (H, W) onto black, rounding."""
    premultiplied = colour.astype(np.uint32) * alpha[..., None].astype(np.uint32)
    return ((premultiplied + 127) // 255).astype(np.uint8)


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else 0.0


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
