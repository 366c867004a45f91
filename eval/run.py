"""`evaluate`: generate every suite entry for every seed, score it, report it, log it to MLflow.

Steps, in an order that fails fast and keeps one big model in memory at a time:
1. The pipeline folder is checked (an incomplete one raises `PipelineFolderError` at once), the
   suites are read (a broken suite file raises `SuiteError`) and the metric models are loaded
   (a bad path fails here, before any image is generated).
2. MUMU generates the entries, `batch_size` prompts with all their seeds per call. An entry
   whose image is missing, whose prompt has more images than the model takes, or whose
   generation fails becomes an `EntryError`; the rest go on.
   With `text_only_ablation`, MUMU also generates every entry that has images a second time
   with its images removed ("a <img:x.png> circle" -> "a circle"), same seeds and sampler: what
   the model draws from the words alone, so the multimodal rows show what the images add.
3. If `models.sdxl` is set, the base SDXL generates the text-only entries with the same texts,
   seeds and sampler, for text adherence (CLIP-T of MUMU vs SDXL).
4. Each image is scored; rows are aggregated per suite and over suites; images, grids (inputs
   beside outputs, one per suite, and `samples.png`, the first entries of every suite in small),
   `rows.csv` and `summary.json` are written under `out_dir`, atomically.
5. Metrics, params and artifacts go to MLflow (`{suite}/{metric}` and `aggregate/{metric}`). A
   new evaluation run is tagged `mumu.trained_by=<MLflow run id>` when the pipeline folder was
   exported by a training run (`mumu_model.training.tracking.training_mlflow_run`).

Metric columns of a row (one generated image): clip_t, clip_i, dino, pickscore, mm_clip
(multimodal CLIP score), mm_objects / mm_found, face_sim / face_dist / face_found /
face_total, colour_match (the toy world's colour probe, with colour_found, the colour(s) the
probe saw, a string), the toy world's object probe where objects name colour and shape
(obj_colour and obj_shape: the share of the prompt's objects found in their crop's colour / with
their shape, each matched one-to-one to a detected object; all_colours, all_objects: every
object right; count_match: as many objects detected as asked for; n_objects; objects_found, a
string) and for text-only rows sdxl_clip_t. A metric whose model is not configured
is absent; a metric that does not apply to the row (no references, no faces, no coloured
objects) is NaN. The `variant` column says which prompt made the image: "multimodal" (the
entry's prompt) or "text_only" (the ablation, images removed).

Per suite (and aggregated), the multimodal rows give the metrics under their own names and the
ablation rows the same ones with a `_text_only` suffix (colour_match_text_only, clip_i_text_only,
images_text_only, ...), except CLIP-T: `clip_t_text_only` already names MUMU's CLIP-T on the
suite's text-only entries (against SDXL's), so the ablation's CLIP-T stays in the rows only.
Where the colour probe applies, `colour_chance` is its chance level, 1 / len(PALETTE), and
where the object probe applies `shape_chance`, 1 / len(SHAPES). Every binomial rate comes with
its 95% Wilson interval (`colour_match_ci_low`, `colour_match_ci_high`, ...), counting images
(or objects) as independent trials: exact for one seed per entry, optimistic for several.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from mumu_model.atomic import write_bytes_atomic
from mumu_model.cli import resolve_device_dtype
from mumu_model.data.detection import Detector
from mumu_model.images import pad_to_square
from mumu_model.pipeline import MUMUPipeline
from mumu_model.prompt import MultimodalPrompt
from mumu_model.training.tracking import (
    TRAINED_BY_TAG,
    absolute_tracking_uri,
    ensure_experiment,
    training_mlflow_run,
)

from .faces import FaceEmbedder, face_similarity, load_face_embedder
from .metrics import (
    ClipEmbedder,
    DinoEmbedder,
    clip_i,
    clip_t,
    colour_chance,
    colour_probe,
    dino_score,
    multimodal_clip_score,
    object_probe,
    objects_found,
    shape_chance,
    wilson_interval,
)
from .suites import EntryError, LoadedEntry, Suite, load_entry, load_suite, prompt_words

logger = logging.getLogger("mumu.eval")

DEFAULT_EXPERIMENT = "mumu-eval"
MLFLOW_BATCH = 100  # MLflow's limit on params / metrics per log_batch call
SAMPLES_GRID = "samples.png"  # the first SAMPLES_PER_SUITE entries of every suite
SAMPLES_PER_SUITE = 2

# Metrics averaged over rows (NaN rows left out), and (COUNT_METRICS) the counters summed.
MEAN_METRICS = ("clip_t", "clip_i", "dino", "pickscore", "mm_clip", "face_sim", "face_dist", "sdxl_clip_t",
                "colour_match", "obj_colour", "obj_shape", "all_colours", "all_objects", "count_match", "n_objects")
# Binomial rates, reported with a 95% Wilson interval (`{name}_ci_low`, `{name}_ci_high`): rates
# over objects (a row holds `n_objects` trials) and rates over images (one trial per row).
PER_OBJECT_RATES = ("colour_match", "obj_colour", "obj_shape")
PER_IMAGE_RATES = ("all_colours", "all_objects", "count_match")
CI_SUFFIXES = ("_ci_low", "_ci_high")
COUNT_METRICS = ("mm_objects", "mm_found", "face_total", "face_found")

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


class PipelineFolderError(ValueError):
    """The pipeline folder cannot be a MUMU pipeline: raised before anything else runs."""


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
class EvalResult:
    rows: pd.DataFrame  # one row per generated image (suite, entry, seed, image, metrics)
    suites: dict[str, dict[str, float]]  # per suite: metric -> value
    aggregate: dict[str, float]  # over suites (means of suite means; counts summed)
    errors: list[EntryError]
    settings: dict[str, str]  # what was logged as MLflow params
    out_dir: Path
    run_id: str | None = None
    tracking_uri: str | None = None

    def metrics(self) -> dict[str, float]:
        """Flat, as logged: {"single_subject/clip_i": ..., "aggregate/clip_i": ...}."""
        flat = {f"{suite}/{name}": value for suite, values in self.suites.items() for name, value in values.items()}
        flat.update({f"aggregate/{name}": value for name, value in self.aggregate.items()})
        return flat


@dataclass
class _Scorers:
    clip: ClipEmbedder | None = None
    dino: DinoEmbedder | None = None
    pickscore: Any = None  # mumu_model.data.scoring.PickScorer
    detector: Detector | None = None
    face: FaceEmbedder | None = None


@dataclass
class _Generated:
    entry: LoadedEntry
    seeds: list[int]
    images: list[Image.Image]
    paths: list[str]  # relative to out_dir
    sdxl_images: list[Image.Image] = field(default_factory=list)
    ablation_images: list[Image.Image] = field(default_factory=list)  # text-only ablation, per seed
    ablation_paths: list[str] = field(default_factory=list)


# -- the pipeline folder -------------------------------------------------------------------


def check_pipeline_folder(path: str | Path) -> Path:
    """Fail fast, naming what is missing, when `path` is not a complete MUMU pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineFolderError(f"pipeline {path}: no such folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineFolderError(f"pipeline {path}: not a pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineFolderError(f"pipeline {path}: model_index.json is unreadable: {err}") from err
    if index.get("_class_name") != "MUMUPipeline":
        raise PipelineFolderError(f"pipeline {path}: model_index.json is a {index.get('_class_name')!r}, not a MUMUPipeline")
    missing = []
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2 and value[0] is not None):
            continue  # config values (max_images) and absent optional components
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            missing.append(f"{name}/ (missing or empty)")
        elif not any(folder.glob("*config*.json")):
            missing.append(f"{name}/ (no config file)")
        elif name in ("encoder", "adapter", "unet", "vae") and not any(folder.glob("*.safetensors")):
            missing.append(f"{name}/ (no .safetensors weights)")
    if missing:
        raise PipelineFolderError(f"pipeline {path} is incomplete: {', '.join(missing)}")
    return path


def _load_pipeline(pipeline: str | Path | MUMUPipeline, device: str, dtype: torch.dtype | None) -> MUMUPipeline:
    if isinstance(pipeline, MUMUPipeline):
        return pipeline
    path = check_pipeline_folder(pipeline)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        pipe = MUMUPipeline.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineFolderError(f"pipeline {path}: cannot load: {first}") from err
    return pipe.to(device)


# -- models --------------------------------------------------------------------------------


def _load_scorers(models: EvalModels, device: str) -> _Scorers:
    scorers = _Scorers()
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


def default_tracking_uri(out_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI if set, else a sqlite file beside `out_dir` (as training does), so
    evaluations written next to each other land in one database to compare."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return f"sqlite:///{Path(out_dir).resolve().parent / 'mlflow.db'}"


# -- evaluate ------------------------------------------------------------------------------


def evaluate(
    pipeline: str | Path | MUMUPipeline,
    suites: Sequence[str | Path | Suite],
    *,
    models: EvalModels | None = None,
    steps: int = 50,
    guidance: float = 6.0,
    seeds: Sequence[int] = (0,),
    out_dir: str | Path,
    mlflow_run: bool | str = True,
    negative_prompt: str | None = None,
    resolution: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    text_only_ablation: bool = False,
    batch_size: int = 1,
    tags: dict[str, str] | None = None,
) -> EvalResult:
    """Evaluate a MUMU pipeline on prompt suites; see the module docstring for the steps.

    Args:
        pipeline: a pipeline folder (checked first; an incomplete one raises
            `PipelineFolderError`) or a loaded `MUMUPipeline` (used as it is).
        suites: suite files (or loaded `Suite`s); see `eval.suites`.
        models: the metric models (`EvalModels`); default `EvalModels()` (dlib faces only).
        steps, guidance, negative_prompt: sampling (paper: 50 DDIM steps, guidance 6, none);
            the sampler is the pipeline's own scheduler (DDIM for MUMU pipelines).
        seeds: every entry is generated once per seed (`torch.Generator().manual_seed(seed)`).
        out_dir: images, grids, rows.csv and summary.json are written here.
        mlflow_run: True starts a new run in `experiment`; a run id logs into that existing
            run (e.g. the training run being evaluated); False logs nothing.
        resolution: output side in pixels (default: the pipeline's native size).
        device, dtype: where and in what the pipelines run, as `mumu_model.cli.resolve_device_dtype`
            reads them (default: cuda in bfloat16 when available, else cpu in float32); a
            loaded `MUMUPipeline` is used where and as it is.
        tracking_uri: default `default_tracking_uri(out_dir)`.
        text_only_ablation: also generate each entry that has images with its images removed
            (same seeds and sampling) and score those rows too (`variant` "text_only"; summary
            metrics with a `_text_only` suffix), to show what the images contribute.
        batch_size: prompts per pipeline call (each with all its seeds); the images do not
            depend on it, only speed and memory do.
        tags: extra MLflow tags of the evaluation run (`mumu.trained_by` is found by itself).

    Bad entries do not raise: they are collected in `EvalResult.errors` (and logged), and the
    rest of the suite is scored.
    """
    started = time.perf_counter()
    models = models if models is not None else EvalModels()
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = resolve_device_dtype(device, dtype)
    out_dir = Path(out_dir)

    # 1. Fail fast: the pipeline folder, the suite files, the metric models.
    if not isinstance(pipeline, MUMUPipeline):
        check_pipeline_folder(pipeline)
    loaded_suites = [s if isinstance(s, Suite) else load_suite(s) for s in suites]
    names = [s.name for s in loaded_suites]
    if len(set(names)) != len(names):
        raise ValueError(f"two suites share a name: {names}")
    scorers = _load_scorers(models, device)
    errors: list[EntryError] = [e for s in loaded_suites for e in s.errors]

    # 2. MUMU generates every entry.
    pipe = _load_pipeline(pipeline, device, dtype)
    owns_pipeline = not isinstance(pipeline, MUMUPipeline)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = type(pipe.scheduler)
    max_images = int(pipe.config.max_images)
    size = resolution or pipe.default_sample_size
    generated: list[_Generated] = []
    for suite in loaded_suites:
        entries: list[LoadedEntry] = []
        for entry in suite.entries:
            try:
                entries.append(load_entry(suite, entry, max_images))
            except EntryError as err:
                errors.append(err)
        sample = dict(pipe=pipe, seeds=seeds, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                      size=size, image_root=suite.image_root, batch_size=batch_size)
        images = _generate_mumu([e.prompt for e in entries], **sample)
        ablated = [i for i, e in enumerate(entries) if text_only_ablation and not e.text_only]
        ablation = dict(zip(ablated, _generate_mumu([prompt_words(entries[i].prompt) for i in ablated], **sample)))
        for index, loaded in enumerate(entries):
            failure = next((r for r in (images[index], ablation.get(index)) if isinstance(r, Exception)), None)
            if failure is not None:
                errors.append(EntryError(suite.name, loaded.id,
                                         f"generation failed: {type(failure).__name__}: {failure}"))
                continue
            paths = [_save_png(out_dir, f"images/{suite.name}/{loaded.id}/seed{seed}.png", image)
                     for seed, image in zip(seeds, images[index])]
            ablation_images = ablation.get(index, [])
            ablation_paths = [_save_png(out_dir, f"images_text_only/{suite.name}/{loaded.id}/seed{seed}.png", image)
                              for seed, image in zip(seeds, ablation_images)]
            generated.append(_Generated(loaded, seeds, images[index], paths, ablation_images=ablation_images,
                                        ablation_paths=ablation_paths))
    if owns_pipeline:
        del pipe
        _free(device)

    # 3. The base SDXL on the text-only entries, for text adherence.
    if models.sdxl is not None and any(g.entry.text_only for g in generated):
        _generate_sdxl(models.sdxl, generated, seeds, steps, guidance, negative_prompt, size, scheduler_class,
                       device, dtype, out_dir)
        _free(device)

    # 4. Score, aggregate, write.
    rows: list[dict[str, Any]] = []
    for item in generated:
        try:
            rows.extend(_score(item, scorers, errors))
        except Exception as err:  # noqa: BLE001
            logger.exception("scoring %s/%s failed", item.entry.suite, item.entry.id)
            errors.append(EntryError(item.entry.suite, item.entry.id, f"scoring failed: {type(err).__name__}: {err}"))
    table = pd.DataFrame(rows)
    for column in ("colour_found", "objects_found"):  # strings: "" (not NaN) where nothing was found or probed
        if column in table:
            table[column] = table[column].fillna("")
    suite_metrics = {s.name: _summarize(table[table["suite"] == s.name] if len(table) else table) for s in loaded_suites}
    for suite in loaded_suites:
        suite_metrics[suite.name]["errors"] = float(sum(e.suite == suite.name for e in errors))
    aggregate = _aggregate(suite_metrics, table)
    aggregate["errors"] = float(len(errors))

    settings = {
        "pipeline": str(pipeline.name_or_path if isinstance(pipeline, MUMUPipeline) else Path(pipeline).resolve()),
        "steps": str(steps),
        "guidance": str(guidance),
        "seeds": ",".join(map(str, seeds)),
        "negative_prompt": "" if negative_prompt is None else negative_prompt,
        "scheduler": scheduler_class.__name__,
        "resolution": str(size),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "text_only_ablation": str(bool(text_only_ablation)),
        **{f"suite.{s.name}.version": s.version for s in loaded_suites},
        **{f"suite.{s.name}.sha256": s.sha256[:16] for s in loaded_suites},
        **{f"suite.{s.name}.entries": str(len(s.entries) + len(s.errors)) for s in loaded_suites},
        **{f"models.{k}": v for k, v in models.describe().items()},
    }
    grids = {s.name: _suite_grid([g for g in generated if g.entry.suite == s.name]) for s in loaded_suites}
    for name, grid in grids.items():
        if grid is not None:
            _save_png(out_dir, f"grids/{name}.png", grid)
        else:  # nothing generated: no grid, and none left from an earlier run into out_dir
            (out_dir / "grids" / f"{name}.png").unlink(missing_ok=True)
    # The first entries of every suite in one small picture: what a reader of a report looks at.
    samples = _suite_grid([g for s in loaded_suites for g in [g for g in generated if g.entry.suite == s.name]
                           [:SAMPLES_PER_SUITE]], cell=64)
    if samples is not None:
        _save_png(out_dir, SAMPLES_GRID, samples)
    result = EvalResult(table, suite_metrics, aggregate, errors, settings, out_dir)
    write_bytes_atomic(out_dir / "rows.csv", table.to_csv(index=False).encode())
    _write_summary(result)

    # 5. MLflow.
    if mlflow_run:
        result.tracking_uri = absolute_tracking_uri(tracking_uri) if tracking_uri else default_tracking_uri(out_dir)
        existing = mlflow_run if isinstance(mlflow_run, str) else None
        run_tags = dict(tags or {})
        trained_by = None if isinstance(pipeline, MUMUPipeline) else training_mlflow_run(pipeline)
        if trained_by is not None and trained_by != existing:
            run_tags.setdefault(TRAINED_BY_TAG, trained_by)
        result.run_id = _log_mlflow(result, result.tracking_uri, experiment, existing, run_name, run_tags)
        _write_summary(result)  # again, now with the run id
    for error in errors:
        logger.warning("entry error: %s", error)
    logger.info("evaluated %d images in %.1f s, %d errors", len(table), time.perf_counter() - started, len(errors))
    return result


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on any device.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _generate_mumu(
    prompts: list[MultimodalPrompt | str], *, pipe: MUMUPipeline, seeds: list[int], steps: int, guidance: float,
    negative_prompt: str | None, size: int, image_root: Path, batch_size: int,
) -> list[list[Image.Image] | Exception]:
    """Each prompt's images, one per seed, or the exception that generating it raised.

    `batch_size` prompts (times their seeds) go through the pipeline together. Every image has
    its own generator, so it is the same image whatever else is in its batch. A failing batch
    is generated again one prompt at a time, so that the failure is pinned on its entry.
    """
    negative = None
    if negative_prompt is not None:
        negative = MultimodalPrompt.from_text(negative_prompt, image_root, max_images=pipe.config.max_images)

    def call(chunk: list[MultimodalPrompt | str]) -> list[list[Image.Image]]:
        images = pipe(
            list(chunk), height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
            negative_prompt=negative, num_images_per_prompt=len(seeds),
            generator=[g for _ in chunk for g in _generators(seeds)],
        ).images
        return [images[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(chunk))]

    def generate(chunk: list[MultimodalPrompt | str]) -> list[list[Image.Image] | Exception]:
        try:
            return call(chunk)
        except Exception as err:  # noqa: BLE001 - one broken entry must not end the evaluation
            if len(chunk) > 1:  # one prompt at a time, to find the one that fails
                return [result for prompt in chunk for result in generate([prompt])]
            logger.exception("generating %r failed", chunk[0] if isinstance(chunk[0], str) else chunk[0].to_text())
            return [err]

    return [result for start in range(0, len(prompts), batch_size)
            for result in generate(prompts[start:start + batch_size])]


def _generate_sdxl(
    source: str | Path, generated: list[_Generated], seeds: list[int], steps: int, guidance: float,
    negative_prompt: str | None, size: int, scheduler_class: type, device: str, dtype: torch.dtype | None,
    out_dir: Path,
) -> None:
    from diffusers import StableDiffusionXLPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    sdxl = StableDiffusionXLPipeline.from_pretrained(str(source), use_safetensors=True, **kwargs).to(device)
    # The same sampler as MUMU's, so the comparison is of the conditioning, not the scheduler.
    sdxl.scheduler = scheduler_class.from_config(sdxl.scheduler.config)
    sdxl.set_progress_bar_config(disable=True)
    for item in generated:
        if not item.entry.text_only:
            continue
        item.sdxl_images = sdxl(
            prompt=item.entry.text, negative_prompt=negative_prompt, height=size, width=size,
            num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=len(seeds),
            generator=_generators(seeds),
        ).images
        for seed, image in zip(seeds, item.sdxl_images):
            _save_png(out_dir, f"images_sdxl/{item.entry.suite}/{item.entry.id}/seed{seed}.png", image)
    del sdxl


def _score(item: _Generated, scorers: _Scorers, errors: list[EntryError]) -> list[dict[str, Any]]:
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
    if entry.colours:  # analytic, no model: always on where the suite names colours
        probes = [colour_probe(image, entry.colours) for image in images]
        put("colour_match", [p.match for p in probes])
        for row, probe in zip(rows, probes):
            row["colour_found"] = probe.found
            row["n_objects"] = len(entry.colours)
    if entry.coloured_shapes:
        found = [object_probe(image, entry.coloured_shapes) for image in images]
        put("obj_colour", [p.colour_accuracy for p in found])
        put("obj_shape", [p.shape_accuracy for p in found])
        put("all_colours", [p.all_colours for p in found])
        put("all_objects", [p.all_right for p in found])
        put("count_match", [p.count_right for p in found])
        for row, probe in zip(rows, found):
            row["objects_found"] = objects_found(probe)
    return rows


# -- aggregation ---------------------------------------------------------------------------


def _summarize(rows: pd.DataFrame) -> dict[str, float]:
    """One suite's metrics: those of its multimodal rows, and those of its ablation rows with a
    `_text_only` suffix; the colour probe's chance level where it applies."""
    multimodal, ablation = _variants(rows)
    metrics = _variant_metrics(multimodal)
    if len(ablation):
        metrics.update({f"{name}{ABLATION_SUFFIX}": value for name, value in _variant_metrics(ablation).items()
                        if name not in _NOT_ABLATED})
    if "colour_match" in metrics or f"colour_match{ABLATION_SUFFIX}" in metrics:
        metrics["colour_chance"] = colour_chance()
    if "obj_shape" in metrics:
        metrics["shape_chance"] = shape_chance()
    return metrics


def _variants(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(multimodal rows, text-only ablation rows)."""
    if "variant" not in rows:  # no rows at all: no columns either
        return rows, rows
    return rows[rows["variant"] == MULTIMODAL], rows[rows["variant"] == TEXT_ONLY]


def _variant_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """Means over images (NaN left out), counts summed, found rates."""
    metrics: dict[str, float] = {"images": float(len(rows))}
    for name in MEAN_METRICS:
        if name in rows and rows[name].notna().any():
            metrics[name] = float(rows[name].mean())
    for name in COUNT_METRICS:
        if name in rows and rows[name].notna().any():
            metrics[name] = float(rows[name].sum())
    if metrics.get("mm_objects"):
        metrics["mm_found_rate"] = metrics["mm_found"] / metrics["mm_objects"]
    if metrics.get("face_total"):
        metrics["face_found_rate"] = metrics["face_found"] / metrics["face_total"]
    for name in (*PER_OBJECT_RATES, *PER_IMAGE_RATES):
        if name in metrics:
            scored = rows[rows[name].notna()]
            trials = scored["n_objects"] if name in PER_OBJECT_RATES else pd.Series(1, index=scored.index)
            low, high = wilson_interval(float((scored[name] * trials).sum()), int(trials.sum()))
            metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    # Text adherence: MUMU's CLIP-T against SDXL's on the same text-only prompts and seeds.
    if "sdxl_clip_t" in metrics:
        paired = rows[rows["sdxl_clip_t"].notna()]
        metrics["clip_t_text_only"] = float(paired["clip_t"].mean())
        metrics["clip_t_vs_sdxl"] = metrics["clip_t_text_only"] - metrics["sdxl_clip_t"]
    return metrics


def _aggregate(suites: dict[str, dict[str, float]], rows: pd.DataFrame) -> dict[str, float]:
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


def headline(metrics: dict[str, float]) -> str:
    """One suite's analytic figures in a line, each rate with its 95% interval: colour and shape
    for one-object suites, all colours right and per-object colour for several objects; then
    the text-only ablation's. "" for a suite without the probes."""

    def rate(name: str) -> str:
        value = metrics.get(name)
        if value is None or math.isnan(value):
            return ""
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        return f"{value:.1%}" + (f" ({low:.0%}-{high:.0%})" if low is not None and high is not None else "")

    if "colour_match" not in metrics:
        return ""
    several = metrics.get("n_objects", 1.0) > 1.0
    shown = [("all colours", "all_colours"), ("per object", "obj_colour")] if several else \
        [("colour", "colour_match"), ("shape", "obj_shape")]
    shown.append(("text-only " + shown[0][0], f"{shown[0][1]}{ABLATION_SUFFIX}"))
    return ", ".join(f"{label} {rate(name)}" for label, name in shown if rate(name))


# -- files ---------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _save_png(out_dir: Path, relative: str, image: Image.Image) -> str:
    write_bytes_atomic(out_dir / relative, _png(image))
    return relative


def _suite_grid(items: list[_Generated], cell: int = 128) -> Image.Image | None:
    """One row per entry: the prompt's images (padded to square, as the model sees them), a gap,
    one output per seed, and then another gap and the outputs to compare with: SDXL's for
    text-only entries, the text-only ablation's for entries with images. The entry id and
    prompt are written under each row."""
    if not items:
        return None
    label = 14
    # An entry has SDXL images (text-only) or ablation images (with images), never both.
    groups = [[list(i.entry.prompt.images), i.images, i.sdxl_images or i.ablation_images] for i in items]
    widths = [max(len(g[k]) for g in groups) for k in range(3)]
    columns = widths[0] + 1 + widths[1] + (1 + widths[2] if widths[2] else 0)
    grid = Image.new("RGB", (columns * cell, len(items) * (cell + label)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, (item, group) in enumerate(zip(items, groups)):
        top = row * (cell + label)
        starts = [0, widths[0] + 1, widths[0] + 1 + widths[1] + 1]
        for start, images in zip(starts, group):
            for column, image in enumerate(images):
                grid.paste(pad_to_square(image).resize((cell, cell)), ((start + column) * cell, top))
        right = "  | right: SDXL" if item.sdxl_images else "  | right: images removed" if item.ablation_images else ""
        caption = f"{item.entry.id}: {item.entry.entry.prompt}{right}"
        draw.text((2, top + cell + 1), caption[:300], fill=(0, 0, 0))
    return grid


def _write_summary(result: EvalResult) -> None:
    summary = {
        "suites": result.suites,
        "aggregate": result.aggregate,
        "errors": [e.as_dict() for e in result.errors],
        "settings": result.settings,
        "run_id": result.run_id,
        "tracking_uri": result.tracking_uri,
    }
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=True, default=str)
    write_bytes_atomic(result.out_dir / "summary.json", text.encode())


# -- MLflow --------------------------------------------------------------------------------


def _log_mlflow(result: EvalResult, uri: str, experiment: str, run_id: str | None, run_name: str | None,
                tags: dict[str, str]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    created = run_id is None
    if created:
        run = client.create_run(ensure_experiment(client, experiment, uri), run_name=run_name,
                                tags={"mumu.kind": "evaluation", **{k: str(v) for k, v in tags.items()}})
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in result.settings.items()]
    else:
        client.get_run(run_id)  # raises a clear MlflowException for an unknown run
        # A training run already has its own params; ours go under "eval." so none collide.
        params = [Param(f"eval.{k}", v[:6000]) for k, v in result.settings.items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics().items() if not math.isnan(v)]
    for start in range(0, max(len(params), len(metrics)), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MLFLOW_BATCH], params=params[start : start + MLFLOW_BATCH])
    if not created:
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
    client.set_tag(run_id, "mumu.eval.errors", str(len(result.errors)))
    for suite in result.suites:  # this run's grids only: out_dir may hold older ones
        grid = result.out_dir / "grids" / f"{suite}.png"
        if grid.is_file():
            client.log_artifact(run_id, str(grid), artifact_path="eval/grids")
    for name in ("rows.csv", "summary.json"):
        client.log_artifact(run_id, str(result.out_dir / name), artifact_path="eval")
    if result.errors:
        errors = "\n".join(str(e) for e in result.errors) + "\n"
        client.log_text(run_id, errors, "eval/errors.txt")
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


__all__ = [
    "DEFAULT_EXPERIMENT",
    "EvalModels",
    "EvalResult",
    "PipelineFolderError",
    "TRAINED_BY_TAG",
    "check_pipeline_folder",
    "default_tracking_uri",
    "evaluate",
]
