"""Training data: a deterministic, resumable stream of samples over the caption shards.

Order. The shards (tar paths or glob patterns, expanded and sorted) are indexed once from their
tar headers alone: every sample becomes a (shard, key, member offsets) entry, in shard order
then file order. Epoch e visits all entries in a permutation seeded by (seed, e), and rank r of
W takes entries r, r+W, r+2W, ... of it, so the ranks partition every epoch. A global shuffle,
not shard order + in-shard order, because the data steps write the K styles of one content next
to each other: in-shard order would fill a batch with near-copies of one prompt. Reading a
sample is a seek into its shard, so each rank reads only its own samples.

Randomness. A sample's random decisions (conditioning dropout; which conditioning images are
augmented, and how) come from an rng seeded by (seed, epoch, key) alone, never from a global
rng: they do not depend on the rank, the world size, prefetching or where training resumed.

Resume. The state is (epoch, position): position counts the slots of this rank's share of the
epoch already consumed, bad samples included, so `load_state_dict(state_dict())` on a fresh
stream continues with exactly the next sample. Each rank saves and loads its own state.

Bad data never stops training. A damaged shard contributes the samples before the damage (as
`read_shard` does); a sample without json or target image, with a prompt that does not parse,
or with a corrupt image is skipped wherever it comes up. Each is counted once in
`stream.skipped`. Skipping is a pure function of the data, so the other samples keep their
places and a resumed stream skips the same ones.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
import re
import sys
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from ..atomic import write_bytes_atomic
from ..data.captions import CONTROL_NAME
from ..data.report import Skipped
from ..data.shards import Sample, ShardError, decode_image, sample_json, sample_prompt
from ..encoder import encoder_inputs
from ..images import ImageLoadError, pad_to_square, to_rgb
from ..prompt import MultimodalPrompt, PromptError

# The member holding the target image, in order of preference (as the data steps write it).
TARGET_FIELDS = ("jpg", "png")

# Paper: 20% of conditioning images get one of these.
AUGMENTATIONS = ("crop", "flip", "noise", "grayscale")
CROP_KEEP = (0.7, 1.0)  # share of each side a random crop keeps
NOISE_SIGMA = 0.05  # Gaussian noise std on the [0, 1] pixel scale


@dataclass(frozen=True)
class DataConfig:
    shards: tuple[str, ...]  # tar paths or glob patterns, expanded and sorted
    resolution: int = 1024  # target images: padded to square with black, resized to this
    # Share of samples whose prompt becomes the empty prompt, the unconditional branch of
    # classifier-free guidance.
    conditioning_dropout: float = 0.1
    augment_probability: float = 0.2  # share of conditioning images augmented
    max_images: int = 4  # a record with more images is skipped as a bad prompt
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept one path or any sequence (YAML gives lists) and store a tuple of str.
        shards = (self.shards,) if isinstance(self.shards, (str, os.PathLike)) else self.shards
        object.__setattr__(self, "shards", tuple(os.fspath(shard) for shard in shards))
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


# -- randomness ----------------------------------------------------------------------------


def _rng(*parts: object) -> random.Random:
    """An rng seeded from `parts`; sha256 rather than `hash()`, which Python salts per process."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The rng of every random decision about one sample in one epoch."""
    return _rng(seed, "sample", epoch, key)


# -- per-sample transforms -----------------------------------------------------------------


def target_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Pad to square with black, resize (bicubic) to `resolution`: [3, R, R] float in [-1, 1]."""
    square = pad_to_square(to_rgb(image)).resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32))
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


def augment_image(image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """One augmentation drawn from AUGMENTATIONS; returns (new image, its name)."""
    kind = rng.choice(AUGMENTATIONS)
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


def augment_prompt(prompt: MultimodalPrompt, rng: random.Random, probability: float) -> MultimodalPrompt:
    """Each conditioning image independently augmented with `probability`.

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
            part, _ = augment_image(part, rng)
            changed = True
        parts.append(part)
    return MultimodalPrompt(parts, max_images=None) if changed else prompt


# -- shards --------------------------------------------------------------------------------

Members = tuple[tuple[str, int, int], ...]  # (field, data offset, size) of each tar member


def expand_shards(patterns: Sequence[str]) -> list[Path]:
    """Every file the patterns match, sorted; a pattern that matches no file is an error, since a
    typo would otherwise silently train on part of the data."""
    found: set[Path] = set()
    unmatched = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        # A file that exists is taken as named, even if its name holds glob characters like "[".
        names = [expanded] if os.path.isfile(expanded) else glob.glob(expanded, recursive=True)
        matches = [Path(os.path.abspath(name)) for name in names]
        matches = [path for path in matches if path.is_file()]
        if not matches:
            unmatched.append(pattern)
        found.update(matches)
    if unmatched:
        raise ValueError(f"no shard file matches {', '.join(map(repr, unmatched))}")
    return sorted(found)


def index_shard(path: Path, skipped: Skipped) -> list[tuple[str, Members]]:
    """(key, members) of each sample of a shard, from its tar headers only.

    Groups members as `read_shard` does. A damaged shard keeps the samples before the damage,
    drops the one in progress and is counted as "damaged_shard"; unlike `read_shard`, a shard cut
    inside a header or at a member boundary counts as damaged too.
    """
    samples: list[tuple[str, Members]] = []
    key: str | None = None
    members: list[tuple[str, int, int]] = []
    try:
        file_size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, dot, field = member.name.rsplit("/", 1)[-1].partition(".")
                if not dot:
                    continue
                if member_key != key:
                    if key is not None:
                        samples.append((key, tuple(members)))
                    key, members = member_key, []
                if member.offset_data + member.size > file_size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                members.append((sys.intern(field), member.offset_data, member.size))
            # tarfile takes a header cut short, or garbage where a header should be, for the end
            # of the archive (and so does `read_shard`); a real end is zeros (no header starts
            # with a zero byte, so even a cut-short end block means nothing is missing).
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
            if not end or end.count(0) != len(end):
                raise tarfile.ReadError(f"no end-of-archive block at offset {tar.offset}: truncated or damaged")
    except (tarfile.TarError, OSError, EOFError) as err:
        last = samples[-1][0] if samples else None
        skipped.add("damaged_shard", str(path), f"after sample {last!r} ({type(err).__name__}: {err})")
        return samples
    if key is not None:
        samples.append((key, tuple(members)))
    return samples


@dataclass(frozen=True, slots=True)  # one per sample of the dataset: keep it small
class _Entry:
    shard: int
    key: str
    members: Members


@dataclass(frozen=True)
class _Bad:
    reason: str
    where: str  # "shard:key"
    detail: str


# -- the stream ----------------------------------------------------------------------------


class ShardStream:
    """Deterministic, resumable stream of training samples over shards, split across ranks.

    Iterating is endless (epoch after epoch) and continues from the current state, so call
    `load_state_dict` before iterating and keep one iterator at a time. `state_dict()` taken
    after n samples came out describes exactly the stream from sample n+1 on; `batches` does
    not read ahead, so a state taken between batches resumes at the next batch.

    `prefetch` > 0 decodes that many samples ahead in threads (PIL releases the GIL while
    decoding and resizing). Results are consumed in order, so the stream and its state are
    the same with or without it. (DataLoader workers would hold the state in other processes.)
    """

    def __init__(self, config: DataConfig, rank: int = 0, world_size: int = 1, *, prefetch: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.skipped = Skipped()
        self.shards = expand_shards(config.shards)
        self._entries = [
            _Entry(shard, key, members)
            for shard, path in enumerate(self.shards)
            for key, members in index_shard(path, self.skipped)
        ]
        if len(self._entries) < world_size:
            raise ValueError(
                f"{len(self._entries)} samples in the {len(self.shards)} shard(s) matching "
                f"{', '.join(map(repr, config.shards))}, fewer than the {world_size} ranks "
                f"(skipped: {self.skipped.as_dict()['by_reason']})"
            )
        # Identifies the index a state was taken on: shard names and keys in order.
        listing = "\n".join(f"{self.shards[e.shard].name}/{e.key}" for e in self._entries)
        self._dataset = hashlib.sha256(listing.encode()).hexdigest()[:16]
        self._bad: dict[int, _Bad] = {}  # entry index -> why it is unusable (found so far)
        self._order: tuple[int, list[int]] | None = None  # (epoch, this rank's entries) cache
        self._epoch = 0
        self._position = 0

    @property
    def num_samples(self) -> int:
        """Samples indexed over all ranks (bad ones included; they are found when read)."""
        return len(self._entries)

    @property
    def samples_per_epoch(self) -> int:
        """Slots of this rank's share of an epoch (ranks differ by at most one)."""
        return len(range(self.rank, len(self._entries), self.world_size))

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.config.seed,
            "num_samples": len(self._entries),
            "dataset": self._dataset,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.config.seed,
            "num_samples": len(self._entries),
            "dataset": self._dataset,
        }
        # A state from another rank, seed, world size or dataset names other samples: resuming
        # from it would silently repeat some samples and never show others.
        mismatched = {name: (state.get(name), value) for name, value in expected.items() if state.get(name) != value}
        if mismatched:
            details = ", ".join(f"{name}: state has {got!r}, stream has {want!r}" for name, (got, want) in mismatched.items())
            raise ValueError(f"data state does not belong to this stream ({details})")
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"data state: epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(position, int) or not 0 <= position <= self.samples_per_epoch:
            raise ValueError(f"data state: position must be an int in [0, {self.samples_per_epoch}], got {position!r}")
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
            if isinstance(result, _Bad):
                self._record_bad(index, result)
                continue
            yielded += 1
            yield result

    def _rank_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self._entries)))
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

    def _load(self, epoch: int, index: int) -> TrainingSample | _Bad:
        """The sample of one slot, or why it is unusable. Pure: the same for the same arguments."""
        if index in self._bad:
            return self._bad[index]
        entry = self._entries[index]
        key = entry.key
        where = f"{self.shards[entry.shard].name}:{key}"
        try:
            sample = self._read(entry)
        except OSError as err:
            return _Bad("unreadable_sample", where, f"{type(err).__name__}: {err}")
        try:
            meta = sample_json(sample, key)
            if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                raise ShardError(f"sample {key!r}: its json has no 'prompt' string")
            field = next((name for name in TARGET_FIELDS if name in sample), None)
            if field is None:
                raise ShardError(f"sample {key!r} has no target image ({' or '.join(TARGET_FIELDS)})")
            target = decode_image(sample[field], f"{key}.{field}")
            prompt = sample_prompt(sample, key, max_images=self.config.max_images)
        except ImageLoadError as err:
            return _Bad("bad_image", where, str(err))
        except PromptError as err:
            return _Bad("bad_prompt", where, str(err))
        except ShardError as err:
            return _Bad("bad_record", where, str(err))

        rng = sample_rng(self.config.seed, epoch, key)
        # Dropout is drawn first, so it does not depend on how many images the prompt has.
        dropped = rng.random() < self.config.conditioning_dropout
        if dropped:
            # Exactly the unconditional branch `MUMUPipeline.__call__` encodes for guidance (the
            # empty prompt, through the same `encoder_inputs`), so guidance contrasts the
            # prompt with what the model learned for "no conditioning".
            prompt = MultimodalPrompt()
        else:
            prompt = augment_prompt(prompt, rng, self.config.augment_probability)
        # Targets are never augmented (and cached latents rely on it).
        return TrainingSample(key, target_tensor(target, self.config.resolution), prompt, dropped, epoch)

    def _read(self, entry: _Entry) -> Sample:
        sample: Sample = {}
        with open(self.shards[entry.shard], "rb") as file:
            for field, offset, size in entry.members:
                file.seek(offset)
                data = file.read(size)
                if len(data) != size:
                    raise OSError(f"member {entry.key}.{field} is truncated (shard changed since indexing?)")
                sample[field] = data
        return sample

    def _record_bad(self, index: int, bad: _Bad) -> None:
        if index not in self._bad:  # count each bad sample once, however often it comes up
            self._bad[index] = bad
            self.skipped.add(bad.reason, bad.where, bad.detail)

    def _check_usable(self) -> None:
        """Raise if no sample is usable; reads the unknown ones until one is (normally the first)."""
        for index in range(len(self._entries)):
            result = self._load(0, index)
            if not isinstance(result, _Bad):
                return
            self._record_bad(index, result)
        raise RuntimeError(
            f"none of the {len(self._entries)} samples in {', '.join(map(repr, self.config.shards))} is usable "
            f"(skipped: {dict(self.skipped.counts)}; e.g. {self.skipped.examples})"
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


def _reserved_tokens(processor) -> list[str]:
    # The strings `encoder_inputs` refuses in prompt text (it raises PromptError on them).
    return [processor.image_token, processor.fake_image_token, str(processor.end_of_utterance_token)]


def batches(stream: ShardStream, processor, batch_size: int) -> Iterator[dict]:
    """Collated batches of `batch_size` samples, endlessly.

    A prompt whose text holds one of the encoder's reserved tokens (e.g. a literal "<image>")
    would make `encoder_inputs` fail the whole batch; such samples are skipped and counted in
    `stream.skipped` as "reserved_token" (once per key). Nothing is read ahead: a
    `stream.state_dict()` taken after a batch came out resumes at the next batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reserved = _reserved_tokens(processor)
    counted: set[str] = set()
    batch: list[TrainingSample] = []
    for sample in stream:
        text = sample.prompt.text_with_placeholders("")
        bad = next((token for token in reserved if token in text), None)
        if bad is not None:
            if sample.key not in counted:
                counted.add(sample.key)
                stream.skipped.add("reserved_token", sample.key, f"prompt text contains {bad!r}")
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch, processor)
            batch = []


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


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


class LatentCache:
    """On-disk cache of target latents: one safetensors file per (key, resolution, VAE).

    Valid because targets are never augmented: a key's target (padded, resized to the stream's
    resolution) is the same every epoch, so its latents are too. If targets ever get random
    crops or flips, this cache must not be used. The folder is `directory/vae-<hash of the
    VAE config and weights>/<resolution>/<key>.safetensors`; files are written atomically, so
    ranks may share a folder, and a damaged file is recomputed. Stored in `dtype`, returned on
    the CPU, the same tensor on a miss as on any later hit.
    """

    def __init__(self, directory: str | os.PathLike, vae, dtype: torch.dtype = torch.float32):
        self.vae = vae
        self.dtype = dtype
        self.fingerprint = vae_fingerprint(vae)
        self.directory = Path(directory) / f"vae-{self.fingerprint}-{str(dtype).removeprefix('torch.')}"
        self.hits = 0
        self.misses = 0

    def path(self, key: str, resolution: int) -> Path:
        # Keys come from tar member names; anything unusual as a file name is hashed instead.
        name = key if _SAFE_NAME.fullmatch(key) else "sha256-" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / str(resolution) / f"{name}.safetensors"

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
        found = [self._load(key, resolution) for key in keys]
        missing = [i for i, latents in enumerate(found) if latents is None]
        if missing:
            computed = vae_latents(self.vae, pixel_values[missing]).to("cpu", self.dtype)
            for i, latents in zip(missing, computed):
                found[i] = latents.clone()  # its own storage: saved alone, and not a view of the batch
                self._save(keys[i], resolution, found[i])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack(found)

    def _metadata(self, key: str, resolution: int) -> dict[str, str]:
        return {"key": key, "resolution": str(resolution), "vae": self.fingerprint, "dtype": str(self.dtype)}

    def _load(self, key: str, resolution: int) -> torch.Tensor | None:
        path = self.path(key, resolution)
        if not path.exists():
            return None
        with contextlib.suppress(Exception):  # unreadable or foreign: recompute and overwrite
            with safe_open(path, framework="pt") as file:
                if file.metadata() == self._metadata(key, resolution):
                    return file.get_tensor("latents")
        return None

    def _save(self, key: str, resolution: int, latents: torch.Tensor) -> None:
        data = safetensors_save({"latents": latents.contiguous()}, metadata=self._metadata(key, resolution))
        write_bytes_atomic(self.path(key, resolution), data)
