"""Training data: a deterministic, resumable stream of samples over the caption shards.

Order. The shards (tar paths or glob patterns, expanded and sorted) are indexed once from their
tar headers alone: every sample becomes an entry (shard, key, byte range of its members), in
shard order then file order. Epoch e visits all entries in a permutation seeded by (seed, e),
and rank r of W takes slots r, r+W, r+2W, ... of it, so the ranks partition every epoch and a
step of per-rank batch B covers B*W consecutive slots (when no sample is skipped). A global
shuffle, not shard order + in-shard order, because the data steps write the K styles of one
content next to each other: in-shard order would fill a batch with near-copies of one prompt.
Reading a sample is one read of its byte range, so each rank reads only its own samples.
With `shard_weights` (one per pattern), epoch e visits each entry of a pattern of weight w
floor(w) times, plus once more with probability w - floor(w) (drawn per entry and epoch from
(seed, e)): a mixture of sources without rewriting them. A repeated entry shares its random
decisions within the epoch (they are seeded by its key).

Indexing at scale. Indexing reads every tar header (one seek per member): at paper size,
thousands of shards of ~1,000 samples, that is millions of small reads. Given `gather` (a
collective returning every rank's bytes in rank order, e.g. `parallel.all_gather_bytes`), rank
r indexes only shards r, r+W, ... and the ranks exchange their parts as safetensors bytes (no
pickle); every rank then holds the index it would have built alone, in the same order. Chosen
over an index cache file: nothing to invalidate, nothing written beside DVC-tracked data or
shared between nodes, and the first run is as fast as the next. The index is flat arrays
(about 24 bytes + the key per sample), not an object per sample. Without `gather` every rank
indexes every shard itself.

Randomness. A sample's random decisions (conditioning dropout; which conditioning images are
augmented, and how) come from an rng seeded by (seed, epoch, key) alone, never from a global
rng: they do not depend on the rank, the world size, the workers or where training resumed.

Resume. The state is (epoch, position): position counts the slots of this rank's share of the
epoch already consumed, bad samples included, so `load_state_dict(state_dict())` on a fresh
stream continues with exactly the next sample. Each rank saves its own state;
`reshard_states` turns the states of W ranks into the state of a rank of another world size.

Workers. `make_loader` gives a `TrainingLoader`. Its main process walks the slots and alone
holds the state; DataLoader worker processes read, decode, augment and run the encoder's
processor on chunks of consecutive slots; the main process takes the usable results in slot
order, B at a time, and pads their encodings into one batch (exactly what `collate` returns).
So the batches and the states are the same for any number of workers, and a state taken
between batches resumes at the next batch. Workers start by "forkserver": the server process
imports this module once and every worker is a fork of that clean, single-threaded process.
"fork" would copy a trainer that holds CUDA state and NCCL / OpenMP threads (unsafe); "spawn"
is as safe but imports torch and transformers again in every worker.

Bad data never stops training, and is reported. A damaged shard contributes the samples before
the damage (as `read_shard` does); a sample without json or target image, whose prompt does not
parse (or holds one of the encoder's reserved tokens), or with a corrupt image is skipped
wherever it comes up. Each is counted once in `stream.skipped`. Skipping is a pure function of
the data, so the other samples keep their places and a resumed stream skips the same ones.
`data_report()` summarises it for the trainer's log; `check_bad_fraction(max_fraction)` raises
`BadData`, naming the shards responsible, when more than that fraction of the data is unusable:

    unreadable fraction = (estimated samples lost in damaged shards + distinct unusable
                           samples found so far) / (samples indexed + estimated lost)

What a damaged shard lost is unknown (nothing after the damage can be read), so it is taken to
have held as many samples as the median intact shard (the data steps write shards of a fixed
size), and at least one more than it kept (the sample in progress); with no intact shard to
compare with, it is taken to have lost as many as it kept, at least one. Damaged shards count
from the start; decode errors count as they are read, so the figure only grows and is exact
after one epoch. It never raises on an unlucky first batch.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import statistics
import struct
import sys
import tarfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.numpy import load as numpy_load
from safetensors.numpy import save as numpy_save
from safetensors.torch import save as safetensors_save

from ..atomic import write_bytes_atomic
from ..data.captions import CONTROL_NAME
from ..data.report import Skipped
from ..data.shards import Sample, ShardError, decode_image, sample_json, sample_prompt
from ..encoder import encoder_inputs, reserved_tokens
from ..images import ImageLoadError, pad_to_square, to_rgb
from ..prompt import MultimodalPrompt, PromptError

# The member holding the target image, in order of preference (as the data steps write it).
TARGET_FIELDS = ("jpg", "png")

# Paper: 20% of conditioning images get one of these.
AUGMENTATIONS = ("crop", "flip", "noise", "grayscale")
# Further ones a recipe may choose, for crops that come from elsewhere than the training data's
# detector: a margin of plain background, a lower resolution, a small colour shift.
EXTRA_AUGMENTATIONS = ("margin", "scale", "jitter")
CROP_KEEP = (0.7, 1.0)  # share of each side a random crop keeps
NOISE_SIGMA = 0.05  # Gaussian noise std on the [0, 1] pixel scale
MARGIN_FRACTION = (0.05, 0.25)  # margin on each side, as a share of the longer side
SCALE_RANGE = (0.4, 0.9)  # the image is resized to this share of its size (and back by the encoder)
JITTER_RGB = 15  # per-channel colour shift, RGB units

# Every rank's bytes in rank order; called by all ranks together (e.g. parallel.all_gather_bytes).
Gather = Callable[[bytes], list[bytes]]


@dataclass(frozen=True)
class DataConfig:
    shards: tuple[str, ...]  # tar paths or glob patterns, expanded and sorted
    resolution: int = 1024  # target images: padded to square with black, resized to this
    # Share of samples whose prompt becomes the empty prompt, the unconditional branch of
    # classifier-free guidance.
    conditioning_dropout: float = 0.1
    augment_probability: float = 0.2  # share of conditioning images augmented
    augmentations: tuple[str, ...] = AUGMENTATIONS  # each augmented image gets one, uniformly
    # Visits per epoch of each entry, one weight per `shards` pattern (empty: 1 each), e.g.
    # (1.0, 0.2) takes every sample of the first pattern and a fifth of the second's per epoch.
    shard_weights: tuple[float, ...] = ()
    max_images: int = 4  # a record with more images is skipped as a bad prompt
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept one path or any sequence (YAML gives lists) and store a tuple of str.
        shards = (self.shards,) if isinstance(self.shards, (str, os.PathLike)) else self.shards
        object.__setattr__(self, "shards", tuple(os.fspath(shard) for shard in shards))
        object.__setattr__(self, "augmentations", tuple(self.augmentations))
        check_augmentations(self.augmentations)
        object.__setattr__(self, "shard_weights", tuple(float(w) for w in self.shard_weights))
        check_shard_weights(self.shards, self.shard_weights)
        if not self.shards:
            raise ValueError("DataConfig.shards is empty: give tar paths or glob patterns")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {self.resolution}")
        for name in ("conditioning_dropout", "augment_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")


@dataclass
class TrainingSample:
    key: str
    target: torch.Tensor  # [3, R, R] float in [-1, 1]
    prompt: MultimodalPrompt  # after augmentation and dropout
    dropped: bool = False  # the conditioning was dropped: prompt is MultimodalPrompt()
    epoch: int = 0
    index: int = -1  # the entry in the stream's index (-1: not from a stream)


class BadData(ValueError):
    """More of the training data is unreadable than the run allows (or none of it is usable); the
    message names the shards. A ValueError: a refusal of the input, reported in one line."""


# -- randomness ----------------------------------------------------------------------------


def _rng(*parts: object) -> random.Random:
    """An rng seeded from `parts`; sha256 rather than `hash()`, which Python salts per process."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The rng of every random decision about one sample in one epoch."""
    return _rng(seed, "sample", epoch, key)


# -- per-sample transforms -----------------------------------------------------------------


def target_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Pad to square with black, resize (bicubic) to `resolution`: [3, R, R] uint8."""
    square = pad_to_square(to_rgb(image)).resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).contiguous()


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [-1, 1] (any shape)."""
    return pixels.float().div_(127.5).sub_(1.0)


def target_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Pad to square with black, resize (bicubic) to `resolution`: [3, R, R] float in [-1, 1]."""
    return pixels_to_unit(target_pixels(image, resolution))


def check_shard_weights(shards: Sequence[str], weights: Sequence[float]) -> None:
    """ValueError unless `weights` is empty or one finite weight >= 0 per pattern, not all 0."""
    if not weights:
        return
    if len(weights) != len(shards):
        raise ValueError(f"shard_weights has {len(weights)} weights for {len(shards)} shard patterns "
                         f"({', '.join(map(repr, shards))}): give one per pattern")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise ValueError(f"shard_weights must be finite and >= 0, not all 0, got {list(weights)}")


def check_augmentations(kinds: Sequence[str]) -> None:
    """ValueError naming any kind that is neither in AUGMENTATIONS nor EXTRA_AUGMENTATIONS."""
    known = AUGMENTATIONS + EXTRA_AUGMENTATIONS
    unknown = [kind for kind in kinds if kind not in known]
    if unknown or not kinds:
        raise ValueError(f"augmentations {list(kinds)}: unknown {unknown or 'none given'} "
                         f"(known: {', '.join(known)})")


def augment_image(image: Image.Image, rng: random.Random,
                  kinds: Sequence[str] = AUGMENTATIONS) -> tuple[Image.Image, str]:
    """One augmentation drawn uniformly from `kinds`; returns (new image, its name)."""
    kind = rng.choice(list(kinds))
    if kind == "margin":
        # A plain light, dark or grey background around the object, as a looser box or another
        # program's crop would have.
        width, height = image.size
        pad = max(1, round(max(width, height) * rng.uniform(*MARGIN_FRACTION)))
        grey = rng.choice((rng.randint(190, 255), rng.randint(20, 80), rng.randint(100, 180)))
        canvas = Image.new("RGB", (width + 2 * pad, height + 2 * pad), (grey, grey, grey))
        canvas.paste(image.convert("RGB"), (pad, pad))
        return canvas, kind
    if kind == "scale":
        width, height = image.size
        factor = rng.uniform(*SCALE_RANGE)
        small = (max(1, round(width * factor)), max(1, round(height * factor)))
        return image.resize(small, Image.Resampling.BOX), kind
    if kind == "jitter":
        shift = np.array([rng.randint(-JITTER_RGB, JITTER_RGB) for _ in range(3)], dtype=np.int16)
        shifted = np.asarray(image.convert("RGB"), dtype=np.int16) + shift
        return Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)), kind
    if kind == "crop":
        width, height = image.size
        keep_w = max(1, round(width * rng.uniform(*CROP_KEEP)))
        keep_h = max(1, round(height * rng.uniform(*CROP_KEEP)))
        left, top = rng.randint(0, width - keep_w), rng.randint(0, height - keep_h)
        return image.crop((left, top, left + keep_w, top + keep_h)), kind
    if kind == "flip":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), kind
    if kind == "noise":
        # numpy's generator draws the pixels' noise fast; it is seeded from the sample's rng.
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, NOISE_SIGMA * 255, (image.height, image.width, 3))
        noisy = np.asarray(image, dtype=np.float64) + noise
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)), kind
    return ImageOps.grayscale(image).convert("RGB"), kind


def augment_prompt(prompt: MultimodalPrompt, rng: random.Random, probability: float,
                   kinds: Sequence[str] = AUGMENTATIONS) -> MultimodalPrompt:
    """Each conditioning image independently augmented with `probability`, by one of `kinds`.

    The control image (canny/depth/sketch of the whole target, `control.png`) is never
    augmented: it is derived from the target and describes its layout, so cropping or flipping
    it would teach the model that the layout it asks for need not be followed. Crops from the
    caption steps are usually stored already resized to the token budget, so the noise's sigma
    holds at the encoder's input; a larger stored image averages part of it away when resized.
    """
    parts: list[str | Image.Image] = []
    changed = False
    references = iter(prompt.image_paths)
    for part in prompt.parts:
        if isinstance(part, Image.Image) and next(references) != CONTROL_NAME and rng.random() < probability:
            part, _ = augment_image(part, rng, kinds)
            changed = True
        parts.append(part)
    return MultimodalPrompt(parts, max_images=None) if changed else prompt


# -- shards and their index -----------------------------------------------------------------

Members = tuple[tuple[str, int, int], ...]  # (field, data offset, size) of each tar member


def expand_shards(patterns: Sequence[str]) -> list[Path]:
    """Every file the patterns match, sorted; a pattern that matches no file is an error, since a
    typo would otherwise silently train on part of the data."""
    return sorted(_matches(patterns))


def _matches(patterns: Sequence[str]) -> dict[Path, int]:
    """Every file the patterns match -> the first pattern matching it (see `expand_shards`)."""
    found: dict[Path, int] = {}
    unmatched = []
    for number, pattern in enumerate(patterns):
        expanded = os.path.expanduser(pattern)
        # A file that exists is taken as named, even if its name holds glob characters like "[".
        names = [expanded] if os.path.isfile(expanded) else glob.glob(expanded, recursive=True)
        matches = [Path(os.path.abspath(name)) for name in names]
        matches = [path for path in matches if path.is_file()]
        if not matches:
            unmatched.append(pattern)
        for path in matches:
            found.setdefault(path, number)
    if unmatched:
        raise ValueError(f"no shard file matches {', '.join(map(repr, unmatched))}")
    return found


class _Scanned(NamedTuple):
    key: str
    start: int  # offset of the sample's first header (extended headers included)
    end: int  # end of its last member's data
    members: Members


def _scan_shard(path: Path) -> tuple[list[_Scanned], int, str | None]:
    """(samples, file size, what is damaged or None) of a shard, from its tar headers only.

    Groups members as `read_shard` does. A damaged shard keeps the samples before the damage and
    drops the one in progress; unlike `read_shard`, a shard cut inside a header or at a member
    boundary counts as damaged too.
    """
    samples: list[_Scanned] = []
    key: str | None = None
    start = end = size = 0
    members: list[tuple[str, int, int]] = []
    try:
        size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, dot, field = member.name.rsplit("/", 1)[-1].partition(".")
                if not dot:
                    continue
                if member_key != key:
                    if key is not None:
                        samples.append(_Scanned(key, start, end, tuple(members)))
                    key, start, members = member_key, member.offset, []
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                members.append((sys.intern(field), member.offset_data, member.size))
                end = member.offset_data + member.size
            # tarfile takes a header cut short, or garbage where a header should be, for the end
            # of the archive (and so does `read_shard`); a real end is zeros (no header starts
            # with a zero byte, so even a cut-short end block means nothing is missing).
            tar.fileobj.seek(tar.offset)
            block = tar.fileobj.read(tarfile.BLOCKSIZE)
            if not block or block.count(0) != len(block):
                raise tarfile.ReadError(f"no end-of-archive block at offset {tar.offset}: truncated or damaged")
    except (tarfile.TarError, OSError, EOFError) as err:
        last = samples[-1].key if samples else None
        return samples, size, f"after sample {last!r} ({type(err).__name__}: {err})"
    if key is not None:
        samples.append(_Scanned(key, start, end, tuple(members)))
    return samples, size, None


def index_shard(path: Path, skipped: Skipped) -> list[tuple[str, Members]]:
    """(key, members) of each sample of a shard, from its tar headers only; a damaged shard keeps
    the samples before the damage and is counted in `skipped` as "damaged_shard"."""
    samples, _, damaged = _scan_shard(Path(path))
    if damaged is not None:
        skipped.add("damaged_shard", str(path), damaged)
    return [(sample.key, sample.members) for sample in samples]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (an 8-byte little-endian length, then a JSON header)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


class ShardIndex:
    """Every sample of a list of shards as flat arrays, in shard order then file order.

    Entry i is the key `key(i)` in shard `shard_of(i)`, its members in bytes
    [start[i], start[i] + span[i]) of the file. `shards[s]` describes shard s:
    {"size": bytes, "samples": entries kept, "damaged": what is damaged, or None}.
    """

    def __init__(self, paths: Sequence[Path], shards: list[dict], start: np.ndarray, span: np.ndarray,
                 key_bytes: np.ndarray, key_lengths: np.ndarray):
        self.paths = list(paths)
        self.shards = shards
        self.start = start
        self.span = span
        self._key_bytes = key_bytes
        self._key_offsets = np.concatenate([[0], np.cumsum(key_lengths, dtype=np.int64)])
        self._shard_offsets = np.concatenate([[0], np.cumsum([s["samples"] for s in shards], dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.start)

    def key(self, index: int) -> str:
        return self._key_bytes[self._key_offsets[index] : self._key_offsets[index + 1]].tobytes().decode()

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self._shard_offsets, index, side="right")) - 1

    def digest(self) -> str:
        """Identifies the index a data state was taken on: shard names and keys, in order."""
        # The sha256 of "\n".join(f"{shard name}/{key}"), streamed: the digest saved data states
        # carry, so they keep loading.
        listing, separator = hashlib.sha256(), b""
        for shard, path in enumerate(self.paths):
            for index in range(self._shard_offsets[shard], self._shard_offsets[shard + 1]):
                listing.update(separator + f"{path.name}/{self.key(index)}".encode())
                separator = b"\n"
        return listing.hexdigest()[:16]


def _listing_digest(paths: Sequence[Path]) -> str:
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:16]


def _index_part(paths: Sequence[Path], shard_ids: Sequence[int]) -> bytes:
    """Index the shards `shard_ids` of `paths`: safetensors bytes that `_merge_parts` reads."""
    starts: list[int] = []
    spans: list[int] = []
    keys: list[bytes] = []
    shards = []
    for shard in shard_ids:
        samples, size, damaged = _scan_shard(paths[shard])
        shards.append({"shard": shard, "size": size, "samples": len(samples), "damaged": damaged})
        for sample in samples:
            starts.append(sample.start)
            spans.append(sample.end - sample.start)
            keys.append(sample.key.encode())
    tensors = {
        "start": np.asarray(starts, dtype=np.int64),
        "span": np.asarray(spans, dtype=np.int64),
        "key_lengths": np.asarray([len(key) for key in keys], dtype=np.int64),
        "key_bytes": np.frombuffer(b"".join(keys), dtype=np.uint8),
    }
    return numpy_save(tensors, metadata={"listing": _listing_digest(paths), "shards": json.dumps(shards)})


def _merge_parts(paths: Sequence[Path], parts: Sequence[bytes]) -> ShardIndex:
    """One index from parts that together cover every shard once, in shard order."""
    listing = _listing_digest(paths)
    found: dict[int, tuple] = {}  # shard -> (info, start, span, key lengths, key bytes)
    for rank, data in enumerate(parts):
        metadata = _safetensors_metadata(data)
        if metadata.get("listing") != listing:
            raise ValueError(
                f"rank {rank} found other shard files than this rank ({len(paths)} files): every rank "
                "must see the same files under the same paths"
            )
        arrays = numpy_load(data)
        sample, key_byte = 0, 0
        for info in json.loads(metadata["shards"]):
            count = info.pop("samples")
            lengths = arrays["key_lengths"][sample : sample + count]
            length = int(lengths.sum())
            found[info.pop("shard")] = (
                {**info, "samples": count},
                arrays["start"][sample : sample + count],
                arrays["span"][sample : sample + count],
                lengths,
                arrays["key_bytes"][key_byte : key_byte + length],
            )
            sample, key_byte = sample + count, key_byte + length
    missing = sorted(set(range(len(paths))) - set(found))
    if missing:
        raise ValueError(f"no rank indexed shard(s) {[str(paths[i]) for i in missing[:3]]}")
    ordered = [found[shard] for shard in range(len(paths))]

    def join(column: int, dtype: type) -> np.ndarray:
        return np.concatenate([np.zeros(0, dtype), *(part[column] for part in ordered)])

    return ShardIndex(paths, [part[0] for part in ordered], join(1, np.int64), join(2, np.int64),
                      join(4, np.uint8), join(3, np.int64))


def build_index(paths: Sequence[Path], rank: int = 0, world_size: int = 1, gather: Gather | None = None) -> ShardIndex:
    """The index of `paths`. With `gather` (collective: every rank calls it), rank r reads the
    headers of shards r, r+W, ... only and the ranks exchange their parts; without it, this
    process reads them all. Both give the same index."""
    paths = list(paths)
    if gather is None or world_size == 1:
        return _merge_parts(paths, [_index_part(paths, range(len(paths)))])
    parts = gather(_index_part(paths, range(rank, len(paths), world_size)))
    if len(parts) != world_size:
        raise ValueError(f"gather returned {len(parts)} parts for {world_size} ranks")
    return _merge_parts(paths, parts)


def _read_sample(path: str | Path, key: str, start: int, span: int) -> Sample:
    """The members of one sample: one read of its byte range, parsed as tar."""
    with open(path, "rb") as file:
        file.seek(start)
        data = file.read(span)
    if len(data) != span:
        raise OSError(f"sample {key!r} is truncated (shard changed since indexing?)")
    sample: Sample = {}
    # The range ends with the last member's data: add its block padding and an end-of-archive
    # block, which tarfile expects.
    archive = data + bytes(-len(data) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for member in tar:
                member_key, dot, field = member.name.rsplit("/", 1)[-1].partition(".")
                if member.isfile() and dot and member_key == key:
                    sample[field] = data[member.offset_data : member.offset_data + member.size]
    except tarfile.TarError as err:
        raise OSError(f"sample {key!r}: tar headers unreadable (shard changed since indexing?): {err}") from err
    return sample


@dataclass(frozen=True)
class _Bad:
    reason: str
    where: str  # "shard:key"
    detail: str


def _decode(config: DataConfig, sample: Sample, key: str, where: str, epoch: int, index: int,
            pixels: bool = False) -> TrainingSample | _Bad:
    """The training sample of one record in one epoch, or why it is unusable. Pure. With
    `pixels`, its target is left as uint8 pixels (`target_pixels`), 4x less to pass around."""
    try:
        meta = sample_json(sample, key)
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
            raise ShardError(f"sample {key!r}: its json has no 'prompt' string")
        field = next((name for name in TARGET_FIELDS if name in sample), None)
        if field is None:
            raise ShardError(f"sample {key!r} has no target image ({' or '.join(TARGET_FIELDS)})")
        target = decode_image(sample[field], f"{key}.{field}")
        prompt = sample_prompt(sample, key, max_images=config.max_images)
    except ImageLoadError as err:
        return _Bad("bad_image", where, str(err))
    except PromptError as err:
        return _Bad("bad_prompt", where, str(err))
    except ShardError as err:
        return _Bad("bad_record", where, str(err))

    rng = sample_rng(config.seed, epoch, key)
    # Dropout is drawn first, so it does not depend on how many images the prompt has.
    dropped = rng.random() < config.conditioning_dropout
    if dropped:
        # Exactly the unconditional branch `MUMUPipeline.__call__` encodes for guidance (the
        # empty prompt, through the same `encoder_inputs`), so guidance contrasts the prompt
        # with what the model learned for "no conditioning".
        prompt = MultimodalPrompt()
    else:
        prompt = augment_prompt(prompt, rng, config.augment_probability, config.augmentations)
    # Targets are never augmented (and cached latents rely on it).
    target = target_pixels(target, config.resolution) if pixels else target_tensor(target, config.resolution)
    return TrainingSample(key, target, prompt, dropped, epoch, index)


def _load_entry(config: DataConfig, path: str | Path, key: str, start: int, span: int, epoch: int,
                index: int, pixels: bool = False) -> TrainingSample | _Bad:
    where = f"{Path(path).name}:{key}"
    try:
        sample = _read_sample(path, key, start, span)
    except OSError as err:
        return _Bad("unreadable_sample", where, f"{type(err).__name__}: {err}")
    return _decode(config, sample, key, where, epoch, index, pixels)


# -- the stream ----------------------------------------------------------------------------


class ShardStream:
    """Deterministic, resumable stream of training samples over shards, split across ranks.

    Iterating is endless (epoch after epoch) and continues from the current state, so call
    `load_state_dict` before iterating and keep one iterator at a time. `state_dict()` taken
    after n samples came out describes exactly the stream from sample n+1 on; `batches` does
    not read ahead, so a state taken between batches resumes at the next batch.

    `prefetch` > 0 decodes that many samples ahead in threads (PIL releases the GIL while
    decoding and resizing). Results are consumed in order, so the stream and its state are
    the same with or without it. For worker processes, use `make_loader`.

    `gather` (collective, see the module docstring) splits indexing between the ranks and makes
    `data_report` / `check_bad_fraction` add up what every rank found; with it, every rank must
    construct the stream and call those two methods at the same points.
    """

    def __init__(self, config: DataConfig, rank: int = 0, world_size: int = 1, *, prefetch: int = 0,
                 gather: Gather | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.gather = gather
        self.skipped = Skipped()
        matches = _matches(config.shards)
        self.shards = sorted(matches)
        # Per shard file, its pattern's weight (a file matched by several: the first pattern's).
        self._weights = [config.shard_weights[matches[path]] for path in self.shards] if config.shard_weights else None
        self.index = build_index(self.shards, rank, world_size, gather)
        for path, info in zip(self.shards, self.index.shards):
            if info["damaged"] is not None:
                self.skipped.add("damaged_shard", str(path), info["damaged"])
        if len(self.index) < world_size:
            raise ValueError(
                f"{len(self.index)} samples in the {len(self.shards)} shard(s) matching "
                f"{', '.join(map(repr, config.shards))}, fewer than the {world_size} ranks "
                f"(skipped: {self.skipped.as_dict()['by_reason']})"
            )
        self._dataset = self.index.digest()
        self._bad: dict[int, _Bad] = {}  # entry -> why it is unusable in every epoch (found so far)
        self._unusable: dict[int, _Bad] = {}  # + those whose prompt holds a reserved token
        self._read = 0  # slots this rank consumed, for the report
        self._order: tuple[int, list[int]] | None = None  # (epoch, this rank's entries) cache
        self._epoch = 0
        self._position = 0

    @property
    def num_samples(self) -> int:
        """Samples indexed over all ranks (bad ones included; they are found when read)."""
        return len(self.index)

    @property
    def samples_per_epoch(self) -> int:
        """Slots of this rank's share of the current epoch (ranks differ by at most one; with
        fractional `shard_weights` epochs differ a little in length)."""
        return len(self._rank_order(self._epoch))

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.config.seed,
            "num_samples": len(self.index),
            "dataset": self._dataset,
            "shard_weights": list(self.config.shard_weights),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.config.seed,
            "num_samples": len(self.index),
            "dataset": self._dataset,
            "shard_weights": list(self.config.shard_weights),
        }
        # Older states have no weights: they were unweighted.
        state = {"shard_weights": [], **state}
        # A state from another rank, seed, world size or dataset names other samples: resuming
        # from it would silently repeat some samples and never show others.
        mismatched = {name: (state.get(name), value) for name, value in expected.items() if state.get(name) != value}
        if mismatched:
            details = ", ".join(f"{name}: state has {got!r}, stream has {want!r}" for name, (got, want) in mismatched.items())
            raise ValueError(f"data state does not belong to this stream ({details})")
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"data state: epoch must be an int >= 0, got {epoch!r}")
        slots = len(self._rank_order(epoch))
        if not isinstance(position, int) or not 0 <= position <= slots:
            raise ValueError(f"data state: position must be an int in [0, {slots}], got {position!r}")
        self._epoch, self._position = epoch, position

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TrainingSample]:
        epoch, yielded = None, 0
        for slot_epoch, position, index, result in self._loaded(self._slots()):
            if slot_epoch != epoch:
                if epoch is not None and yielded == 0:
                    self._check_usable()  # a whole epoch (of this rank) without a usable sample
                epoch, yielded = slot_epoch, 0
            self._epoch, self._position = slot_epoch, position + 1
            self._read += 1
            if isinstance(result, _Bad):
                self._record_bad(index, result)
                continue
            yielded += 1
            yield result

    def _rank_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.index)))
            if self._weights is not None:
                draw = _rng(self.config.seed, "weights", epoch)
                visits = []
                for index in order:
                    weight = self._weights[self.index.shard_of(index)]
                    visits += [index] * (int(weight) + (draw.random() < weight - int(weight)))
                order = visits
            _rng(self.config.seed, "order", epoch).shuffle(order)
            self._order = (epoch, order[self.rank :: self.world_size])
        return self._order[1]

    def _slots(self) -> Iterator[tuple[int, int, int]]:
        """(epoch, position, entry index) of every slot from the current state on."""
        epoch, start = self._epoch, self._position
        while True:
            order = self._rank_order(epoch)
            for position in range(start, len(order)):
                yield epoch, position, order[position]
            epoch, start = epoch + 1, 0

    def _loaded(self, slots: Iterator[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, TrainingSample | _Bad]]:
        """The slots with their loaded samples, in order; loaded ahead in threads with prefetch."""
        if not self.prefetch:
            for epoch, position, index in slots:
                yield epoch, position, index, self._load(epoch, index)
            return
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="mumu-data") as pool:
            pending: deque = deque()
            try:
                for epoch, position, index in slots:
                    pending.append((epoch, position, index, pool.submit(self._load, epoch, index)))
                    if len(pending) > 2 * self.prefetch:
                        epoch, position, index, future = pending.popleft()
                        yield epoch, position, index, future.result()
            finally:  # the consumer stopped: do not decode what nobody will read
                for *_, future in pending:
                    future.cancel()

    def _entry(self, index: int) -> tuple[int, str, int, int]:
        """(shard, key, start, span) of an entry."""
        return self.index.shard_of(index), self.index.key(index), int(self.index.start[index]), int(self.index.span[index])

    def _load(self, epoch: int, index: int) -> TrainingSample | _Bad:
        """The sample of one slot, or why it is unusable. Pure: the same for the same arguments."""
        if index in self._bad:
            return self._bad[index]
        shard, key, start, span = self._entry(index)
        return _load_entry(self.config, self.shards[shard], key, start, span, epoch, index)

    def _where(self, index: int) -> str:
        return f"{self.shards[self.index.shard_of(index)].name}:{self.index.key(index)}"

    def _record_bad(self, index: int, bad: _Bad, permanent: bool = True) -> None:
        """Note an unusable entry; counted once however often it comes up. Not `permanent` (a
        reserved token in the prompt): usable in an epoch that drops its prompt."""
        if permanent:
            self._bad.setdefault(index, bad)
        if index not in self._unusable:
            self._unusable[index] = bad
            self.skipped.add(bad.reason, bad.where, bad.detail)

    def _check_usable(self) -> None:
        """Raise if no sample is usable; reads the unknown ones until one is (normally the first)."""
        for index in range(len(self.index)):
            result = self._load(0, index)
            if not isinstance(result, _Bad):
                return
            self._record_bad(index, result)
        raise BadData(
            f"none of the {len(self.index)} samples in {', '.join(map(repr, self.config.shards))} is usable "
            f"(skipped: {dict(self.skipped.counts)}; e.g. {self.skipped.examples})"
        )

    # -- bad data report ----------------------------------------------------------------------

    def estimated_lost(self) -> dict[int, int]:
        """shard -> samples taken to be lost after its damage (the rule of the module docstring)."""
        intact = [info["samples"] for info in self.index.shards if info["damaged"] is None and info["samples"]]
        reference = statistics.median(intact) if intact else None
        lost = {}
        for shard, info in enumerate(self.index.shards):
            if info["damaged"] is not None:
                kept = info["samples"]
                lost[shard] = max(1, round(reference) - kept) if reference is not None else max(1, kept)
        return lost

    def _found_by_all(self, examples: int) -> tuple[int, dict[int, str], dict[str, dict[int, str]]]:
        """(slots read, entry -> reason of every unusable entry, reason -> {entry: text} of the
        first `examples` per reason) over all ranks; collective with `gather`."""
        # What this rank found: entry indices by reason (ranks may find the same entry in different
        # epochs), and the text of the first few, which are the first few of the union too.
        found: dict[str, list[int]] = {}
        for index, bad in sorted(self._unusable.items()):
            found.setdefault(bad.reason, []).append(index)
        texts = {reason: [[i, f"{self._unusable[i].where}: {self._unusable[i].detail}"] for i in indices[:examples]]
                 for reason, indices in found.items()}
        part = json.dumps({"read": self._read, "found": found, "examples": texts}).encode()
        parts = self.gather(part) if self.gather is not None and self.world_size > 1 else [part]
        read, unusable, candidates = 0, {}, {}
        for blob in parts:
            loaded = json.loads(blob)
            read += loaded["read"]
            for reason, indices in loaded["found"].items():
                unusable.update(dict.fromkeys(indices, reason))
                candidates.setdefault(reason, {}).update(dict(loaded["examples"][reason]))
        return read, unusable, candidates

    def found_state(self, examples: int = 3) -> dict:
        """What all ranks found unusable so far, merged, for a checkpoint (JSON-able): the slots
        read, the unusable entries by reason and the text of the first few. Collective with
        `gather`, like `data_report`. `load_found_state` on a fresh stream over the same data (any
        rank of any world size) restores it, so the figures and `check_bad_fraction` cover the
        whole run across restarts, not the steps since the last one."""
        read, unusable, candidates = self._found_by_all(examples)
        found: dict[str, list[int]] = {}
        for index, reason in sorted(unusable.items()):
            found.setdefault(reason, []).append(index)
        texts = {reason: sorted(entries.items())[:examples] for reason, entries in candidates.items()}
        return {"dataset": self._dataset, "read": read, "found": found, "examples": texts}

    def load_found_state(self, state: dict) -> None:
        """Count what `found_state` recorded as found by this stream (its slots read go to rank 0,
        so the ranks' sum stays the run's)."""
        if state.get("dataset") != self._dataset:
            raise ValueError(f"bad-data state is of another dataset ({state.get('dataset')!r}, this stream "
                             f"reads {self._dataset!r})")
        for reason, indices in state["found"].items():
            texts = {int(index): text for index, text in state["examples"].get(reason, [])}
            for index in indices:
                if not isinstance(index, int) or not 0 <= index < len(self.index):
                    raise ValueError(f"bad-data state: entry {index!r} is not one of the {len(self.index)} indexed")
                where = self._where(index)
                detail = texts.get(index, f"{where}: found before the run resumed").removeprefix(f"{where}: ")
                self._record_bad(index, _Bad(reason, where, detail), permanent=reason != "reserved_token")
        if self.rank == 0:
            self._read += int(state["read"])

    def data_report(self, examples: int = 3) -> dict:
        """What is unusable in the data, for the log (JSON-able):

        {"samples_indexed", "shards", "damaged_shards", "estimated_lost" (in damaged shards),
        "samples_read" (slots consumed), "unusable_samples" (distinct, found so far),
        "unreadable_fraction", "by_reason": {reason: {"count", "examples" (up to `examples`)}},
        "worst_shards": [{"shard" (path), "unusable", "estimated_lost", "damaged", "reasons"}] (up to 5)}

        Collective with `gather`: every rank calls it, and all get the figures of all ranks.
        """
        read, unusable, candidates = self._found_by_all(examples)
        by_reason: dict[str, dict] = {}
        per_shard: dict[int, Counter] = {}
        for index, reason in unusable.items():
            by_reason.setdefault(reason, {"count": 0, "examples": []})["count"] += 1
            per_shard.setdefault(self.index.shard_of(index), Counter())[reason] += 1
        for reason, entry in by_reason.items():
            entry["examples"] = [text for _, text in sorted(candidates[reason].items())[:examples]]
        lost = self.estimated_lost()
        if lost:
            by_reason["damaged_shard"] = {
                "count": len(lost),
                "examples": [f"{self.shards[s]}: {self.index.shards[s]['damaged']}" for s in sorted(lost)[:examples]],
            }
        worst = []
        for shard in set(per_shard) | set(lost):
            reasons = per_shard.get(shard, Counter())
            worst.append({
                "shard": str(self.shards[shard]),
                "unusable": sum(reasons.values()),
                "estimated_lost": lost.get(shard, 0),
                "damaged": self.index.shards[shard]["damaged"],
                "reasons": dict(sorted(reasons.items())),
            })
        worst.sort(key=lambda item: (-(item["unusable"] + item["estimated_lost"]), item["shard"]))
        total_lost = sum(lost.values())
        return {
            "samples_indexed": len(self.index),
            "shards": len(self.shards),
            "damaged_shards": len(lost),
            "estimated_lost": total_lost,
            "samples_read": read,
            "unusable_samples": len(unusable),
            "unreadable_fraction": (total_lost + len(unusable)) / (len(self.index) + total_lost),
            "by_reason": dict(sorted(by_reason.items())),
            "worst_shards": worst[:5],
        }

    def check_bad_fraction(self, max_fraction: float = 0.01) -> dict:
        """`data_report()`, or `BadData` naming the worst shards when its unreadable fraction
        exceeds `max_fraction`. Collective with `gather`, like `data_report`, so all ranks stop
        together."""
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
        report = self.data_report()
        if report["unreadable_fraction"] <= max_fraction:
            return report
        named = []
        for shard in report["worst_shards"]:
            what = []
            if shard["damaged"] is not None:
                what.append(f"damaged {shard['damaged']}, about {shard['estimated_lost']} sample(s) lost")
            if shard["unusable"]:
                reasons = ", ".join(f"{reason} {count}" for reason, count in shard["reasons"].items())
                what.append(f"{shard['unusable']} unusable sample(s): {reasons}")
            named.append(f"{shard['shard']} ({'; '.join(what)})")
        raise BadData(
            f"{report['unreadable_fraction']:.2%} of the training data is unreadable, more than "
            f"max_bad_fraction={max_fraction:g} ({report['unusable_samples']} unusable of {report['samples_indexed']} "
            f"samples indexed, {report['samples_read']} read so far; about {report['estimated_lost']} more lost in "
            f"{report['damaged_shards']} damaged shard(s)). Worst: {'; '.join(named)}. Repair or remove these "
            f"shards, or raise max_bad_fraction"
        )


# -- batches -------------------------------------------------------------------------------


def collate(samples: list[TrainingSample], processor) -> dict:
    """{"pixel_values": [B,3,R,R], "encoder_inputs": encoder_inputs(processor, prompts) (a dict
    of tensors, for `pipeline.encode_inputs`), "keys": [...], "dropped": BoolTensor[B]}"""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    return {
        "pixel_values": torch.stack([sample.target for sample in samples]),
        "encoder_inputs": dict(encoder_inputs(processor, [sample.prompt for sample in samples])),
        "keys": [sample.key for sample in samples],
        "dropped": torch.tensor([sample.dropped for sample in samples], dtype=torch.bool),
    }


def _reserved_token_in(sample: TrainingSample, reserved: list[str]) -> str | None:
    text = sample.prompt.text_with_placeholders("")
    return next((token for token in reserved if token in text), None)


def batches(stream: ShardStream, processor, batch_size: int) -> Iterator[dict]:
    """Collated batches of `batch_size` samples, endlessly, decoded in this process.

    A prompt whose text holds one of the encoder's reserved tokens (e.g. a literal "<image>")
    would make `encoder_inputs` fail the whole batch; such samples are skipped and counted in
    `stream.skipped` as "reserved_token" (once per sample). Nothing is read ahead: a
    `stream.state_dict()` taken after a batch came out resumes at the next batch.
    `make_loader` gives the same batches, decoded in worker processes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reserved = reserved_tokens(processor)
    batch: list[TrainingSample] = []
    for sample in stream:
        token = _reserved_token_in(sample, reserved)
        if token is not None:
            bad = _Bad("reserved_token", stream._where(sample.index), f"prompt text contains {token!r}")
            stream._record_bad(sample.index, bad, permanent=False)
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch, processor)
            batch = []


def merge_encoder_inputs(inputs: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch `encoder_inputs` makes of several prompts, from each prompt's own
    `encoder_inputs`: tokens right-padded with the pad token (mask 0), and images padded with
    all-zero images (mask 0), as the Idefics2 processor pads a batch (the loader's test checks
    it against `collate`)."""
    known = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    for one in inputs:
        unknown = set(one) - set(known)
        if unknown:
            raise ValueError(f"cannot merge encoder inputs with {sorted(unknown)}: only {list(known)}")
    size = len(inputs)
    length = max(one["input_ids"].shape[1] for one in inputs)
    merged = {
        "input_ids": torch.full((size, length), pad_token_id, dtype=inputs[0]["input_ids"].dtype),
        "attention_mask": torch.zeros((size, length), dtype=inputs[0]["attention_mask"].dtype),
    }
    for row, one in enumerate(inputs):
        merged["input_ids"][row, : one["input_ids"].shape[1]] = one["input_ids"][0]
        merged["attention_mask"][row, : one["attention_mask"].shape[1]] = one["attention_mask"][0]
    with_images = [one for one in inputs if "pixel_values" in one]
    if with_images:
        first = with_images[0]
        count, channels = max(one["pixel_values"].shape[1] for one in with_images), first["pixel_values"].shape[2]
        height = max(one["pixel_values"].shape[3] for one in with_images)
        width = max(one["pixel_values"].shape[4] for one in with_images)
        pixels = torch.zeros((size, count, channels, height, width), dtype=first["pixel_values"].dtype)
        mask = torch.zeros((size, count, height, width), dtype=first["pixel_attention_mask"].dtype)
        for row, one in enumerate(inputs):
            if "pixel_values" in one:
                images, _, h, w = one["pixel_values"].shape[1:]
                pixels[row, :images, :, :h, :w] = one["pixel_values"][0]
                mask[row, :images, :h, :w] = one["pixel_attention_mask"][0]
        merged["pixel_values"], merged["pixel_attention_mask"] = pixels, mask
    return merged


# -- the loader: worker processes ------------------------------------------------------------


class _Slot(NamedTuple):
    epoch: int
    position: int
    index: int
    shard: int
    key: str
    start: int
    span: int
    known: _Bad | None  # already known to be unusable in every epoch: not read again


@dataclass
class _Encoded:
    """A usable sample as a worker returns it: what `collate` needs, the prompt already encoded.

    Few tensors cross between processes: each one is a shared-memory file and a file descriptor
    passed over a socket, which costs more than a tiny sample's decoding. So a chunk's targets
    travel stacked in one tensor (`row` of it) as uint8 pixels (4x less memory to map than
    floats; the main process converts the batch), and the small encoder inputs as numpy arrays,
    pickled inline.
    """

    key: str
    row: int  # of the chunk's targets
    dropped: bool
    inputs: dict[str, np.ndarray]  # encoder_inputs(processor, [prompt]): batch of one


def _as_is(chunk):
    return chunk  # DataLoader's collate_fn: the main process assembles the batches itself


class _ChunkDecoder(torch.utils.data.Dataset):
    """What a worker runs: the slots of one chunk, read, decoded, augmented and encoded."""

    def __init__(self, config: DataConfig, shards: Sequence[Path], processor):
        self.config = config
        self.shards = [str(path) for path in shards]
        self.processor = processor
        self.reserved = reserved_tokens(processor)

    def __getitem__(self, chunk: tuple[_Slot, ...]) -> tuple[list[tuple[_Slot, _Encoded | _Bad]], torch.Tensor | None]:
        """((slot, result) for each slot, the usable samples' targets stacked or None)."""
        results: list[tuple[_Slot, _Encoded | _Bad]] = []
        targets = []
        for slot in chunk:
            path = self.shards[slot.shard]
            result = slot.known or _load_entry(self.config, path, slot.key, slot.start, slot.span, slot.epoch,
                                               slot.index, pixels=True)
            if isinstance(result, TrainingSample):
                token = _reserved_token_in(result, self.reserved)
                if token is None:
                    inputs = {name: value.numpy() for name, value in encoder_inputs(self.processor, [result.prompt]).items()}
                    targets.append(result.target)
                    result = _Encoded(result.key, len(targets) - 1, result.dropped, inputs)
                else:
                    result = _Bad("reserved_token", f"{Path(path).name}:{slot.key}", f"prompt text contains {token!r}")
            results.append((slot, result))
        return results, torch.stack(targets) if targets else None


class _Chunks:
    """The sampler: chunks of consecutive slots from (epoch, position) on, never across an
    epoch's end. Runs in the main process, so it can skip reading entries known to be bad."""

    def __init__(self, stream: ShardStream, epoch: int, position: int, size: int):
        self.stream, self.epoch, self.position, self.size = stream, epoch, position, size

    def __iter__(self) -> Iterator[tuple[_Slot, ...]]:
        stream, epoch, start = self.stream, self.epoch, self.position
        while True:
            order = stream._rank_order(epoch)
            for first in range(start, len(order), self.size):
                indices = order[first : first + self.size]
                yield tuple(_Slot(epoch, first + i, index, *stream._entry(index), stream._bad.get(index))
                            for i, index in enumerate(indices))
            epoch, start = epoch + 1, 0


def _worker_context(name: str) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(name)
    if name == "forkserver":
        # The server imports this module (torch, transformers, PIL) once; each worker is a fork
        # of it. No effect if the server already runs.
        context.set_forkserver_preload([__name__])
    return context


class TrainingLoader:
    """Collated batches (the dict of `collate`) from a `ShardStream`, endlessly, decoded by
    `num_workers` worker processes (0: in this process), `prefetch_factor` chunks ahead each.

    The same batches as `batches(stream, processor, batch_size)` for any `num_workers`.
    `state_dict()` between batches (also `loader.stream.state_dict()`) resumes exactly at the
    next batch: nothing the workers decoded ahead counts as consumed. Call `load_state_dict`
    before iterating; it stops a running iteration. `close()` stops the workers.
    """

    def __init__(self, stream: ShardStream, processor, batch_size: int, *, num_workers: int = 0,
                 prefetch_factor: int = 2, multiprocessing_context: str = "forkserver"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
        if multiprocessing_context not in ("forkserver", "spawn"):
            raise ValueError(f"multiprocessing_context must be 'forkserver' or 'spawn' (fork is unsafe in a "
                             f"trainer with threads), got {multiprocessing_context!r}")
        self.stream = stream
        self.processor = processor
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._pad_token_id = processor.tokenizer.pad_token_id
        self._decoder = _ChunkDecoder(stream.config, stream.shards, processor)
        self._running: Iterator[dict] | None = None

    @property
    def skipped(self) -> Skipped:
        return self.stream.skipped

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)

    def data_report(self, examples: int = 3) -> dict:
        return self.stream.data_report(examples)

    def check_bad_fraction(self, max_fraction: float = 0.01) -> dict:
        return self.stream.check_bad_fraction(max_fraction)

    def close(self) -> None:
        """Stop the running iteration and its workers."""
        if self._running is not None:
            self._running.close()
            self._running = None

    def __iter__(self) -> Iterator[dict]:
        self.close()
        self._running = self._batches()
        return self._running

    def _batches(self) -> Iterator[dict]:
        stream = self.stream
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self._decoder,
            batch_size=None,
            sampler=_Chunks(stream, stream._epoch, stream._position, self.batch_size),
            num_workers=workers,
            collate_fn=_as_is,
            prefetch_factor=self.prefetch_factor if workers else None,
            multiprocessing_context=_worker_context(self.multiprocessing_context) if workers else None,
        )
        pending: list[tuple[_Encoded, torch.Tensor]] = []
        epoch, usable = None, 0
        chunks = iter(loader)
        try:
            for chunk, targets in chunks:
                for slot, result in chunk:
                    if slot.epoch != epoch:
                        if epoch is not None and usable == 0:
                            stream._check_usable()  # a whole epoch (of this rank) without a usable sample
                        epoch, usable = slot.epoch, 0
                    stream._read += 1
                    if isinstance(result, _Bad):
                        stream._record_bad(slot.index, result, permanent=result.reason != "reserved_token")
                        continue
                    usable += 1
                    pending.append((result, targets[result.row]))
                    if len(pending) == self.batch_size:
                        stream._epoch, stream._position = slot.epoch, slot.position + 1
                        batch, pending = self._collate(pending), []
                        yield batch
        finally:
            del chunks  # shuts the workers down

    def _collate(self, samples: list[tuple[_Encoded, torch.Tensor]]) -> dict:
        inputs = [{name: torch.from_numpy(value) for name, value in sample.inputs.items()} for sample, _ in samples]
        return {
            "pixel_values": pixels_to_unit(torch.stack([target for _, target in samples])),
            "encoder_inputs": merge_encoder_inputs(inputs, self._pad_token_id),
            "keys": [sample.key for sample, _ in samples],
            "dropped": torch.tensor([sample.dropped for sample, _ in samples], dtype=torch.bool),
        }


def make_loader(config: DataConfig, processor, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, prefetch_factor: int = 2, *, gather: Gather | None = None,
                multiprocessing_context: str = "forkserver") -> TrainingLoader:
    """This rank's `TrainingLoader` over `config.shards` (see `ShardStream` for `gather`)."""
    stream = ShardStream(config, rank, world_size, gather=gather)
    return TrainingLoader(stream, processor, batch_size, num_workers=num_workers, prefetch_factor=prefetch_factor,
                          multiprocessing_context=multiprocessing_context)


# -- another world size --------------------------------------------------------------------


def global_data_position(states: Sequence[dict]) -> tuple[int, int, bool]:
    """(epoch, g, exact): the W ranks whose states these are (in rank order) consumed the slots
    [0, g) of that epoch's permutation; exact when they consumed nothing else.

    Rank r at position p consumed the slots r, r+W, ..., r+(p-1)W. A rank at the end of its
    share counts as at the start of the next epoch. When the ranks disagree (one skipped more
    bad samples than another, so it read further), g is the longest prefix all of them covered
    and exact is False: resuming at g serves again the few samples read beyond it.
    """
    if not states:
        raise ValueError("no data states to reshard")
    world = len(states)
    first = states[0]
    total = first.get("num_samples")
    if not isinstance(total, int) or total < world:
        raise ValueError(f"data states: num_samples must be an int >= {world}, got {total!r}")
    for rank, state in enumerate(states):
        if state.get("rank") != rank or state.get("world_size") != world:
            raise ValueError(f"data state {rank} is rank {state.get('rank')!r} of {state.get('world_size')!r}, "
                             f"expected rank {rank} of {world}")
        for name in ("seed", "num_samples", "dataset"):
            if state.get(name) != first.get(name):
                raise ValueError(f"data states disagree on {name}: {first.get(name)!r} vs {state.get(name)!r}")
    positions = []
    for rank, state in enumerate(states):
        epoch, position, share = state.get("epoch"), state.get("position"), len(range(rank, total, world))
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) or not 0 <= position <= share:
            raise ValueError(f"data state of rank {rank}: bad epoch/position {epoch!r}/{position!r}")
        positions.append((epoch + 1, 0) if position == share else (epoch, position))
    epoch = min(e for e, _ in positions)
    # A rank already in a later epoch has consumed all of its share of this one.
    consumed = [p if e == epoch else len(range(rank, total, world)) for rank, (e, p) in enumerate(positions)]
    g = min(min(rank + p * world for rank, p in enumerate(consumed)), total)
    exact = all(e == epoch for e, _ in positions) and all(p == len(range(rank, g, world)) for rank, p in enumerate(consumed))
    if g == total:
        return epoch + 1, 0, exact
    return epoch, g, exact


def reshard_states(states: Sequence[dict], rank: int, world_size: int) -> dict:
    """The data state of rank `rank` of `world_size`, from the states of all ranks of another
    world size (in rank order, as checkpoints keep them).

    The ranks take turns through one permutation per epoch, so the position that matters is
    global: `global_data_position` (the prefix of the epoch consumed). When every rank stood at
    the same place (between steps with no bad sample skipped) it is exact, and must divide by
    the new world size: a ValueError says so otherwise (pick a world size that divides it, or
    resume on the old one). When ranks had drifted apart by skipping bad samples, the prefix all
    of them covered is rounded down to a multiple of the new world size: the samples read beyond
    it are served once more, none is lost.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if states and states[0].get("shard_weights"):
        # A weighted epoch's length is not in the states: its slots cannot be recounted here.
        raise ValueError(f"the data states are of a stream with shard_weights {states[0]['shard_weights']}; "
                         f"resume it with {len(states)} process(es), as it was saved")
    epoch, g, exact = global_data_position(states)
    if g % world_size:
        if exact:
            raise ValueError(
                f"the {len(states)} rank(s) consumed {g} samples of epoch {epoch}, not divisible by the new world "
                f"size {world_size}; resume with a world size dividing {g} or with {len(states)} process(es)"
            )
        g -= g % world_size
    return {**states[0], "epoch": epoch, "position": g // world_size, "rank": rank, "world_size": world_size}


# -- latent cache --------------------------------------------------------------------------


@torch.no_grad()
def vae_latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained on: the VAE posterior's mean, shifted and scaled as diffusers does.

    The mean rather than a sample of the posterior: deterministic, hence cacheable, and the
    SDXL VAE's posterior std is tiny next to the diffusion noise. Use this with and without the
    cache so both train on the same latents. Returns the VAE's dtype, on its device.
    """
    latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def vae_fingerprint(vae) -> str:
    """Hash of the VAE's config and weights: latents from another VAE must never be reused."""
    # Keys like `_name_or_path` and `_diffusers_version` say where it was loaded from, not what it is.
    config = {name: value for name, value in vae.config.items() if not name.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENTRY_KEYING = "key@sha256(pixels)"


def entry_name(key: str, pixels: torch.Tensor) -> str:
    """A latent cache entry: the record key and the sha256 of one target's pixel bytes."""
    data = pixels.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return f"{key}@{hashlib.sha256(data).hexdigest()[:32]}"


class LatentCache:
    """On-disk cache of target latents, in shard files of up to `shard_size` latents each.

    An entry is the record key and a hash of the target's pixels as the VAE gets them
    (`entry_name`): data rendered again keeps its keys (synthetic keys come from content and
    style), and a new run must not train on the old images' latents. Hashing costs ~10 ms per
    1024 px target on one core, far less than the VAE pass a hit saves. Targets are never
    augmented, so a key's target (padded, resized to the stream's resolution) is the same every
    epoch and its entry hits from the second epoch on. The folder is `directory/vae-<hash of
    the VAE config and weights>-<dtype>/<resolution>/`; each file holds one tensor "latents"
    [n, C, h, w] and, in its metadata, the n entries and the fingerprint. At start the file
    headers (not the tensors) are read into an entry -> (file, slot) map, about 200 bytes per
    entry in memory.

    A miss goes through the VAE and is kept in memory; every `shard_size` misses become one new
    file, written atomically under a name no other writer uses (`writer` + a random suffix), so
    ranks and restarts may share the folder and never rewrite a file. `flush()` writes what is
    pending (call it at checkpoints and at the end); what a killed process had pending is just
    computed again. A batch with misses first rescans the folder (at most every `rescan_s`
    seconds) for files other ranks wrote. A file that cannot be read is ignored and its latents
    computed again. Latents come back on the CPU in `dtype`: the same tensor on a miss as on any
    later hit in this process.
    """

    def __init__(self, directory: str | os.PathLike, vae, dtype: torch.dtype = torch.float32, *,
                 shard_size: int = 256, writer: str = "0", rescan_s: float = 60.0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not _SAFE_NAME.fullmatch(writer):
            raise ValueError(f"writer must be 1-64 letters, digits, '_' or '-', got {writer!r}")
        self.vae = vae
        self.dtype = dtype
        self.shard_size = shard_size
        self.writer = writer
        self.rescan_s = rescan_s
        self.fingerprint = vae_fingerprint(vae)
        self.directory = Path(directory) / f"vae-{self.fingerprint}-{str(dtype).removeprefix('torch.')}"
        self.hits = 0
        self.misses = 0
        self._where: dict[tuple[int, str], tuple[Path, int]] = {}  # (resolution, key) -> (file, slot)
        self._seen: dict[int, set[str]] = {}  # resolution -> file names already read
        self._scanned_at: dict[int, float] = {}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}  # resolution -> key -> latents not yet written

    def folder(self, resolution: int) -> Path:
        return self.directory / str(resolution)

    def get(self, key: str, pixel_values: torch.Tensor) -> torch.Tensor:
        """Latents [C, R/8, R/8] of one target [3, R, R]."""
        if pixel_values.dim() != 3:
            raise ValueError(f"pixel_values must be [3, R, R], got {list(pixel_values.shape)}")
        return self.get_batch([key], pixel_values[None])[0]

    def get_batch(self, keys: Sequence[str], pixel_values: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, R/8, R/8] of targets [B, 3, R, R]; the misses go through the VAE together."""
        if pixel_values.dim() != 4 or pixel_values.shape[0] != len(keys) or pixel_values.shape[-1] != pixel_values.shape[-2]:
            raise ValueError(f"pixel_values must be [{len(keys)}, 3, R, R], got {list(pixel_values.shape)}")
        resolution = int(pixel_values.shape[-1])
        keys = [entry_name(key, pixels) for key, pixels in zip(keys, pixel_values)]
        if resolution not in self._seen:
            self._scan(resolution)
        found = [self._lookup(resolution, key) for key in keys]
        if any(latents is None for latents in found) and time.monotonic() - self._scanned_at[resolution] >= self.rescan_s:
            self._scan(resolution)
            found = [latents if latents is not None else self._lookup(resolution, key) for key, latents in zip(keys, found)]
        missing = [i for i, latents in enumerate(found) if latents is None]
        if missing:
            rows = list({keys[i]: i for i in reversed(missing)}.values())  # a repeated key is computed once
            computed = vae_latents(self.vae, pixel_values[rows]).to("cpu", self.dtype)
            pending = self._pending.setdefault(resolution, {})
            for row, latents in zip(rows, computed):
                pending[keys[row]] = latents.clone()  # its own storage, not a view of the batch
            for i in missing:
                found[i] = pending[keys[i]]
            if len(pending) >= self.shard_size:
                self._write(resolution)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack(found)

    def flush(self) -> None:
        """Write every pending latent to a new shard file."""
        for resolution in list(self._pending):
            self._write(resolution)

    def _metadata(self, resolution: int) -> dict[str, str]:
        # "entries" names the keying: files of a cache keyed by record key alone are ignored.
        return {"resolution": str(resolution), "vae": self.fingerprint, "dtype": str(self.dtype),
                "entries": ENTRY_KEYING}

    def _scan(self, resolution: int) -> None:
        """Read the headers of the files not seen yet."""
        folder, seen = self.folder(resolution), self._seen.setdefault(resolution, set())
        self._scanned_at[resolution] = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(folder)):
                if name.startswith(".") or not name.endswith(".safetensors") or name in seen:
                    continue  # "." names: temp files of writes in progress
                seen.add(name)
                for slot, key in enumerate(self._file_keys(folder / name, resolution)):
                    self._where.setdefault((resolution, key), (folder / name, slot))

    def _file_keys(self, path: Path, resolution: int) -> list[str]:
        with contextlib.suppress(Exception):  # unreadable, foreign or of another format: ignored
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                if all(metadata.get(name) == value for name, value in self._metadata(resolution).items()):
                    keys = json.loads(metadata["keys"])
                    if isinstance(keys, list) and file.get_slice("latents").get_shape()[0] == len(keys):
                        return [str(key) for key in keys]
        return []

    def _lookup(self, resolution: int, key: str) -> torch.Tensor | None:
        pending = self._pending.get(resolution, {}).get(key)
        if pending is not None:
            return pending
        where = self._where.get((resolution, key))
        if where is None:
            return None
        path, slot = where
        with contextlib.suppress(Exception):
            with safe_open(path, framework="pt") as file:
                return file.get_slice("latents")[slot : slot + 1][0].clone()
        # Damaged since its header was read: forget the whole file, its latents are recomputed.
        self._where = {at: place for at, place in self._where.items() if place[0] != path}
        return None

    def _write(self, resolution: int) -> None:
        pending = self._pending.pop(resolution, {})
        if not pending:
            return
        keys = list(pending)
        latents = torch.stack([pending[key] for key in keys]).contiguous()
        data = safetensors_save({"latents": latents}, metadata={**self._metadata(resolution), "keys": json.dumps(keys)})
        name = f"{self.writer}-{uuid.uuid4().hex[:12]}.safetensors"
        path = write_bytes_atomic(self.folder(resolution) / name, data)
        self._seen.setdefault(resolution, set()).add(name)
        for slot, key in enumerate(keys):
            self._where[(resolution, key)] = (path, slot)
