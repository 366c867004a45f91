"""Find the caption's objects in its image: phrases, detectors, and the paper's crop rules.

The bootstrapping step of MUMU (paper §4): an open-vocabulary detector
(GroundingDINO) looks for the caption's noun phrases in the image; crops that are too small or
too large are dropped; a detected person is replaced by their head 70% of the time. The crops
are then inserted into the caption before their words (`mumu_model.data.captions`).

- `caption_phrases`: the noun phrases of a caption, by a small documented heuristic chunker
  (no spaCy/NLTK: their models are downloads).
- `Detector`: `detect(images, phrases) -> detections`. Two backends: `GroundingDinoDetector`
  (transformers, one forward per batch of images with all phrases of an image in one query)
  and `AnnotationsDetector` (known boxes, e.g. from a renderer that knows where it drew).
- `filter_detections`, `choose_person_crops`, `crop`: the paper's crop rules.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from ..images import to_rgb
from .report import Skipped

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels


@dataclass(frozen=True)
class Phrase:
    """A noun phrase of a caption: `text == caption[start:end]`, `start` at its first word.

    An *auxiliary* phrase (`start == end == -1`, see `HEAD_PHRASE`) is something the detector
    is asked for that is not in the caption; it is never inserted into a prompt.
    """

    text: str
    start: int
    end: int

    @property
    def auxiliary(self) -> bool:
        return self.start < 0


@dataclass(frozen=True)
class Detection:
    phrase: Phrase
    box: Box  # (x0, y0, x1, y1) in pixels of the image it was found in
    score: float
    label: str  # the detector's own text label (GroundingDINO's may differ from the phrase)


# -- phrases -------------------------------------------------------------------------------

# Words that end a noun phrase and are not part of one. Chunking rules (`caption_phrases`):
# 1. Split on punctuation and on these words: conjunctions, prepositions, pronouns,
#    auxiliaries and common caption verbs ("sits", "holds", "shows"...).
# 2. Also split on words that look like verbs: "-ing" words (except nouns such as "building",
#    or right after a determiner: "a swimming pool"), "-ed" words followed by a preposition or
#    determiner ("covered in", "dressed in"; "striped background" stays whole), and "-ly"
#    adverbs not followed by a noun ("sits quietly"; "an elderly woman" stays whole).
# 3. Determiners, possessives and numbers ("a", "the", "his", "two", "several") are stripped
#    from the front and start a new phrase; "man's dog" gives "man" and "dog". Other words
#    with an apostrophe ("it's", "don't") end a phrase.
# 4. Drop phrases whose last word is not a depictable object ("image", "photo", "left",
#    "side"...), partitives before "of" ("a pair of shoes" -> "shoes"), and predicates
#    after a copula without a determiner ("the sky is blue" -> nothing; "there is a dog" -> dog).
# 5. Keep the last 3 words (English noun phrases end with their head noun), dedupe
#    case-insensitively (the first mention wins) and keep the first `max_phrases`.
CONJUNCTIONS = frozenset("and or but nor while whereas so yet than as if because then".split())
PREPOSITIONS = frozenset(
    """in on at of with by for from to into onto over under near behind beside besides next
    against across through around above below between among amongst along inside outside
    during after before toward towards up down off out like via within without upon atop
    beneath underneath throughout past beyond about amid""".split()
)
PRONOUNS = frozenset(
    """he she it they we you i him them us me who whom which that what where when why how
    there here this these those itself himself herself themselves one's""".split()
)
COPULAS = frozenset(
    """is are was were be been am seems seem appears appear looks look becomes it's that's
    he's she's isn't aren't wasn't weren't""".split()
)
VERBS = COPULAS | frozenset(
    """being has have had does do did can could will would should may might must shall
    sits sit stands stand holds hold wears wear walks walk runs lies lie lays rests rest
    plays play rides ride shows show features depicts depict contains contain includes
    include displays display captures capture reveals gives creates adds makes takes uses
    overlooks surrounds covers fills reaches climbs kneels points waves hugs kisses smiles
    poses eats drinks carries jumps swims flies reads leans hangs grazes waits stares gazes
    seen made worn held taken drawn written shown built set placed there's here's""".split()
)
OTHER_STOPS = frozenset(
    """not no also very too just only even still really quite rather almost mostly slightly
    each other overall together either neither yes perhaps possibly likely""".split()
)
DETERMINERS = frozenset(
    """a an the this these those some any every another other such all both several many
    few multiple various numerous much more most own my your his her its our their whose
    one two three four five six seven eight nine ten eleven twelve twenty hundred dozen
    single first second third last""".split()
)
# Phrase-final words that name no object one could crop.
NON_OBJECTS = frozenset(
    """image images picture pictures photo photos photograph photography scene shot frame
    illustration artwork render rendering style view depiction composition atmosphere
    setting mood focus detail details overall left right side sides top bottom middle
    center centre front back foreground distance corner edge area part parts way lot lots
    thing things    something anything everything nothing someone anyone everyone time day moment color
    colors colour colours shade shades tone tones""".split()
)
PARTITIVES = frozenset(
    """pair group couple bunch lot lots set number kind type sort piece variety collection
    close-up closeup row pile stack herd flock crowd array series range assortment""".split()
)
ING_NOUNS = frozenset(
    """building buildings painting paintings clothing ceiling wedding thing things string
    strings spring ring rings king wing wings swing swings sting sling morning evening
    pudding earring earrings railing bedding stuffing frosting icing sibling siblings
    duckling ducklings dumpling dumplings lightning awning darling stocking stockings
    landing""".split()
)
LY_NOUNS = frozenset("family butterfly belly lily jelly fly holly bully rally ally italy".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+|-[A-Za-z0-9]+)*")
_POSSESSIVE = re.compile(r"'s$")


def _is_boundary(lower: str, next_lower: str | None, current_empty: bool, after_det: bool) -> bool:
    """Whether a word ends the current phrase (rule 1-2 above)."""
    if lower in CONJUNCTIONS or lower in PREPOSITIONS or lower in PRONOUNS:
        return True
    if lower in VERBS or lower in OTHER_STOPS or "'" in lower:  # "don't", "they're"
        return True
    if lower.endswith("ing") and len(lower) > 4 and lower not in ING_NOUNS:
        # "a hiking boot", "his swimming pool": right after a determiner it is a modifier.
        return not (current_empty and after_det)
    if lower.endswith("ed") and len(lower) > 4 and next_lower is not None:
        return next_lower in PREPOSITIONS or next_lower in DETERMINERS
    if lower.endswith("ly") and len(lower) > 4 and lower not in LY_NOUNS:
        return next_lower is None or _is_stop(next_lower)
    return False


def _is_stop(lower: str) -> bool:
    return (
        lower in CONJUNCTIONS
        or lower in PREPOSITIONS
        or lower in PRONOUNS
        or lower in VERBS
        or lower in OTHER_STOPS
        or (lower.endswith("ing") and len(lower) > 4 and lower not in ING_NOUNS)
    )


def caption_phrases(caption: str, max_phrases: int = 8) -> list[Phrase]:
    """The noun phrases to look for in the caption's image, in caption order (rules above).

    >>> [p.text for p in caption_phrases("a man and his dog hiking in the wilderness")]
    ['man', 'dog', 'wilderness']
    """
    if not isinstance(caption, str) or max_phrases <= 0:
        return []
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(caption)]
    phrases: list[Phrase] = []
    seen: set[str] = set()
    current: list[tuple[int, int]] = []  # (start, end) of the words of the open phrase
    state = {"after_det": False, "has_det": False, "predicate": False}

    def flush(next_lower: str | None = None) -> None:
        chunk, current[:] = current[:], []
        has_det, predicate = state["has_det"], state["predicate"]
        state["has_det"] = False
        if not chunk:
            return
        last = caption[chunk[-1][0] : chunk[-1][1]].lower()
        if last in NON_OBJECTS or (last in PARTITIVES and next_lower == "of"):
            return
        if predicate and not has_det:  # "the sky is blue": an adjective, not an object
            return
        if last.isdigit():
            return
        chunk = chunk[-3:]
        start, end = chunk[0][0], chunk[-1][1]
        text = caption[start:end]
        if text.lower() not in seen:
            seen.add(text.lower())
            phrases.append(Phrase(text, start, end))

    previous_end = 0
    previous_lower = ""
    for index, (word, start, end) in enumerate(words):
        lower = word.lower().replace("’", "'")
        next_lower = words[index + 1][0].lower() if index + 1 < len(words) else None
        if caption[previous_end:start].strip():  # punctuation between words ends a phrase
            flush(lower)
            state["predicate"] = False
            state["after_det"] = False
        previous_end = end

        if _POSSESSIVE.search(lower) and lower[:-2] not in PRONOUNS and len(lower) > 2:
            # "a man's dog": "man" is a phrase of its own and "dog" starts the next one.
            current.append((start, end - 2))
            flush(None)
            state["after_det"] = True
            state["has_det"] = True
        elif lower in DETERMINERS or lower.isdigit():
            flush(lower)
            state["after_det"] = True
            state["has_det"] = True
        elif _is_boundary(lower, next_lower, not current, state["after_det"]):
            flush(lower)
            if lower in COPULAS:
                # "there is a dog" is existential, not a predicate.
                state["predicate"] = previous_lower not in ("there", "here")
            elif lower not in CONJUNCTIONS:
                state["predicate"] = False
            state["after_det"] = False
        else:
            current.append((start, end))
            state["after_det"] = False
        previous_lower = lower
    flush(None)
    return phrases[:max_phrases]


# -- person and head words -----------------------------------------------------------------

# A detection is a person when the last word of its phrase (or label) is one of these.
PERSON_WORDS = frozenset(
    """man men woman women person persons people boy boys girl girls child children kid kids
    baby babies toddler lady ladies guy guys gentleman gentlemen adult adults teenager
    teenagers teen teens human humans individual player players astronaut astronauts soldier
    soldiers worker workers doctor nurse chef athlete dancer dancers student students
    businessman businesswoman bride groom mother father mom dad son daughter grandmother
    grandfather""".split()
)
HEAD_WORDS = frozenset({"head", "face"})

# What to ask the detector for when a caption mentions a person: not in the caption, so it is
# an auxiliary phrase; its detections only ever replace a person's crop.
HEAD_PHRASE = Phrase("head", -1, -1)

# A head belongs to a person when at least this fraction of its box lies inside theirs.
HEAD_INSIDE_FRACTION = 0.8


def _last_word(text: str) -> str:
    words = _WORD.findall(text.lower())
    return words[-1] if words else ""


def is_person(detection: Detection) -> bool:
    return not detection.phrase.auxiliary and (
        _last_word(detection.phrase.text) in PERSON_WORDS
        or _last_word(detection.label) in PERSON_WORDS
    )


def is_head(detection: Detection) -> bool:
    return (
        _last_word(detection.phrase.text) in HEAD_WORDS or _last_word(detection.label) in HEAD_WORDS
    )


def with_head_query(phrases: Sequence[Phrase]) -> list[Phrase]:
    """`phrases` plus `HEAD_PHRASE` when one of them is a person and none is a head or face,
    so that the detector also looks for the head that `choose_person_crops` may use."""
    phrases = list(phrases)
    words = [_last_word(p.text) for p in phrases]
    if any(w in PERSON_WORDS for w in words) and not any(w in HEAD_WORDS for w in words):
        phrases.append(HEAD_PHRASE)
    return phrases


# -- detectors -----------------------------------------------------------------------------


@runtime_checkable
class Detector(Protocol):
    def detect(
        self,
        images: list[Image.Image],
        phrases: list[list[Phrase]],
        *,
        keys: list[str] | None = None,
        skipped: Skipped | None = None,
    ) -> list[list[Detection]]:
        """Per image, the detections of its phrases (any number per phrase, unfiltered).

        `keys` name the images (for `skipped` examples; `AnnotationsDetector` needs them).
        Bad items are counted in `skipped` and get an empty list, never an exception.
        """
        ...


def _valid_image(image: object) -> bool:
    return isinstance(image, Image.Image) and image.width > 0 and image.height > 0


def _clamp_box(box: Sequence[float], size: tuple[int, int]) -> Box | None:
    """The box clamped to the image, or None if it is not 4 finite numbers with area > 0."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    width, height = size
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def _best_overlap(label_tokens: set[str], phrase_tokens: list[set[str]]) -> list[int]:
    """Indices of the phrases sharing the largest fraction of their tokens with the label.

    The fraction is taken of the phrase's tokens, so a label that names only part of a phrase
    ("wild" for "wild ##erness") still matches it, and a label that merges several phrases
    ("man dog") ties between them. Empty when nothing overlaps.
    """
    best, candidates = 0.0, []
    for index, tokens in enumerate(phrase_tokens):
        if not tokens:
            continue
        overlap = len(label_tokens & tokens) / len(tokens)
        if overlap > best + 1e-9:
            best, candidates = overlap, [index]
        elif overlap > 0 and abs(overlap - best) <= 1e-9:
            candidates.append(index)
    return candidates


def _key(keys: list[str] | None, index: int) -> str:
    return keys[index] if keys is not None and index < len(keys) else str(index)


class GroundingDinoDetector:
    """GroundingDINO (transformers) on a batch of images, all phrases of an image in one query.

    GroundingDINO was trained on queries like "man. dog. wilderness.": every phrase of an
    image goes into one text, and `batch_size` images go through one forward. Tools that run
    one forward per phrase pay the image backbone and encoder once per phrase
    (bench/detection_batching.py measures the difference).

    Each box's label comes from `post_process_grounded_object_detection` (the query tokens whose
    probability passes `text_threshold`). It may name part of a phrase, or merge several; it is
    mapped back by token overlap (`_best_overlap`), ties broken by the box's own probability on
    each phrase's tokens. Boxes whose label names no phrase are dropped and counted.
    """

    def __init__(
        self,
        model: str,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = GroundingDinoForObjectDetection.from_pretrained(model, dtype=dtype)
        self.model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.tokenizer = self.processor.tokenizer
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_text_len = int(self.model.config.max_text_len)
        # The model splits its query into phrases at these tokens (SPECIAL_TOKENS in
        # modeling_grounding_dino); the phrase separator of the query is ".".
        self._dot_id = self.tokenizer.convert_tokens_to_ids(".")
        self._special = set(self.tokenizer.all_special_tokens) | {".", "?"}

    def _tokens(self, text: str) -> list[str]:
        return [t for t in self.tokenizer.tokenize(text.lower()) if t not in self._special]

    def _query(self, phrases: list[Phrase], key: str, skipped: Skipped) -> list[Phrase]:
        """The phrases that go into the query: deduped, non-empty, and within max_text_len."""
        kept: list[Phrase] = []
        seen: set[str] = set()
        length = 2  # [CLS] and [SEP]
        for phrase in phrases:
            text = _query_text(phrase)
            tokens = self._tokens(text)
            if text in seen:
                continue
            if not tokens:  # only words outside the vocabulary ([UNK]) or punctuation
                skipped.add("phrase_without_tokens", key, phrase.text)
                continue
            if length + len(tokens) + 1 > self.max_text_len:
                skipped.add("phrase_over_max_text_len", key, phrase.text)
                continue
            seen.add(text)
            kept.append(phrase)
            length += len(tokens) + 1
        return kept

    @torch.no_grad()
    def detect(
        self,
        images: list[Image.Image],
        phrases: list[list[Phrase]],
        *,
        keys: list[str] | None = None,
        skipped: Skipped | None = None,
    ) -> list[list[Detection]]:
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        skipped = skipped if skipped is not None else Skipped()
        results: list[list[Detection]] = [[] for _ in images]
        todo: list[tuple[int, Image.Image, list[Phrase]]] = []
        for index, (image, image_phrases) in enumerate(zip(images, phrases)):
            key = _key(keys, index)
            if not _valid_image(image):
                skipped.add("bad_image", key, type(image).__name__)
                continue
            query = self._query(list(image_phrases), key, skipped)
            if not query:
                skipped.add("no_phrases", key)
                continue
            todo.append((index, to_rgb(image), query))

        for begin in range(0, len(todo), self.batch_size):
            batch = todo[begin : begin + self.batch_size]
            detections = self._detect_batch(batch, keys, skipped)
            for (index, _, _), found in zip(batch, detections):
                results[index] = found
        return results

    def _detect_batch(
        self,
        batch: list[tuple[int, Image.Image, list[Phrase]]],
        keys: list[str] | None,
        skipped: Skipped,
    ) -> list[list[Detection]]:
        texts = [". ".join(_query_text(p) for p in query) + "." for _, _, query in batch]
        inputs = self.processor(
            images=[image for _, image, _ in batch], text=texts, return_tensors="pt", padding=True
        )
        inputs = {
            name: value.to(self.device, self.dtype if value.is_floating_point() else None)
            for name, value in inputs.items()
        }
        outputs = self.model(**inputs)  # the one forward of this batch
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        target_sizes = [(image.height, image.width) for _, image, _ in batch]
        processed = self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=target_sizes,
        )
        probs = outputs.logits.sigmoid()  # (batch, queries, max_text_len)
        keep = probs.max(dim=-1).values > self.box_threshold  # the boxes post-processing kept

        results: list[list[Detection]] = []
        for row, ((index, image, query), result) in enumerate(zip(batch, processed)):
            key = _key(keys, index)
            spans = self._phrase_positions(inputs["input_ids"][row].tolist(), len(query))
            phrase_tokens = [set(self._tokens(_query_text(p))) for p in query]
            box_probs = probs[row][keep[row]]
            detections = []
            for box_index, (box, score, label) in enumerate(
                zip(result["boxes"].tolist(), result["scores"].tolist(), result["text_labels"])
            ):
                candidates = _best_overlap(set(self._tokens(label)), phrase_tokens)
                if not candidates:
                    skipped.add("unmatched_label", key, repr(label))
                    continue
                if len(candidates) > 1:  # a merged label: the phrase this box is most about
                    token_probs = box_probs[box_index]
                    candidates.sort(
                        key=lambda i: -max((float(token_probs[t]) for t in spans[i]), default=0.0)
                    )
                clamped = _clamp_box(box, image.size)
                if clamped is None:
                    skipped.add("empty_box", key, repr(label))
                    continue
                detections.append(Detection(query[candidates[0]], clamped, float(score), label))
            results.append(detections)
        return results

    def _phrase_positions(self, input_ids: list[int], count: int) -> list[list[int]]:
        """Token positions of each of the query's `count` phrases: the k-th phrase lies
        between the (k-1)-th and k-th "." of the query (after [CLS])."""
        spans: list[list[int]] = [[] for _ in range(count)]
        phrase = 0
        for position, token_id in enumerate(input_ids[1:], start=1):
            if phrase >= count:
                break
            if token_id == self._dot_id:
                phrase += 1
            else:
                spans[phrase].append(position)
        return spans


def _query_text(phrase: Phrase) -> str:
    """GroundingDINO's query form of a phrase: lower case, no "." or "?" (its separators)."""
    return " ".join(re.sub(r"[.?]", " ", phrase.text.lower()).split())


def _singular(word: str) -> str:
    """A crude singular ("circles" -> "circle"), enough to match annotations to captions."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _annotation_words(text: str) -> set[str]:
    return {_singular(word) for word in _WORD.findall(text.lower())}


class AnnotationsDetector:
    """Serves known boxes in the `Detector` format: `boxes_by_key[key]` is a list of
    `(word, box)`; each word is matched to the image's phrases by word overlap (ties: the
    phrase whose last word the annotation names, then caption order). Score 1.0."""

    def __init__(self, boxes_by_key: Mapping[str, Sequence[tuple[str, Sequence[float]]]]):
        self.boxes_by_key = boxes_by_key

    def detect(
        self,
        images: list[Image.Image],
        phrases: list[list[Phrase]],
        *,
        keys: list[str] | None = None,
        skipped: Skipped | None = None,
    ) -> list[list[Detection]]:
        if keys is None:
            raise ValueError("AnnotationsDetector needs keys= to look up each image's boxes")
        if not len(images) == len(phrases) == len(keys):
            raise ValueError(f"{len(images)} images, {len(phrases)} phrase lists, {len(keys)} keys")
        skipped = skipped if skipped is not None else Skipped()
        results: list[list[Detection]] = []
        for image, image_phrases, key in zip(images, phrases, keys):
            detections: list[Detection] = []
            results.append(detections)
            if not _valid_image(image):
                skipped.add("bad_image", key, type(image).__name__)
                continue
            annotations = self.boxes_by_key.get(key)
            if annotations is None:
                skipped.add("no_annotations", key)
                continue
            phrase_words = [_annotation_words(p.text) for p in image_phrases]
            for word, box in annotations:
                words = _annotation_words(str(word))
                candidates = _best_overlap(words, phrase_words)
                if not candidates:
                    skipped.add("unmatched_annotation", key, repr(word))
                    continue
                last = _singular(_last_word(str(word)))
                # Stable sort: phrases whose head noun the annotation names first.
                candidates.sort(key=lambda i: _singular(_last_word(image_phrases[i].text)) != last)
                clamped = _clamp_box(box, image.size)
                if clamped is None:
                    skipped.add("empty_box", key, repr(word))
                    continue
                detections.append(Detection(image_phrases[candidates[0]], clamped, 1.0, str(word)))
        return results


# -- crop rules ----------------------------------------------------------------------------


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def filter_detections(
    detections: Sequence[Detection],
    image_size: tuple[int, int],
    *,
    min_side: int = 150,
    reference_side: int = 1024,
    max_area_fraction: float = 0.75,
    skipped: Skipped | None = None,
    key: str = "",
) -> list[Detection]:
    """The paper's crop filter, then the best-scoring box per phrase, in caption order.

    The paper drops crops under 150x150 px of area on its ~1024 px images (SDXL renders and
    high-resolution photos). The threshold scales with the image: a crop is too small when
    its area is under `(min_side * s) ** 2` with `s = max(image_size) / reference_side`, so
    the same rule keeps the same crops of the same scene at 512 px or on the 32 px toy world.
    A crop over `max_area_fraction` of the image is the whole scene, not an object.
    Drops are counted in `skipped` by reason.
    """
    skipped = skipped if skipped is not None else Skipped()
    width, height = image_size
    scale = max(width, height) / reference_side
    min_area = (min_side * scale) ** 2
    image_area = width * height
    best: dict[Phrase, Detection] = {}
    for detection in detections:
        box = _clamp_box(detection.box, image_size)
        if box is None:
            skipped.add("invalid_box", key, detection.phrase.text)
            continue
        area = box_area(box)
        if area < min_area:
            skipped.add("crop_too_small", key, f"{detection.phrase.text} {area:.0f} px^2")
            continue
        if area > max_area_fraction * image_area:
            skipped.add("crop_too_large", key, f"{detection.phrase.text} {area / image_area:.0%}")
            continue
        detection = replace(detection, box=box)
        previous = best.get(detection.phrase)
        if previous is None:
            best[detection.phrase] = detection
            continue
        # Higher score wins; on a tie the larger box (more pixels for the encoder).
        if (detection.score, area) > (previous.score, box_area(previous.box)):
            best[detection.phrase] = detection
        skipped.add("not_best_for_phrase", key, detection.phrase.text)
    return sorted(best.values(), key=lambda d: d.phrase.start)


def inside_fraction(inner: Box, outer: Box) -> float:
    x0, y0 = max(inner[0], outer[0]), max(inner[1], outer[1])
    x1, y1 = min(inner[2], outer[2]), min(inner[3], outer[3])
    area = box_area(inner)
    return box_area((x0, y0, x1, y1)) / area if area > 0 else 0.0


def choose_person_crops(
    detections: Sequence[Detection], rng: random.Random, head_probability: float = 0.7
) -> list[Detection]:
    """Replace person crops by their head crop with probability `head_probability` (paper: 70%).

    A person is a detection whose phrase or label ends in a `PERSON_WORDS` word; their head is
    the best-scoring head/face detection with at least `HEAD_INSIDE_FRACTION` of its box inside
    the person's box. The replacement keeps the person's phrase (the head crop goes before
    "man") and takes the head's box, score and label. One `rng.random()` is drawn per person
    with a head, in input order, so a seeded rng (callers seed it from the record id) gives
    the same choice every run. Auxiliary detections (`HEAD_PHRASE`) are not returned; a head
    that is a caption phrase of its own ("her face") keeps its own crop and is not also used
    in place of the person.
    """
    heads = [d for d in detections if is_head(d)]
    chosen: list[Detection] = []
    for detection in detections:
        if detection.phrase.auxiliary:
            continue
        if is_person(detection) and not is_head(detection):
            inside = [
                head
                for head in heads
                if inside_fraction(head.box, detection.box) >= HEAD_INSIDE_FRACTION
            ]
            if inside:
                head = max(inside, key=lambda d: (d.score, box_area(d.box)))
                if rng.random() < head_probability and head.phrase.auxiliary:
                    detection = replace(detection, box=head.box, score=head.score, label=head.label)
        chosen.append(detection)
    return chosen


def crop(image: Image.Image, box: Sequence[float], pad_fraction: float = 0.0) -> Image.Image:
    """The RGB crop of `box` (grown by `pad_fraction` of its size on each side), clamped.

    Tight by default: the model copies colour that intrudes at a crop's edge.
    Coordinates are rounded outward so the crop always contains the whole box.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    pad_x, pad_y = (x1 - x0) * pad_fraction, (y1 - y0) * pad_fraction
    left = max(0, math.floor(x0 - pad_x))
    top = max(0, math.floor(y0 - pad_y))
    right = min(image.width, math.ceil(x1 + pad_x))
    bottom = min(image.height, math.ceil(y1 + pad_y))
    if right <= left or bottom <= top:
        size = f"{image.width}x{image.height}"
        raise ValueError(f"box {tuple(box)} has no pixels inside the {size} image")
    return to_rgb(image.crop((left, top, right, bottom)))

