"""The slot-binding judge: in an output of a prompt with several image slots, which reference
ended up where. Open and local: a detector and image embeddings, no closed-model judge.

Each slot of an entry is one of its `objects` (a reference image and the phrase that names it in
the prompt: `a <img:man.png> man and his <img:dog.png> dog`). Per output image:

1. The detector looks for every slot's phrase (one query, as the multimodal CLIP score asks);
   boxes of one phrase that overlap by more than `nms_iou` are one object (the best-scoring).
2. Every detected object and every reference are embedded (DINO and / or CLIP, padded to
   square; with both, the cosines are averaged): `similarity[object, reference]`. A person
   (`mumu_model.data.detection.is_person`) with a face in its box is compared by face instead,
   when a face embedder is given: the cosine of its face with each reference's main face (-1
   for a reference without one). Every decision below compares within one object's row or
   among objects of one phrase, so rows of either kind never meet.
3. Slots take objects of their own phrase, one each, by the assignment that maximises the
   similarity of each object to its slot's reference (order-independent, unlike a greedy pass).

Per slot, exactly one of:
- `bound`: its object is more similar to its own reference than to every other slot's;
- `leaked`: its object is found but another slot's reference is nearer (an identity leak);
- `missing`: no object of its phrase was left for it (counted, never a silent 0).
and, apart:
- `duplicated`: two or more detected objects have its reference as their nearest reference;
- `copy_paste`: its object is near-identical to its reference: similarity at least
  `copy_similarity` and SSIM at least `copy_ssim` once both are resized to one grey square
  (pose, scale and pixels kept), so a high DINO score can be read honestly.

Columns of a row (`BindingJudgement.row`): `n_slots`; the shares of the image's slots
`slot_bound`, `slot_leaked`, `slot_missing`, `slot_duplicated`, `slot_copy_paste`; `all_bound`
(1.0 when every slot is bound); `leakage`, the mean over found slots of (nearest other
reference's similarity - own reference's similarity): below 0 each object is nearer its own;
and `slot_outcomes`, what the judge saw, as text. `eval.scoring` turns the shares into rates
over slots (`all_bound` over images), each with its 95% Wilson interval. The toy world reports
the same names from its analytic probe (`mumu_model.toy.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from mumu_model.data.detection import Box, Detection, Detector, crop, is_person
from mumu_model.data.scoring import ImageEmbedder
from mumu_model.images import pad_to_square, to_rgb

from .faces import FaceEmbedder, cosine
from .metrics import phrase_query

# The judge's rates and what each counts: slots (trials = `n_slots` of a row) or images (None).
SLOT_TRIALS = "n_slots"
BINDING_RATES: Mapping[str, str | None] = {
    "slot_bound": SLOT_TRIALS, "all_bound": None, "slot_leaked": SLOT_TRIALS,
    "slot_missing": SLOT_TRIALS, "slot_duplicated": SLOT_TRIALS, "slot_copy_paste": SLOT_TRIALS,
}
BINDING_MEANS = ("leakage",)
# Copy-paste compares grey squares of this side: large enough for SSIM's 7-pixel window.
_SSIM_SIDE = 64


@dataclass(frozen=True)
class SlotJudgement:
    phrase: str
    found: bool
    own: float  # similarity of its object to its own reference; NaN when missing
    nearest_other: float  # highest similarity of its object to another slot's reference; NaN when missing
    duplicated: bool
    copy_paste: bool
    box: Box | None = None

    @property
    def bound(self) -> bool:
        return self.found and self.own > self.nearest_other

    @property
    def leaked(self) -> bool:
        return self.found and not self.bound

    @property
    def outcome(self) -> str:
        outcome = "bound" if self.bound else "leaked" if self.found else "missing"
        return outcome + ("+duplicated" if self.duplicated else "") + ("+copy" if self.copy_paste else "")


@dataclass(frozen=True)
class BindingJudgement:
    slots: tuple[SlotJudgement, ...]

    def row(self) -> dict[str, float | str]:
        """The row columns of one output (module docstring)."""
        n = len(self.slots)
        found = [s for s in self.slots if s.found]
        return {
            SLOT_TRIALS: n,
            "slot_bound": sum(s.bound for s in self.slots) / n,
            "all_bound": float(all(s.bound for s in self.slots)),
            "slot_leaked": sum(s.leaked for s in self.slots) / n,
            "slot_missing": sum(not s.found for s in self.slots) / n,
            "slot_duplicated": sum(s.duplicated for s in self.slots) / n,
            "slot_copy_paste": sum(s.copy_paste for s in self.slots) / n,
            "leakage": float(np.mean([s.nearest_other - s.own for s in found])) if found else math.nan,
            "slot_outcomes": ", ".join(f"{s.phrase}:{s.outcome}" for s in self.slots),
        }


def _iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _one_box_per_object(detections: Sequence[Detection], iou: float) -> list[Detection]:
    """Per phrase, the best-scoring of boxes that overlap by more than `iou` (GroundingDINO often
    boxes one object twice, which would read as a duplicate)."""
    kept: list[Detection] = []
    for detection in sorted(detections, key=lambda d: -d.score):
        if all(k.phrase != detection.phrase or _iou(k.box, detection.box) <= iou for k in kept):
            kept.append(detection)
    return kept


def structural_similarity(a: Image.Image, b: Image.Image) -> float:
    """SSIM of two images after aligning them: both resized to one grey square."""
    from skimage.metrics import structural_similarity as ssim

    grey = [np.asarray(to_rgb(image).convert("L").resize((_SSIM_SIDE, _SSIM_SIDE), Image.BILINEAR), dtype=np.float64)
            for image in (a, b)]
    return float(ssim(grey[0], grey[1], data_range=255.0))


def slot_problem(slots: Sequence[tuple[Image.Image, str]]) -> str | None:
    """Why these slots cannot be judged, or None: fewer than two, or two with the same reference
    image (no similarity could tell their objects apart)."""
    if len(slots) < 2:
        return f"the binding judge needs two or more slots, got {len(slots)}"
    seen: dict[bytes, int] = {}
    for index, (image, _) in enumerate(slots):
        rgb = to_rgb(image)
        pixels = f"{rgb.size}".encode() + rgb.tobytes()
        if pixels in seen:
            return f"slots {seen[pixels]} and {index} have the same reference image: binding cannot tell them apart"
        seen[pixels] = index
    return None


@dataclass
class BindingJudge:
    """Judges the slots of multi-subject outputs (module docstring); `embedders` are DINO and / or
    CLIP (`eval.metrics.DinoEmbedder`, `ClipEmbedder`), their cosines averaged; `face` compares
    people by face."""

    detector: Detector
    embedders: Sequence[ImageEmbedder]
    face: FaceEmbedder | None = None
    copy_similarity: float = 0.9
    copy_ssim: float = 0.8
    nms_iou: float = 0.5

    def __post_init__(self) -> None:
        if not self.embedders:
            raise ValueError("the binding judge needs at least one image embedder (DINO or CLIP)")

    def _similarity(self, objects: Sequence[Image.Image], references: Sequence[torch.Tensor]) -> torch.Tensor:
        """[objects, references] cosines, averaged over the embedders (`references`: one per embedder)."""
        squares = [pad_to_square(to_rgb(image)) for image in objects]
        embeds = [embedder.images(squares) for embedder in self.embedders]
        return torch.stack([e @ r.T for e, r in zip(embeds, references)]).mean(dim=0)

    def judge(
        self,
        outputs: Sequence[Image.Image],
        slots: Sequence[tuple[Image.Image, str]],
        *,
        keys: Sequence[str] | None = None,
    ) -> list[BindingJudgement]:
        """Per output, the judgement of every slot (reference image, phrase), in slot order.
        `keys` name the outputs for the detector (`AnnotationsDetector` looks boxes up by key)."""
        problem = slot_problem(slots)
        if problem:
            raise ValueError(problem)
        outputs = [to_rgb(image) for image in outputs]
        keys = list(keys) if keys is not None else [str(i) for i in range(len(outputs))]
        if len(keys) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(keys)} keys")
        phrases = phrase_query([text for _, text in slots])
        query = list(phrases.values())
        slot_phrases = [phrases[text.lower()] for _, text in slots]
        detections = self.detector.detect(outputs, [query] * len(outputs), keys=keys)
        references = [image for image, _ in slots]
        reference_embeds = [e.images([pad_to_square(to_rgb(r)) for r in references]) for e in self.embedders]
        reference_faces = None

        judgements = []
        for output, found in zip(outputs, detections):
            found = _one_box_per_object([d for d in found if d.phrase in query], self.nms_iou)
            regions = [crop(output, d.box) for d in found]
            similarity = (self._similarity(regions, reference_embeds).numpy() if regions
                          else np.empty((0, len(slots))))  # [objects, slots]
            for row, (detection, region) in enumerate(zip(found, regions)):
                if self.face is None or not is_person(detection) or not (faces := self.face.faces(region)):
                    continue
                if reference_faces is None:  # once per call, and only when a person shows a face
                    reference_faces = [next(iter(self.face.faces(r)), None) for r in references]
                similarity[row] = [cosine(faces[0].embedding, f.embedding) if f is not None else -1.0
                                   for f in reference_faces]
            # Each slot takes one object of its own phrase, maximising total own-reference similarity.
            allowed = np.array([[d.phrase == p for d in found] for p in slot_phrases], dtype=bool)
            allowed = allowed.reshape(len(slots), len(found))
            cost = np.where(allowed, -similarity.T, 1e6)
            rows, cols = linear_sum_assignment(cost) if len(found) else ([], [])
            assigned = {int(r): int(c) for r, c in zip(rows, cols) if allowed[r, c]}
            nearest = similarity.argmax(axis=1) if len(found) else np.empty(0, dtype=int)
            slot_judgements = []
            for index, (reference, text) in enumerate(slots):
                duplicated = int((nearest == index).sum()) >= 2
                j = assigned.get(index)
                if j is None:
                    slot_judgements.append(SlotJudgement(text, False, math.nan, math.nan, duplicated, False))
                    continue
                own = float(similarity[j, index])
                other = float(np.delete(similarity[j], index).max())
                copy = own >= self.copy_similarity and structural_similarity(regions[j], reference) >= self.copy_ssim
                slot_judgements.append(SlotJudgement(text, True, own, other, duplicated, copy, found[j].box))
            judgements.append(BindingJudgement(tuple(slot_judgements)))
        return judgements


def binding_headline(metrics: Mapping[str, float]) -> str:
    """A suite's binding figures in a line, each rate with its 95% interval; "" without them."""

    def rate(label: str, name: str) -> str:
        value = metrics.get(name)
        if value is None or math.isnan(value):
            return ""
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        interval = f" ({low:.0%}-{high:.0%})" if low is not None and high is not None else ""
        return f"{label} {value:.1%}{interval}"

    if "slot_bound" not in metrics:
        return ""
    shown = [("bound", "slot_bound"), ("all slots bound", "all_bound"), ("leaked", "slot_leaked"),
             ("missing", "slot_missing"), ("duplicated", "slot_duplicated"), ("copy-paste", "slot_copy_paste")]
    slots = metrics.get(SLOT_TRIALS)
    head = f"{int(slots)} slots: " if slots is not None and not math.isnan(slots) else ""
    return head + ", ".join(part for label, name in shown if (part := rate(label, name)))


__all__ = [
    "BINDING_MEANS",
    "BINDING_RATES",
    "SLOT_TRIALS",
    "BindingJudge",
    "BindingJudgement",
    "SlotJudgement",
    "binding_headline",
    "slot_problem",
    "structural_similarity",
]
