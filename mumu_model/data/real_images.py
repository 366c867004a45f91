"""Real photographs for training (paper §2 Data): read, filter, crop on the person, caption.

The paper used ~2M public images kept if SFW, high resolution, without watermark and with 0 or 1
people, best-effort centre-cropped on the person and captioned with LLaVA 1.6. Here:

    sources   `iter_image_folder` (a folder tree) or `iter_webdataset` (tar shards)
    filters   `MinResolution`, `ImageClassifierFilter` (SFW, watermark), each `image -> keep?`
    people    a `PersonCounter` (`DetrPersonCounter`) gives person boxes; > `max_people` rejects
    crop      `centre_crop_on_person`
    caption   `LlavaNextCaptioner`
    together  `ingest_real_images`, which yields records and counts every rejection by reason

Sources never raise on a bad item: they yield `(image_id, None, "reason: detail")`, and
`ingest_real_images` counts the reason in a `Skipped`.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoProcessor,
    LlavaNextForConditionalGeneration,
)

from ..images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, resolve_image_path, to_rgb
from .report import Skipped

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# A WebDataset sample's image member, by preference; and its optional caption members.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Far above any real photo's compressed size; stops one member from filling memory.
MAX_MEMBER_BYTES = 256 * 1024 * 1024

# Real checkpoints (hub ids or local copies; safetensors only). Label names are config: they
# are checked against the model's `id2label` when the filter is built.
DETR_MODEL = "facebook/detr-resnet-50"  # COCO detector; "person" is COCO class 1
NSFW_MODEL = "Falconsai/nsfw_image_detection"  # ViT-B/16 fine-tune, labels "normal" / "nsfw"
NSFW_REJECT_LABELS = ("nsfw",)
# SigLIP2-base fine-tuned on qwertyforce/scenery_watermarks (94% test accuracy reported),
# loads as AutoModelForImageClassification, labels "No Watermark" / "Watermark".
WATERMARK_MODEL = "prithivMLmods/Watermark-Detection-SigLIP2"
WATERMARK_REJECT_LABELS = ("Watermark",)
LLAVA_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"  # LLaVA 1.6 (LLaVA-NeXT), as in the paper


# --------------------------------------------------------------------------------------------
# Sources


def iter_image_folder(
    root: str | os.PathLike,
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    select: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """Yield `(image_id, image, None)` or `(image_id, None, "reason: detail")` for each file.

    `image_id` is the POSIX path relative to `root`. The walk is sorted (folders and files by
    name at each level) and streams, so it is deterministic without listing everything first.
    Symlinked folders are not followed, and a symlinked file that leads outside `root` is
    rejected. Files with other extensions are not images and are passed over silently.
    `select(image_id)` picks files before they are decoded (e.g. one shard's share).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} does not exist or is not a folder")
    suffixes = tuple(ext.lower() for ext in extensions)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(suffixes):
                continue
            image_id = (Path(folder) / name).relative_to(root).as_posix()
            if select is not None and not select(image_id):
                continue
            try:
                image = load_image(resolve_image_path(image_id, root), max_pixels=max_pixels)
            except ImageLoadError as err:
                yield image_id, None, _load_error(err)
                continue
            yield image_id, image, None


def iter_webdataset(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, Image.Image | None, str | None, str | None]]:
    """Yield `(key, image, error, caption)` for each sample of WebDataset tar shards.

    A sample is a run of consecutive members sharing a key (`dir/key.ext`): an image
    (`jpg|jpeg|png|webp`) and optionally a caption (`txt`, or `json` with "caption"/"text").
    Damage is reported, never raised: a duplicate key ("duplicate_id"), a sample without an
    image ("no_image"), an undecodable image, a truncated member, or damaged tar data
    ("broken_tar"); after damaged headers reading resumes at the next valid member.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    seen: set[str] = set()  # keys are unique across a dataset, not only within a shard
    for path in paths:
        yield from _iter_shard(Path(path), seen, max_pixels, max_member_bytes)


def _iter_shard(path: Path, seen: set[str], max_pixels: int, max_member_bytes: int):
    shard = path.as_posix()
    try:
        # ignore_zeros: on a damaged header, tarfile skips ahead block by block to the next
        # valid one instead of ending the archive there; the gaps are detected below.
        tar = tarfile.open(path, mode="r:*", ignore_zeros=True)
    except (OSError, tarfile.TarError, EOFError) as err:
        yield shard, None, f"broken_tar: cannot open ({type(err).__name__}: {err})", None
        return

    with tar:
        key, members = None, {}  # the sample being gathered: extension -> bytes
        expected = 0  # where the next header starts in an undamaged archive
        while True:
            try:
                member = tar.next()
            except (OSError, tarfile.TarError, EOFError) as err:  # gzip/zlib damage, truncation
                yield from _finish_sample(key, members, seen, max_pixels)
                yield shard, None, f"broken_tar: stopped at byte {expected} ({type(err).__name__}: {err})", None
                return
            if member is None:
                break
            if _has_data(tar, expected, member.offset):
                yield shard, None, f"broken_tar: damaged data at bytes {expected}-{member.offset}", None
            expected = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not member.isfile():
                continue
            member_key, ext = _split_key(member.name)
            if member_key is None:
                continue
            if member_key != key:
                yield from _finish_sample(key, members, seen, max_pixels)
                key, members = member_key, {}
            if ext in members:
                yield key, None, f"duplicate_id: second {ext!r} member in {shard}", None
                continue
            if member.size > max_member_bytes:
                members[ext] = ValueError(f"member is {member.size} bytes, at most {max_member_bytes}")
                continue
            try:
                members[ext] = tar.extractfile(member).read()
            except (OSError, tarfile.TarError, EOFError) as err:
                # The archive ends inside this member: what came before is still good.
                yield from _finish_sample(key, {k: v for k, v in members.items() if k != ext}, seen, max_pixels)
                yield key, None, f"truncated_member: {member.name} ({type(err).__name__}: {err})", None
                return
        yield from _finish_sample(key, members, seen, max_pixels)
        if _has_data(tar, expected, None):
            yield shard, None, f"broken_tar: damaged data after byte {expected}", None


def _split_key(name: str) -> tuple[str | None, str]:
    """WebDataset's convention: key = path up to the first dot of the file name."""
    path = PurePosixPath(name)
    stem, dot, ext = path.name.partition(".")
    if not dot or not stem:
        return None, ""
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


def _finish_sample(key: str | None, members: dict, seen: set[str], max_pixels: int):
    if key is None or not members:
        return
    if key in seen:
        yield key, None, "duplicate_id: key seen earlier", None
        return
    seen.add(key)
    ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
    if ext is None:
        yield key, None, f"no_image: members {sorted(members)}", None
        return
    data = members[ext]
    if isinstance(data, Exception):
        yield key, None, f"image_too_large: {data}", None
        return
    try:
        image = _load_image_bytes(data, ext, max_pixels)
    except ImageLoadError as err:
        yield key, None, _load_error(err), None
        return
    yield key, image, None, _caption_of(members)


def _load_image_bytes(data: bytes, ext: str, max_pixels: int) -> Image.Image:
    # Through a temporary file so that tar members pass the very same checks as files on disk
    # (format allow-list, size from the header, full decode); the cost is small next to decoding.
    with tempfile.NamedTemporaryFile(suffix=f".{ext}") as file:
        file.write(data)
        file.flush()
        return load_image(file.name, max_pixels=max_pixels)


def _caption_of(members: dict) -> str | None:
    """The sample's own caption: `txt`, else "caption"/"text" of `json`; unreadable is None."""
    text = members.get("txt")
    if isinstance(text, bytes):
        return " ".join(text.decode("utf-8", errors="replace").split()) or None
    raw = members.get("json")
    if isinstance(raw, bytes):
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        if isinstance(meta, dict):
            for field in ("caption", "text"):
                if isinstance(meta.get(field), str):
                    return " ".join(meta[field].split()) or None
    return None


def _has_data(tar: tarfile.TarFile, start: int, end: int | None) -> bool:
    """Whether bytes [start, end) of the (decompressed) archive hold anything but zero padding."""
    if end is not None and end <= start:
        return False
    fileobj = tar.fileobj
    position = fileobj.tell()
    try:
        fileobj.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            chunk = fileobj.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                return False
            if chunk.strip(b"\0"):
                return True
            if remaining is not None:
                remaining -= len(chunk)
        return False
    except (OSError, EOFError):
        return True
    finally:
        fileobj.seek(position)


def _load_error(err: ImageLoadError) -> str:
    reason = "image_too_large" if err.problem.startswith("image too large") else "unreadable_image"
    return f"{reason}: {err.problem}"


# --------------------------------------------------------------------------------------------
# Filters: `filter(image) -> bool`, True to keep; `name` is the reason counted on rejection.


class ImageFilter(Protocol):
    name: str

    def __call__(self, image: Image.Image) -> bool: ...


@dataclass
class MinResolution:
    """Keep images whose shorter side is at least `min_side` pixels."""

    min_side: int = 512
    name: str = "low_resolution"

    def __call__(self, image: Image.Image) -> bool:
        return min(image.size) >= self.min_side


def _vision_model(auto_class, model: str, device: str | torch.device, dtype: torch.dtype):
    """(image processor, model in eval mode on `device`) of a checkpoint: safetensors only, no
    remote code."""
    processor = AutoImageProcessor.from_pretrained(model, trust_remote_code=False)
    network = auto_class.from_pretrained(model, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return processor, network.to(device).eval()


class ImageClassifierFilter:
    """Reject images that an image classifier puts in `reject_labels` with p >= `threshold`.

    Any `AutoModelForImageClassification` checkpoint: e.g. `NSFW_MODEL` with
    `NSFW_REJECT_LABELS` for SFW, `WATERMARK_MODEL` with `WATERMARK_REJECT_LABELS` for
    watermarks. Labels match the model's `id2label` case-insensitively; an unknown label is an
    error at construction, not a filter that silently never fires.
    """

    def __init__(
        self,
        model: str,
        reject_labels: Sequence[str],
        threshold: float = 0.5,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.processor, self.model = _vision_model(AutoModelForImageClassification, model, device, dtype)
        labels = {str(label).lower(): int(index) for index, label in self.model.config.id2label.items()}
        unknown = [label for label in reject_labels if label.lower() not in labels]
        if unknown or not reject_labels:
            raise ValueError(
                f"reject_labels {list(reject_labels)} must name labels of {model}: {sorted(labels)}"
            )
        self.reject_ids = sorted({labels[label.lower()] for label in reject_labels})
        # A multi-label head scores each label on its own (sigmoid); otherwise labels compete.
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        self.threshold = threshold
        self.name = name or "_".join(label.lower().replace(" ", "_") for label in reject_labels)
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def reject_probability(self, image: Image.Image) -> float:
        inputs = self.processor(images=to_rgb(image), return_tensors="pt").to(self.device, self.dtype)
        logits = self.model(**inputs).logits[0].float()
        if self.multi_label:
            return float(torch.sigmoid(logits[self.reject_ids]).max())
        return float(torch.softmax(logits, dim=-1)[self.reject_ids].sum())

    def __call__(self, image: Image.Image) -> bool:
        return self.reject_probability(image) < self.threshold


class PersonCounter(Protocol):
    """Person boxes in an image, most confident first; the count is `len(boxes)`."""

    def __call__(self, image: Image.Image) -> list[Box]: ...


class DetrPersonCounter:
    """Count people with a transformers object detector (`AutoModelForObjectDetection`).

    The default is DETR ResNet-50 trained on COCO; detections of `label` with score >=
    `threshold` count. Post-processing is the checkpoint's own image processor's, so other
    detectors with `post_process_object_detection` (Deformable DETR, RT-DETR...) also work.
    """

    def __init__(
        self,
        model: str = DETR_MODEL,
        *,
        threshold: float = 0.9,
        label: str = "person",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.processor, self.model = _vision_model(AutoModelForObjectDetection, model, device, dtype)
        id2label = self.model.config.id2label
        self.label_ids = {int(i) for i, name in id2label.items() if str(name).lower() == label.lower()}
        if not self.label_ids:
            raise ValueError(f"{model} has no label {label!r}")
        self.threshold = threshold
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> list[Box]:
        image = to_rgb(image)
        inputs = self.processor(images=image, return_tensors="pt").to(self.device, self.dtype)
        outputs = self.model(**inputs)
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(image.height, image.width)]
        )[0]
        people = [
            (float(score), tuple(float(v) for v in box))
            for score, label, box in zip(result["scores"], result["labels"], result["boxes"])
            if int(label) in self.label_ids
        ]
        people.sort(key=lambda item: -item[0])
        return [box for _, box in people]


# --------------------------------------------------------------------------------------------
# Crop


def centre_crop_on_person(
    image: Image.Image, person_box: Box | None, size: int | None = None
) -> Image.Image:
    """The largest square crop centred on the person box (moved inside the image), else the
    centre square; resized to `size` x `size` if given."""
    left, top, side = _square_crop(image.size, person_box)
    crop = image.crop((left, top, left + side, top + side))
    if size is not None and size != side:
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return crop


def _square_crop(image_size: tuple[int, int], box: Box | None) -> tuple[int, int, int]:
    width, height = image_size
    side = min(width, height)
    if box is None:
        centre_x, centre_y = width / 2, height / 2
    else:
        centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    # Best effort: clamping keeps the crop inside the image, so a person near an edge ends up
    # off-centre rather than padded.
    left = min(max(round(centre_x - side / 2), 0), width - side)
    top = min(max(round(centre_y - side / 2), 0), height - side)
    return left, top, side


def _box_in_crop(box: Box, left: int, top: int, side: int, size: int | None) -> Box:
    scale = 1.0 if size is None else size / side
    x0, y0, x1, y1 = (min(max(v - offset, 0.0), side) * scale for v, offset in zip(box, (left, top, left, top)))
    return (x0, y0, x1, y1)


# --------------------------------------------------------------------------------------------
# Captions


class LlavaNextCaptioner:
    """One-sentence captions from LLaVA-NeXT (LLaVA 1.6), greedy, `batch_size` images a call."""

    def __init__(
        self,
        model: str = LLAVA_MODEL,
        *,
        prompt: str = "Describe this image in one sentence.",
        max_new_tokens: int = 60,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
        # Decoder-only batched generation needs left padding: new tokens follow every prompt.
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaNextForConditionalGeneration.from_pretrained(
            model, dtype=dtype, use_safetensors=True
        ).to(device)
        self.model.eval()
        self.prompt = self._prompt_text(prompt)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.skipped = Skipped()

    def _prompt_text(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return f"{self.processor.image_token}\n{prompt}"

    def caption(
        self,
        images: Sequence[Image.Image],
        *,
        ids: Sequence[str] | None = None,
        skipped: Skipped | None = None,
    ) -> list[str]:
        """One caption per image, "" where none came out (counted as "empty_caption", or as
        "caption_error" when generation failed)."""
        skipped = self.skipped if skipped is None else skipped
        ids = [str(i) for i in range(len(images))] if ids is None else list(ids)
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            captions += self._caption_batch(batch, ids[start : start + len(batch)], skipped)
        return captions

    def _caption_batch(self, images: list[Image.Image], ids: list[str], skipped: Skipped) -> list[str]:
        try:
            texts = self._generate(images)
        except Exception as err:  # noqa: BLE001 - retried per image, then counted
            if len(images) > 1:
                return [self._caption_batch([image], [id_], skipped)[0] for image, id_ in zip(images, ids)]
            skipped.add("caption_error", ids[0], f"{type(err).__name__}: {err}")
            return [""]
        captions = [clean_caption(text) for text in texts]
        for caption, id_ in zip(captions, ids):
            if not caption:
                skipped.add("empty_caption", id_)
        return captions

    @torch.no_grad()
    def _generate(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(
            images=[to_rgb(image) for image in images],
            text=[self.prompt] * len(images),
            padding=True,
            return_tensors="pt",
        ).to(self.device, self.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)


def clean_caption(text: str) -> str:
    """One line: control characters dropped, whitespace runs collapsed, ends trimmed."""
    text = "".join(char if char.isprintable() else " " for char in text)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Everything together


def ingest_real_images(
    source: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[tuple],
    *,
    filters: Sequence[ImageFilter] = (),
    person_counter: PersonCounter | None = None,
    max_people: int = 1,
    captioner: LlavaNextCaptioner | None = None,
    crop_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skipped: Skipped | None = None,
) -> Iterator[dict]:
    """Yield `{image_id, image, caption, width, height, person_box}` for each usable photo.

    `source` is a folder, a tar shard, a list of shards, or any iterable of the tuples that
    `iter_image_folder` / `iter_webdataset` yield. Filters run in order, so put cheap ones
    (`MinResolution`) before model-based ones. Images with more than `max_people` people are
    rejected; the rest are square-cropped on their one person (or centred) and, with a
    captioner, captioned (else `caption` is the source's own caption or None). `person_box` is
    in the output image's pixels. Every rejection is counted in `skipped` by reason.
    """
    skipped = Skipped() if skipped is None else skipped
    pending: list[dict] = []
    for item in _items(source, max_pixels):
        image_id, image, error = item[0], item[1], item[2]
        if error is not None or image is None:
            reason, _, detail = (error or "no_image: no image").partition(": ")
            skipped.add(reason, image_id, detail)
            continue
        record = _process(image_id, image, filters, person_counter, max_people, crop_size, skipped)
        if record is None:
            continue
        record["caption"] = item[3] if len(item) > 3 else None
        if captioner is None:
            yield record
            continue
        pending.append(record)
        if len(pending) == captioner.batch_size:
            yield from _captioned(pending, captioner, skipped)
            pending = []
    if pending:
        yield from _captioned(pending, captioner, skipped)


def _items(source, max_pixels: int) -> Iterable[tuple]:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():  # a typo, not a damaged shard among many
            raise FileNotFoundError(f"no image folder or shard at {source}")
        if Path(source).is_dir():
            return iter_image_folder(source, max_pixels=max_pixels)
        return iter_webdataset(source, max_pixels=max_pixels)
    if isinstance(source, (list, tuple)) and all(isinstance(path, (str, os.PathLike)) for path in source):
        return iter_webdataset(source, max_pixels=max_pixels)
    return source


def _process(image_id, image, filters, person_counter, max_people, crop_size, skipped) -> dict | None:
    for image_filter in filters:
        name = getattr(image_filter, "name", type(image_filter).__name__)
        try:
            keep = image_filter(image)
        except Exception as err:  # noqa: BLE001 - a model failing on one image skips that image
            skipped.add("filter_error", image_id, f"{name}: {type(err).__name__}: {err}")
            return None
        if not keep:
            skipped.add(name, image_id)
            return None

    person_box = None
    if person_counter is not None:
        try:
            boxes = person_counter(image)
        except Exception as err:  # noqa: BLE001
            skipped.add("filter_error", image_id, f"person_counter: {type(err).__name__}: {err}")
            return None
        if len(boxes) > max_people:
            skipped.add("too_many_people", image_id, f"{len(boxes)} people")
            return None
        person_box = boxes[0] if boxes else None

    left, top, side = _square_crop(image.size, person_box)
    image = centre_crop_on_person(image, person_box, crop_size)
    if person_box is not None:
        person_box = _box_in_crop(person_box, left, top, side, crop_size)
    return {
        "image_id": image_id,
        "image": image,
        "caption": None,
        "width": image.width,
        "height": image.height,
        "person_box": person_box,
    }


def _captioned(records: list[dict], captioner: LlavaNextCaptioner, skipped: Skipped) -> Iterator[dict]:
    captions = captioner.caption(
        [record["image"] for record in records], ids=[record["image_id"] for record in records], skipped=skipped
    )
    for record, caption in zip(records, captions):
        if caption:  # an empty one was counted by the captioner
            record["caption"] = caption
            yield record
