"""Multimodal captions: crops inserted into a caption before their words (paper §4-5).

A record is the text form of a multimodal prompt (docs/prompt_format.md) plus the images it
names as members (`crop0.png`, ..., `control.png`), the target image and the caption:

    stage 1: "<img:control.png> in this layout: a <img:crop0.png> man and his <img:crop1.png> dog"
    stage 2: "a <img:crop0.png> man and his dog hiking"   (one high-resolution face or person)

Every random choice is drawn from an rng the caller seeds from the record id
(`record_rng(key)`), so rebuilding a dataset gives the same records.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..images import pad_to_square, to_rgb
from .detection import (
    HEAD_INSIDE_FRACTION,
    Detection,
    Phrase,
    box_area,
    choose_person_crops,
    crop,
    filter_detections,
    inside_fraction,
    is_head,
    is_person,
)
from .report import Skipped

CONTROL_NAME = "control.png"
# The control image opens the prompt, followed by this text. One phrase for canny, depth and
# sketch alike: the image itself shows which kind it is, and users write one template at
# inference ("<img:edges.png> in this layout: a cat on a sofa").
CONTROL_PREFIX = " in this layout: "

# Depth backend default: Depth Anything V2 Small (Apache-2.0, 25M parameters). Better
# zero-shot relative depth than DPT-hybrid MiDaS (the ControlNet 1.0 annotator) at a fifth
# of its size, so it costs little next to the detector when run over millions of images.
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


def record_rng(key: str, seed: int = 0) -> random.Random:
    """An rng seeded from the record id (and a dataset seed): same key, same choices.

    sha256 rather than `hash()`, which Python salts per process for strings.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# -- text ----------------------------------------------------------------------------------


def _check_member_name(name: str) -> None:
    # The text form's path rules (docs/prompt_format.md).
    valid = isinstance(name, str) and name and name == name.strip()
    if not valid or any(c in name for c in "<>\n"):
        raise ValueError(f"invalid crop member name {name!r}")


def without_words(phrase: str, words: Collection[str]) -> str:
    """`phrase` without the whole words in `words` (case-insensitive), unless that would leave
    nothing: the phrase's noun stays. Unchanged, whitespace and all, when none is present."""
    drop = {word.casefold() for word in words}
    kept = [word for word in phrase.split() if word.casefold() not in drop]
    if not kept or len(kept) == len(phrase.split()):
        return phrase
    return " ".join(kept)


def insert_crops(caption: str, crops: Sequence[tuple[Phrase, str]], crop_replaces_words: Collection[str] = ()) -> str:
    """The caption in the prompt text form with `<img:NAME> ` right before each phrase.

    Crops go in caption order whatever order they are given in; every literal `<` of the
    caption is written `<<`. The tag is followed by a space so the word keeps the leading
    space it has in the caption ("a <img:crop0.png> man"): the text tokens stay those of the
    plain caption. Raises ValueError for a phrase that is not in the caption (its offsets do
    not point at its text), a phrase given twice, or a name the text form cannot hold.

    `crop_replaces_words` (default none, the paper's rule) are words that a phrase loses when
    its crop goes before it ("a <img:crop0.png> star" for "a red star" with the colour names):
    the crop shows them, so the text no longer gives away what the model should take from it.
    """
    ordered = sorted(crops, key=lambda item: item[0].start)
    pieces: list[str] = []
    position = 0
    for index, (phrase, name) in enumerate(ordered):
        _check_member_name(name)
        if phrase.start < 0 or caption[phrase.start : phrase.end] != phrase.text:
            raise ValueError(f"phrase {phrase} is not in the caption {caption!r}")
        if index and phrase.start == ordered[index - 1][0].start:
            raise ValueError(f"two crops for the phrase {phrase.text!r} at {phrase.start}")
        if phrase.start < position:
            raise ValueError(f"the phrase {phrase.text!r} at {phrase.start} overlaps a phrase whose words were dropped")
        pieces.append(caption[position : phrase.start].replace("<", "<<"))
        pieces.append(f"<img:{name}> ")
        position = phrase.start
        shown = without_words(phrase.text, crop_replaces_words)
        if shown != phrase.text:
            pieces.append(shown.replace("<", "<<"))
            position = phrase.end
    pieces.append(caption[position:].replace("<", "<<"))
    return "".join(pieces)


@dataclass
class CaptionRecord:
    key: str
    prompt: str  # text form; references the members of `crops`
    crops: dict[str, Image.Image]  # member name -> image (crops and the control image)
    target: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


# -- control images ------------------------------------------------------------------------


@runtime_checkable
class ControlBackend(Protocol):
    def __call__(self, image: Image.Image) -> Image.Image:
        """A control image (edges, depth, sketch) of the whole `image`, any size and mode."""
        ...


class CannyBackend:
    """Canny edges (`skimage.feature.canny`) of the grayscale image: white on black, RGB.

    sigma: skimage's default of 1 px marks texture (hair, grass, fabric) as edges on a
    1024 px photo; 2 px per 1024 px keeps the outlines that describe a layout. It scales
    with the image (at least 1) so a scene gives the same edges at any resolution. The
    hysteresis thresholds are skimage's defaults (10% and 20% of the gradient range).
    """

    def __init__(self, sigma: float | None = None, sigma_per_1024: float = 2.0):
        self.sigma = sigma
        self.sigma_per_1024 = sigma_per_1024

    def __call__(self, image: Image.Image) -> Image.Image:
        from skimage.feature import canny

        gray = np.asarray(to_rgb(image).convert("L"), dtype=np.float64) / 255.0
        sigma = self.sigma
        if sigma is None:
            sigma = max(1.0, self.sigma_per_1024 * max(image.size) / 1024)
        edges = canny(gray, sigma=sigma)
        return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


class TransformersDepthBackend:
    """Relative depth from a transformers depth-estimation model, near = bright, RGB.

    `model` is a hub id or local path (default `DEFAULT_DEPTH_MODEL`). The depth map is
    resized to the image and min-max normalised per image (relative depth has no unit).
    """

    def __init__(
        self,
        model: str = DEFAULT_DEPTH_MODEL,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.model = AutoModelForDepthEstimation.from_pretrained(model, dtype=dtype)
        self.model.to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        outputs = self.model(pixel_values=pixel_values)
        outputs.predicted_depth = outputs.predicted_depth.float()
        depth = self.processor.post_process_depth_estimation(
            outputs, target_sizes=[(image.height, image.width)]
        )[0]["predicted_depth"]
        depth = depth.reshape(image.height, image.width).cpu().numpy()
        low, high = float(depth.min()), float(depth.max())
        scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        # Depth Anything and MiDaS predict inverse depth (disparity): large = near = bright,
        # as in the ControlNet depth maps users already have.
        return Image.fromarray(np.rint(scaled * 255).astype(np.uint8)).convert("RGB")


class PidiNetSketchBackend:
    """Sketch as in the paper: PiDiNet edges ([58], `table5_pidinet.pth`, lllyasviel/Annotators)
    through controlnet-aux's `PidiNetDetector`.

    Neither the weights nor controlnet-aux ship with MUMU; pass `model` (a hub id or a local
    folder holding `table5_pidinet.pth`) and install `controlnet-aux`, else this raises.
    """

    def __init__(self, model: str | None = None):
        if model is None:
            raise ValueError(
                "the sketch backend needs PiDiNet weights: pass model= a hub id or a folder "
                "with table5_pidinet.pth (lllyasviel/Annotators), or leave 'sketch' out of "
                "control_backends"
            )
        try:
            from controlnet_aux import PidiNetDetector
        except ImportError as err:
            raise ImportError("the sketch backend needs `pip install controlnet-aux`") from err
        self.detector = PidiNetDetector.from_pretrained(model)

    def __call__(self, image: Image.Image) -> Image.Image:
        # safe=True quantises the soft edges, as ControlNet's "softedge_pidsafe" annotator.
        return to_rgb(self.detector(to_rgb(image), safe=True)).resize(image.size)


def default_control_backends() -> dict[str, ControlBackend]:
    return {"canny": CannyBackend()}


# -- records -------------------------------------------------------------------------------


def _conditioning_image(image: Image.Image, size: int | None) -> Image.Image:
    """As stored: unchanged, or padded to square with black and resized to `size` px (the
    paper pads every image to square and resizes conditioning images to their token budget)."""
    if size is None:
        return image
    return pad_to_square(image).resize((size, size), Image.Resampling.BICUBIC)


def _check_inputs(
    key: str, image: object, caption: object, detections: Sequence[Detection], skipped: Skipped
) -> list[Detection] | None:
    """The detections that belong to this caption, or None (counted) for an unusable item."""
    if not isinstance(image, Image.Image) or image.width == 0 or image.height == 0:
        skipped.add("bad_image", key, type(image).__name__)
        return None
    if not isinstance(caption, str) or not caption.strip():
        skipped.add("empty_caption", key)
        return None
    kept = []
    for detection in detections:
        phrase = detection.phrase
        if not phrase.auxiliary and caption[phrase.start : phrase.end] != phrase.text:
            skipped.add("phrase_not_in_caption", key, repr(phrase.text))
            continue
        kept.append(detection)
    return kept


def _crop_meta(name: str, detection: Detection) -> dict:
    return {
        "name": name,
        "phrase": detection.phrase.text,
        "start": detection.phrase.start,
        "box": [round(v, 2) for v in detection.box],
        "score": round(detection.score, 4),
        "label": detection.label,
        "head": is_head(detection),
    }


def _cut_crops(
    key: str,
    image: Image.Image,
    detections: list[Detection],
    crop_size: int | None,
    skipped: Skipped,
) -> tuple[list[tuple[Phrase, str]], dict[str, Image.Image], list[dict]]:
    """Crop in caption order as `crop0.png`, `crop1.png`, ...; a failed crop is counted."""
    inserts, images, meta = [], {}, []
    for detection in sorted(detections, key=lambda d: d.phrase.start):
        try:
            cut = _conditioning_image(crop(image, detection.box), crop_size)
        except ValueError as err:
            skipped.add("crop_failed", key, str(err))
            continue
        name = f"crop{len(images)}.png"
        inserts.append((detection.phrase, name))
        images[name] = cut
        meta.append(_crop_meta(name, detection))
    return inserts, images, meta


def stage1_record(
    key: str,
    image: Image.Image,
    caption: str,
    detections: Sequence[Detection],
    *,
    rng: random.Random,
    max_crops: int = 3,
    max_images: int = 4,
    control_probability: float = 0.3,
    control_backends: Mapping[str, ControlBackend] | None = None,
    crop_size: int | None = None,
    min_side: int = 150,
    reference_side: int = 1024,
    max_area_fraction: float = 0.75,
    head_probability: float = 0.7,
    text_only_probability: float = 0.0,
    crop_replaces_words: Collection[str] = (),
    skipped: Skipped | None = None,
) -> CaptionRecord | None:
    """A stage-1 record from the detector's raw output for this image and caption.

    Applies the paper's rules: `filter_detections`, then `choose_person_crops` (heads 70% of
    the time), then the `max_crops` best-scoring crops, inserted in caption order. With
    probability `control_probability` a control image of the whole target (kind drawn
    uniformly among `control_backends`; "canny" is always available) opens the prompt, and
    the crops are capped so that crops + control <= `max_images`. A caption with no crop
    left still gives a record (text-only examples teach the model to draw from text alone),
    with `meta["no_crops"]`. None (counted in `skipped`) for a bad image or an
    empty caption. Random draws come from `rng`, in a fixed order: the control decision and
    kind first, so they depend on the key alone, then (only if `text_only_probability` > 0)
    whether this record keeps its crops at all, then one draw per person with a head.

    `text_only_probability` (default 0, the paper's rule) drops every crop of a record on
    purpose. Real captions often have no usable box, so real data has text-only records; a
    world where every object is found (the toy renderer's boxes) needs them made, or the model
    never learns to draw from text alone and a text-only ablation falls below chance.

    `crop_replaces_words` (default none) are dropped from each phrase that gets a crop; see
    `insert_crops`. The record's `caption` stays the full caption.
    """
    skipped = skipped if skipped is not None else Skipped()
    detections = _check_inputs(key, image, caption, detections, skipped)
    if detections is None:
        return None
    target = to_rgb(image)

    backends = dict(control_backends) if control_backends is not None else {}
    backends.setdefault("canny", CannyBackend())
    kinds = sorted(backends)
    use_control = rng.random() < control_probability and max_images >= 1
    kind = kinds[min(int(rng.random() * len(kinds)), len(kinds) - 1)]
    text_only = text_only_probability > 0 and rng.random() < text_only_probability
    use_control = use_control and not text_only

    kept = filter_detections(
        detections,
        target.size,
        min_side=min_side,
        reference_side=reference_side,
        max_area_fraction=max_area_fraction,
        skipped=skipped,
        key=key,
    )
    chosen = choose_person_crops(kept, rng, head_probability)

    control_image = None
    if use_control:
        try:
            control_image = backends[kind](target)
            if not isinstance(control_image, Image.Image):
                raise TypeError(f"returned {type(control_image).__name__}, not a PIL image")
            control_image = to_rgb(control_image)
            if control_image.size != target.size:
                control_image = control_image.resize(target.size, Image.Resampling.BICUBIC)
        except Exception as err:  # a backend failing on one image must not end the batch
            skipped.add("control_failed", key, f"{kind}: {type(err).__name__}: {err}")
            control_image = None

    limit = 0 if text_only else max(0, min(max_crops, max_images - (control_image is not None)))
    best = sorted(chosen, key=lambda d: (-d.score, d.phrase.start))[:limit]
    inserts, images, crops_meta = _cut_crops(key, target, best, crop_size, skipped)

    prompt = insert_crops(caption, inserts, crop_replaces_words)
    if control_image is not None:
        prompt = f"<img:{CONTROL_NAME}>{CONTROL_PREFIX}{prompt}"
        images[CONTROL_NAME] = _conditioning_image(control_image, crop_size)
    meta = {
        "stage": 1,
        "num_crops": len(inserts),
        "crops": crops_meta,
        "control": kind if control_image is not None else None,
        "no_crops": not inserts,
        "text_only": not images,
        "image_size": list(target.size),
    }
    return CaptionRecord(key, prompt, images, target, caption, meta)


def stage2_record(
    key: str,
    image: Image.Image,
    caption: str,
    detections: Sequence[Detection],
    *,
    rng: random.Random,
    min_side: int = 252,
    reference_side: int = 1024,
    max_area_fraction: float = 0.75,
    crop_size: int | None = None,
    subject: str = "person",
    max_subjects: int | None = None,
    text_only_probability: float = 0.0,
    crop_replaces_words: Collection[str] = (),
    skipped: Skipped | None = None,
) -> CaptionRecord | None:
    """A stage-2 record: ONE high-resolution face or person crop, before the person's word.

    Stage 2 feeds each crop at 504 px (1,296 tokens), so the default `min_side` is 252 px on
    the 1024 px reference: a crop is upscaled at most ~2x (scaled with the image size, as in
    `filter_detections`). A head/face is preferred (the paper's stage 2 is about face
    quality): an auxiliary head inside a person box goes before that person's word, a face
    named in the caption before its own word. Without one, the largest person. Among
    equals, the largest box; exact ties are broken by `rng`. None (counted as "no_person")
    when no face or person survives the filter.

    `subject="any"` takes the largest detected object of any kind instead: the rule for a
    world without people (the toy profile), where stage 2 is one crop at higher resolution.

    `max_subjects` (default no limit) skips an image in which more phrases than that were
    detected (persons, or any object), small ones included (counted as "too_many_subjects"):
    the paper's stage 2 is images of one person, which `real_images.max_people` selects
    upstream for photographs; a world with several objects per image selects here.
    `text_only_probability` and `crop_replaces_words` as in `stage1_record`: a text-only
    record is drawn after the tie-break, from the same images, with `meta["text_only"]`.
    """
    if subject not in ("person", "any"):
        raise ValueError(f"subject must be 'person' or 'any', got {subject!r}")
    skipped = skipped if skipped is not None else Skipped()
    detections = _check_inputs(key, image, caption, detections, skipped)
    if detections is None:
        return None
    # Counted before the size filter: an object too small to crop is still in the picture.
    subjects = {d.phrase for d in detections if not d.phrase.auxiliary and (subject == "any" or is_person(d))}
    if max_subjects is not None and len(subjects) > max_subjects:
        skipped.add("too_many_subjects", key, f"{len(subjects)} > {max_subjects}")
        return None
    target = to_rgb(image)
    kept = filter_detections(
        detections,
        target.size,
        min_side=min_side,
        reference_side=reference_side,
        max_area_fraction=max_area_fraction,
        skipped=skipped,
        key=key,
    )
    persons = [d for d in kept if is_person(d) and not is_head(d)]
    faces: list[Detection] = []
    for head in (d for d in kept if is_head(d)):
        if not head.phrase.auxiliary:
            faces.append(head)
            continue
        owners = [p for p in persons if inside_fraction(head.box, p.box) >= HEAD_INSIDE_FRACTION]
        if owners:
            owner = max(owners, key=lambda p: box_area(p.box))
            faces.append(Detection(owner.phrase, head.box, head.score, head.label))
    candidates = faces or persons
    if subject == "any":
        candidates = [d for d in kept if not d.phrase.auxiliary]
    if not candidates:
        skipped.add("no_person" if subject == "person" else "no_object", key)
        return None
    largest = max(box_area(d.box) for d in candidates)
    ties = [d for d in candidates if math.isclose(box_area(d.box), largest)]
    chosen = ties[0] if len(ties) == 1 else rng.choice(ties)
    text_only = text_only_probability > 0 and rng.random() < text_only_probability

    inserts, images, crops_meta = [], {}, []
    if not text_only:
        inserts, images, crops_meta = _cut_crops(key, target, [chosen], crop_size, skipped)
        if not inserts:
            return None
    meta = {
        "stage": 2,
        "num_crops": len(inserts),
        "crops": crops_meta,
        "crop_kind": None if text_only else "head" if is_head(chosen) else ("person" if is_person(chosen) else "object"),
        "text_only": text_only,
        "image_size": list(target.size),
    }
    return CaptionRecord(key, insert_crops(caption, inserts, crop_replaces_words), images, target, caption, meta)

