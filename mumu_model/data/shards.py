"""Dataset storage: WebDataset tar shards (one sample = members sharing a key) + parquet manifests.

A sample `abc` is the tar members `abc.jpg`, `abc.crop0.png`, `abc.json`, ...; everything after
the first dot of a member name is its field name, as WebDataset reads it. Shards are written
deterministically (sorted members, zero mtimes, fixed owner) and atomically, so re-running a
step produces the same bytes and the same DVC hash, and a killed run leaves no half shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from ..atomic import atomic_file, write_bytes_atomic
from ..images import DEFAULT_MAX_PIXELS, ImageLoadError, to_rgb
from ..prompt import MultimodalPrompt
from .report import Skipped

Sample = dict[str, bytes]  # field name ("jpg", "crop0.png", "json") -> bytes


class ShardError(ValueError):
    """A shard or a sample that cannot be read or written; names the file and the key."""


def shard_name(index: int) -> str:
    return f"{index:05d}"


def encode_image(image: Image.Image, field: str) -> bytes:
    """PNG or JPEG by the field's extension. PNG is lossless (crops, control images)."""
    buffer = io.BytesIO()
    extension = field.rsplit(".", 1)[-1].lower()
    if extension in ("jpg", "jpeg"):
        to_rgb(image).save(buffer, format="JPEG", quality=95)
    elif extension == "png":
        image.save(buffer, format="PNG")
    else:
        raise ShardError(f"cannot encode an image as field {field!r}; use .png or .jpg")
    return buffer.getvalue()


def decode_image(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ImageLoadError(field, f"{image.width}x{image.height} exceeds {max_pixels} pixels")
            image.load()
            return to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageLoadError(field, f"not a readable image ({type(err).__name__}: {err})") from err


def check_key(key: str) -> None:
    """Raise ShardError unless `key` can name a sample (WebDataset splits member names at dots)."""
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise ShardError(f"sample key {key!r} must be non-empty, without '.', '/' or a leading '_'")


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int
    bytes: int


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> ShardInfo:
    """Write samples (key, {field: bytes}) to a tar, atomically. Duplicate keys are refused.

    The tar is staged as `.<name>.<token>.tmp` beside `path` (`mumu_model.atomic`): a writer
    killed mid-shard leaves only that temp, which DVC, `dvc_hash` and the `*.tar` readers ignore
    and `remove_orphans` deletes. An exception raised by `samples` leaves no file at all."""
    path = Path(path)
    seen: set[str] = set()
    with atomic_file(path) as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, fields in samples:
                check_key(key)
                if key in seen:
                    raise ShardError(f"{path}: duplicate sample key {key!r}")
                seen.add(key)
                for field in sorted(fields):
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(fields[field])
                    info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
                    tar.addfile(info, io.BytesIO(fields[field]))
    return ShardInfo(path=path, samples=len(seen), bytes=path.stat().st_size)


def read_shard(path: str | os.PathLike, skipped: Skipped | None = None) -> Iterator[tuple[str, Sample]]:
    """Yield (key, {field: bytes}) in file order. A truncated or corrupt tar yields what precedes
    the damage and records it in `skipped` (or raises ShardError when no `skipped` is given)."""
    path = Path(path)
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                member_key, dot, field = name.partition(".")
                if not dot:
                    continue
                if member_key != key:
                    if key is not None:
                        yield key, sample
                    key, sample = member_key, {}
                handle = tar.extractfile(member)
                sample[field] = handle.read() if handle else b""
                if len(sample[field]) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
            # tarfile ends quietly when a file stops exactly between members; a complete
            # archive has its zero end blocks after the last member, so nothing there means a
            # cut-off shard (the training stream's index applies the same rule).
            if path.stat().st_size <= tar.offset:
                raise tarfile.ReadError("the archive has no end marker (cut off between members)")
    except (tarfile.TarError, OSError, EOFError) as err:
        message = f"{path}: damaged after sample {key!r} ({type(err).__name__}: {err})"
        if skipped is None:
            raise ShardError(message) from err
        skipped.add("damaged_shard", str(path), str(err))
        return  # the sample in progress may be incomplete: drop it
    if key is not None:
        yield key, sample


def sample_json(sample: Sample, key: str = "?") -> dict:
    if "json" not in sample:
        raise ShardError(f"sample {key!r} has no json field")
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"sample {key!r}: json field is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ShardError(f"sample {key!r}: json field is a {type(meta).__name__}, not an object")
    return meta


def sample_prompt(sample: Sample, key: str = "?", max_images: int | None = 4) -> MultimodalPrompt:
    """The multimodal prompt of a caption record; its `<img:NAME>` refer to the sample's fields."""
    meta = sample_json(sample, key)
    images = {
        field: decode_image(data, f"{key}.{field}")
        for field, data in sample.items()
        if field.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg") and f"<img:{field}>" in meta.get("prompt", "")
    }
    return MultimodalPrompt.from_text(meta["prompt"], images=images, max_images=max_images)


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Parquet, atomically."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return write_bytes_atomic(path, buffer.getvalue())


def json_bytes(meta: Mapping) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
