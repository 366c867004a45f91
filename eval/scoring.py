"""Scoring for an evaluation: every generated image against its entry, then every suite.

`load_scorers(EvalModels)` loads the metric models; `score_entry` gives one row per image (the
multimodal outputs, then the text-only ablation's); `summarize` turns a suite's rows into its
metrics and `aggregate` the suites into one set.

Metric columns of a row (one generated image): clip_t, clip_i, dino, pickscore, mm_clip
(multimodal CLIP score), mm_objects / mm_found, face_sim / face_dist / face_found /
face_total, for entries with two or more objects the slot-binding judge's columns (`eval.binding`:
n_slots, slot_bound, all_bound, slot_leaked, slot_missing, slot_duplicated, slot_copy_paste,
leakage, slot_outcomes), the metrics of the suite's world (`eval.worlds`; the toy world's colour
and object probes, and the binding columns under the same names), and for text-only rows
sdxl_clip_t. A metric whose model is not configured is absent;
a metric that does not apply to the row (no references, no faces, no world) is NaN. The
`variant` column says which prompt made the image: "multimodal" (the entry's prompt) or
"text_only" (the ablation, images removed).

Per suite (and aggregated), the multimodal rows give the metrics under their own names and the
ablation rows the same ones with a `_text_only` suffix (clip_i_text_only, images_text_only,
...), except CLIP-T: `clip_t_text_only` already names MUMU's CLIP-T on the suite's text-only
entries (against SDXL's), so the ablation's CLIP-T stays in the rows only. The binding judge's
rates are pooled over slots (`all_bound` over images), and they and a world's binomial
rates come with their 95% Wilson interval (`<rate>_ci_low`, `<rate>_ci_high`), counting images
(or objects) as independent trials: exact for one seed per entry, optimistic for several, and
its chance levels with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mumu_model.data.detection import Detector

from .binding import BINDING_MEANS, BINDING_RATES, BindingJudge, slot_problem
from .faces import FaceEmbedder, face_similarity, load_face_embedder
from .metrics import ClipEmbedder, DinoEmbedder, clip_i, clip_t, dino_score, multimodal_clip_score, wilson_interval
from .suites import EntryError, prompt_words
from .worlds import World

if TYPE_CHECKING:
    from .generation import Generated

# Metrics averaged over rows (NaN rows left out), and (COUNT_METRICS) the counters summed.
MEAN_METRICS = ("clip_t", "clip_i", "dino", "pickscore", "mm_clip", "face_sim", "face_dist", "sdxl_clip_t")
# A world's binomial rates come with a 95% Wilson interval (`{name}_ci_low`, `{name}_ci_high`).
CI_SUFFIXES = ("_ci_low", "_ci_high")
COUNT_METRICS = ("mm_objects", "mm_found", "face_total", "face_found", "n_slots")

# The `variant` of a row: the entry's own prompt, or the text-only ablation of it.
MULTIMODAL = "multimodal"
TEXT_ONLY = "text_only"
ABLATION_SUFFIX = "_text_only"
# Not summarized for the ablation: `clip_t_text_only` already means MUMU's CLIP-T on the
# text-only entries (paired with SDXL's), and the ablation has no SDXL images.
_NOT_ABLATED = ("clip_t", "sdxl_clip_t")




def _is_interval(name: str) -> bool:
    """An interval bound, of the multimodal rows or of the ablation's (`..._ci_low_text_only`):
    bounds are per suite, never averaged over suites."""
    return name.removesuffix(ABLATION_SUFFIX).endswith(CI_SUFFIXES)


@dataclass(frozen=True)
class EvalModels:
    """The models behind the metrics, as paths or hub ids; None leaves that metric out.

    `EvalModels()` is the offline default (face consistency with dlib only); `EvalModels.paper()`
    the published protocol's checkpoints. Profiles swap any field.
    """

    clip: str | Path | None = None  # CLIP-I, CLIP-T, multimodal CLIP score (CLIP ViT-B/32)
    dino: str | Path | None = None  # DINO (dino-vits16)
    pickscore: str | Path | None = None  # PickScore_v1
    pickscore_processor: str | Path | None = None  # None: PickScorer's default for the model
    detector: str | Path | Detector | None = None  # GroundingDINO (multimodal CLIP score; needs clip)
    detector_box_threshold: float = 0.35
    detector_text_threshold: float = 0.25
    face: str | FaceEmbedder | None = "dlib"  # "dlib", "dlib:DIR", "arcface", "arcface:ROOT"
    sdxl: str | Path | None = None  # base SDXL pipeline for text adherence (optional)

    @classmethod
    def paper(cls, **overrides: Any) -> EvalModels:
        """DreamBench's CLIP ViT-B/32 and DINO ViT-S/16, PickScore_v1, GroundingDINO, ArcFace
        antelopev2 (as InstantID) and SDXL base: hub ids, for machines that can reach the hub."""
        from mumu_model.data.scoring import PICKSCORE_MODEL

        from .metrics import CLIP_MODEL, DINO_MODEL

        defaults = dict(
            clip=CLIP_MODEL, dino=DINO_MODEL, pickscore=PICKSCORE_MODEL,
            detector="IDEA-Research/grounding-dino-base", face="arcface",
            sdxl="stabilityai/stable-diffusion-xl-base-1.0",
        )
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> EvalModels:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown eval model fields {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})")
        return cls(**values)

    def describe(self) -> dict[str, str]:
        """For MLflow params: each field as text (objects by class name)."""
        described = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            plain = value is None or isinstance(value, (str, Path, int, float))
            described[name] = str(value) if plain else type(value).__name__
        return described


@dataclass
class Scorers:
    """The loaded metric models; None where a metric is left out."""

    clip: ClipEmbedder | None = None
    dino: DinoEmbedder | None = None
    pickscore: Any = None  # mumu_model.data.scoring.PickScorer
    detector: Detector | None = None
    face: FaceEmbedder | None = None


def load_scorers(models: EvalModels, device: str) -> Scorers:
    """Load every model `models` names; a bad path fails here, before anything is generated."""
    scorers = Scorers()
    if models.clip is not None:
        scorers.clip = ClipEmbedder(models.clip, device=device)
    if models.dino is not None:
        scorers.dino = DinoEmbedder(models.dino, device=device)
    if models.pickscore is not None:
        from mumu_model.data.scoring import PickScorer

        processor = str(models.pickscore_processor) if models.pickscore_processor is not None else None
        scorers.pickscore = PickScorer(str(models.pickscore), processor, device=device)
    if models.detector is not None:
        if models.clip is None:
            raise ValueError("models.detector is set but models.clip is not: the multimodal CLIP score needs both")
        if isinstance(models.detector, (str, Path)):
            from mumu_model.data.detection import GroundingDinoDetector

            scorers.detector = GroundingDinoDetector(
                str(models.detector), box_threshold=models.detector_box_threshold,
                text_threshold=models.detector_text_threshold, device=device,
            )
        else:
            scorers.detector = models.detector
    scorers.face = load_face_embedder(models.face, device=device)
    return scorers


def score_entry(item: Generated, scorers: Scorers, world: World | None, errors: list[EntryError]) -> list[dict[str, Any]]:
    """The rows of an entry: one per multimodal image, then one per ablation image (if any),
    every metric computed on all of them at once against the same entry."""
    entry = item.entry
    images = item.images + item.ablation_images
    # `prompt` is what MUMU was given; `text` (what CLIP-T reads) and `text_only` are the entry's.
    rows: list[dict[str, Any]] = [
        {"suite": entry.suite, "entry": entry.id, "variant": variant, "seed": seed, "image": path,
         "prompt": prompt, "text": entry.text, "text_only": entry.text_only}
        for variant, prompt, paths in ((MULTIMODAL, entry.entry.prompt, item.paths),
                                       (TEXT_ONLY, prompt_words(entry.prompt), item.ablation_paths))
        for seed, path in zip(item.seeds, paths)
    ]
    keys = [f"{entry.suite}/{entry.id}/seed{row['seed']}" if row["variant"] == MULTIMODAL
            else f"{entry.suite}/{entry.id}/{TEXT_ONLY}/seed{row['seed']}" for row in rows]

    def put(name: str, values: Sequence[float]) -> None:
        for row, value in zip(rows, values):
            row[name] = float(value)

    if scorers.clip is not None:
        put("clip_t", clip_t(scorers.clip, images, [entry.text] * len(images)))
        put("clip_i", clip_i(scorers.clip, images, entry.references))
        if item.sdxl_images:  # text-only entries only, which have no ablation rows
            put("sdxl_clip_t", clip_t(scorers.clip, item.sdxl_images, [entry.text] * len(item.sdxl_images)))
    if scorers.dino is not None:
        put("dino", dino_score(scorers.dino, images, entry.references))
    if scorers.pickscore is not None:
        put("pickscore", scorers.pickscore.score([entry.text] * len(images), images, ids=keys))
    if scorers.detector is not None and scorers.clip is not None and entry.objects:
        scores = multimodal_clip_score(scorers.clip, scorers.detector, images, entry.objects, keys=keys)
        put("mm_clip", [s.score for s in scores])
        put("mm_objects", [len(s.objects) for s in scores])
        put("mm_found", [s.found for s in scores])
    if scorers.detector is not None and len(entry.objects) >= 2:
        # The binding judge: which reference ended up in which slot (`eval.binding`).
        embedders = [e for e in (scorers.dino, scorers.clip) if e is not None]
        problem = slot_problem(entry.objects)
        if problem:
            errors.append(EntryError(entry.suite, entry.id, f"binding: {problem}"))
        else:
            judge = BindingJudge(scorers.detector, embedders, face=scorers.face)
            judgements = judge.judge(images, entry.objects, keys=keys)
            for row, judgement in zip(rows, judgements):
                row.update(judgement.row())
    if scorers.face is not None:
        references = []
        for index, face_image in enumerate(entry.faces):
            found = scorers.face.faces(face_image)
            if not found:
                errors.append(EntryError(entry.suite, entry.id, f"faces[{index}] {entry.entry.faces[index]!r}: "
                                         f"the {scorers.face.name} detector finds no face in it"))
                continue
            references.append(found[0].embedding)
        if references:
            scores = face_similarity(scorers.face, images, references)
            put("face_sim", [s.similarity for s in scores])
            put("face_dist", [s.distance for s in scores])
            put("face_found", [s.found for s in scores])
            put("face_total", [s.total for s in scores])
    if world is not None:  # model-free: always on where the suite names a world
        for row, image in zip(rows, images):
            row.update(world.score(image, entry.world_objects))
    return rows


def summarize(rows: pd.DataFrame, world: World | None) -> dict[str, float]:
    """One suite's metrics: those of its multimodal rows, and those of its ablation rows with a
    `_text_only` suffix; the chance levels of its world's rates where they apply."""
    multimodal, ablation = _variants(rows)
    metrics = _variant_metrics(multimodal, world)
    if len(ablation):
        metrics.update({f"{name}{ABLATION_SUFFIX}": value for name, value in _variant_metrics(ablation, world).items()
                        if name not in _NOT_ABLATED})
    if world is not None:
        metrics.update(world.chance(metrics))
    return metrics


def _variants(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(multimodal rows, text-only ablation rows)."""
    if "variant" not in rows:  # no rows at all: no columns either
        return rows, rows
    return rows[rows["variant"] == MULTIMODAL], rows[rows["variant"] == TEXT_ONLY]


def _variant_metrics(rows: pd.DataFrame, world: World | None) -> dict[str, float]:
    """Means over images (NaN left out), counts summed, found rates, a world's rates with their
    intervals."""
    metrics: dict[str, float] = {"images": float(len(rows))}
    for name in (*MEAN_METRICS, *BINDING_MEANS, *(world.means if world is not None else ())):
        if name in rows and rows[name].notna().any():
            metrics[name] = float(rows[name].mean())
    for name in COUNT_METRICS:
        if name in rows and rows[name].notna().any():
            metrics[name] = float(rows[name].sum())
    if metrics.get("mm_objects"):
        metrics["mm_found_rate"] = metrics["mm_found"] / metrics["mm_objects"]
    if metrics.get("face_total"):
        metrics["face_found_rate"] = metrics["face_found"] / metrics["face_total"]
    for name, per in (world.rates.items() if world is not None else ()):
        if name in metrics:
            _, low, high = _pooled_rate(rows, name, "n_objects" if per == "object" else None)
            metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    # The binding rates, of the judge or of a world reporting the same names: pooled over slots.
    for name, trials in BINDING_RATES.items():
        if name in rows and rows[name].notna().any():
            metrics[name], metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = _pooled_rate(rows, name, trials)
    # Text adherence: MUMU's CLIP-T against SDXL's on the same text-only prompts and seeds.
    if "sdxl_clip_t" in metrics:
        paired = rows[rows["sdxl_clip_t"].notna()]
        metrics["clip_t_text_only"] = float(paired["clip_t"].mean())
        metrics["clip_t_vs_sdxl"] = metrics["clip_t_text_only"] - metrics["sdxl_clip_t"]
    return metrics


def _pooled_rate(rows: pd.DataFrame, name: str, trials: str | None) -> tuple[float, float, float]:
    """(rate, 95% Wilson low, high) of a row share `name` over the trials of column `trials`
    (one per row when None), rows where it is NaN left out."""
    scored = rows[rows[name].notna()]
    counts = scored[trials] if trials is not None else pd.Series(1, index=scored.index)
    hits, total = float((scored[name] * counts).sum()), int(counts.sum())
    return (hits / total if total else math.nan, *wilson_interval(hits, total))


def aggregate(suites: dict[str, dict[str, float]], rows: pd.DataFrame) -> dict[str, float]:
    """Over suites: the mean of suite means (each suite weighs the same, whatever its size),
    counts summed and rates recomputed from them (for the ablation's suffixed ones too)."""
    multimodal, ablation = _variants(rows)
    aggregate: dict[str, float] = {"images": float(len(multimodal))}
    if len(ablation):
        aggregate[f"images{ABLATION_SUFFIX}"] = float(len(ablation))
    names = {name for metrics in suites.values() for name in metrics}
    for name in sorted(names):
        values = [m[name] for m in suites.values() if name in m and not math.isnan(m[name])]
        if not values or name in ("images", f"images{ABLATION_SUFFIX}", "errors") or _is_interval(name):
            continue
        counted = name.removesuffix(ABLATION_SUFFIX) in COUNT_METRICS
        aggregate[name] = float(sum(values)) if counted else float(np.mean(values))
    for suffix in ("", ABLATION_SUFFIX):
        if aggregate.get(f"mm_objects{suffix}"):
            aggregate[f"mm_found_rate{suffix}"] = aggregate[f"mm_found{suffix}"] / aggregate[f"mm_objects{suffix}"]
        if aggregate.get(f"face_total{suffix}"):
            aggregate[f"face_found_rate{suffix}"] = aggregate[f"face_found{suffix}"] / aggregate[f"face_total{suffix}"]
    return aggregate
