"""Evaluation metrics: DreamBench's DINO / CLIP-I / CLIP-T, MUMU's multimodal-prompt CLIP score,
and the Wilson interval the binomial rates are reported with.

DreamBench protocol, as DreamBooth defines it:
- DINO: mean cosine similarity of DINO ViT-S/16 embeddings (`facebook/dino-vits16`, the CLS
  token of the last hidden state) between generated and reference images.
- CLIP-I: the same with CLIP ViT-B/32 image embeddings (`openai/clip-vit-base-patch32`).
- CLIP-T: cosine similarity of the CLIP image embedding and the prompt's text embedding.
"Mean" is over all (generated, reference) pairs: each generated image gets the mean over its
references, and a suite the mean over its generated images.

Multimodal-prompt CLIP score (paper §5): each object of the prompt is looked for in the output
by an open-vocabulary detector; the score of the object is the CLIP similarity between its input
image and the region found. An object that is not found scores 0 and is counted, so a model
that drops objects cannot hide behind the ones it kept. Both the object image and the region
are padded to square (black, as MUMU pads its conditioning images) before CLIP, so CLIP's
centre crop cuts nothing off either.

Every model is loaded by path (or hub id) through `from_pretrained`: tests use tiny random
models built from config (`mumu_model.testing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mumu_model.data.detection import Detector, Phrase, crop
from mumu_model.data.report import Skipped
# CLIP-I and CLIP-T use the project's one CLIP wrapper (also behind PickScore).
from mumu_model.data.scoring import ClipEmbedder, ImageEmbedder
from mumu_model.images import pad_to_square, to_rgb

CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_MODEL = "facebook/dino-vits16"


class DinoEmbedder(ImageEmbedder):
    """L2-normalised DINO embeddings: `ViTModel`'s CLS token of the last hidden state (which
    has DINO's final LayerNorm applied, as DINO's own forward returns it)."""

    def __init__(
        self,
        model: str | Path = DINO_MODEL,
        *,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoImageProcessor, ViTModel

        self.processor = AutoImageProcessor.from_pretrained(str(model))
        vit = ViTModel.from_pretrained(str(model), add_pooling_layer=False, dtype=dtype, use_safetensors=True)
        super().__init__(vit, vit.config.hidden_size, batch_size=batch_size, device=device, dtype=dtype)

    def features(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state[:, 0]


# -- DreamBench metrics --------------------------------------------------------------------


def mean_cosine_to_references(generated: torch.Tensor, references: torch.Tensor) -> list[float]:
    """Per generated embedding, its mean cosine over the reference embeddings (both normalised)."""
    if len(references) == 0:
        return [math.nan] * len(generated)
    return (generated @ references.T).mean(dim=1).tolist()


def clip_i(clip: ClipEmbedder, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
    """CLIP-I of each generated image: mean cosine with the references' CLIP embeddings."""
    return mean_cosine_to_references(clip.images(generated), clip.images(references))


def dino_score(dino: DinoEmbedder, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
    """DINO of each generated image: mean cosine with the references' DINO embeddings."""
    return mean_cosine_to_references(dino.images(generated), dino.images(references))


def clip_t(clip: ClipEmbedder, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
    """CLIP-T of each (image, text) pair: cosine of the CLIP image and text embeddings."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    return (clip.images(images) * clip.texts(texts)).sum(dim=-1).tolist()


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96); (nan, nan) for no
    trials. Better than the normal approximation near 0 and 1 and at small counts."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


# -- multimodal-prompt CLIP score ----------------------------------------------------------


@dataclass(frozen=True)
class ObjectScore:
    phrase: str
    found: bool
    similarity: float  # CLIP cosine of the object image and the region found; 0.0 when not found
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class MultimodalScore:
    objects: tuple[ObjectScore, ...]

    @property
    def score(self) -> float:
        """Mean over the objects, not-found ones counting 0; NaN for a prompt without objects."""
        if not self.objects:
            return math.nan
        return sum(o.similarity for o in self.objects) / len(self.objects)

    @property
    def found(self) -> int:
        return sum(o.found for o in self.objects)

    @property
    def missing(self) -> int:
        return len(self.objects) - self.found


def _square_clip_images(clip: ClipEmbedder, images: Sequence[Image.Image]) -> torch.Tensor:
    return clip.images([pad_to_square(to_rgb(image)) for image in images])


def phrase_query(texts: Sequence[str]) -> dict[str, Phrase]:
    """The detector query of `texts`: each distinct phrase once (case-insensitive, keyed by its
    lower case), as spans of a ". "-joined caption, GroundingDINO's form."""
    phrases: dict[str, Phrase] = {}
    position = 0
    for text in texts:
        lower = text.lower()
        if lower not in phrases:
            phrases[lower] = Phrase(text, position, position + len(text))
            position += len(text) + 2
    return phrases


def multimodal_clip_score(
    clip: ClipEmbedder,
    detector: Detector,
    outputs: Sequence[Image.Image],
    objects: Sequence[tuple[Image.Image, str]],
    *,
    keys: Sequence[str] | None = None,
    skipped: Skipped | None = None,
) -> list[MultimodalScore]:
    """Per output image, the multimodal CLIP score of the prompt's `objects` (image, phrase).

    One detector call for all outputs, each asked for every distinct phrase at once. Matching:
    objects in prompt order each take, among the not yet taken detections of their phrase, the
    one most CLIP-similar to their image, so two "dog" objects need two dogs in the output.
    `keys` name the outputs for the detector (`AnnotationsDetector` looks boxes up by key).
    """
    outputs = [to_rgb(image) for image in outputs]
    keys = list(keys) if keys is not None else [str(i) for i in range(len(outputs))]
    if len(keys) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(keys)} keys")
    if not objects:
        return [MultimodalScore(()) for _ in outputs]

    phrases = phrase_query([text for _, text in objects])
    query = list(phrases.values())
    detections = detector.detect(outputs, [query] * len(outputs), keys=keys, skipped=skipped)

    object_embeds = _square_clip_images(clip, [image for image, _ in objects])
    results = []
    for output, found in zip(outputs, detections):
        found = [d for d in found if d.phrase in query]
        regions = [crop(output, d.box) for d in found]
        region_embeds = _square_clip_images(clip, regions) if regions else torch.empty(0, object_embeds.shape[1])
        similarity = object_embeds @ region_embeds.T  # [objects, detections]
        taken: set[int] = set()
        scores = []
        for index, (_, text) in enumerate(objects):
            phrase = phrases[text.lower()]
            candidates = [j for j, d in enumerate(found) if d.phrase == phrase and j not in taken]
            if not candidates:
                scores.append(ObjectScore(text, False, 0.0))
                continue
            best = max(candidates, key=lambda j: float(similarity[index, j]))
            taken.add(best)
            scores.append(ObjectScore(text, True, float(similarity[index, best]), found[best].box))
        results.append(MultimodalScore(tuple(scores)))
    return results


__all__ = [
    "CLIP_MODEL",
    "DINO_MODEL",
    "ClipEmbedder",
    "DinoEmbedder",
    "MultimodalScore",
    "ObjectScore",
    "clip_i",
    "clip_t",
    "dino_score",
    "mean_cosine_to_references",
    "multimodal_clip_score",
    "phrase_query",
    "wilson_interval",
]
