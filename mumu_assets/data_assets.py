"""The data half of MUMU as assets: prompts -> synthetic and real images -> crops -> captions.

Each asset is a thin wrapper over one `mumu_model.data.steps` function: it reads its inputs
from the storage folder, runs the step with the profile's backend, writes its dataset
atomically, and reports rows in/out, what was skipped and why, and the DVC hash.

A sharded step drops a row that raises and lists it (`failed_rows`); a shard whose rows mostly
raise fails its own partition only, naming them (`_shard_fails_alone`). Temps that killed
writers left in the output folder are deleted first (`orphans_removed`).

Checks of ERROR severity are blocking: one that fails fails its step, so what is downstream
does not run (mumu_assets.materialize also refuses it in later runs). WARN checks only report.
"""

# No `from __future__ import annotations`: Dagster reads the config and resource types of
# asset functions from their live annotations.
import contextlib
import json
import math

import dagster as dg
import pandas as pd

from mumu_model.data import steps
from mumu_model.data.shards import write_table

from .datasets import (
    CAPTIONS, DETECTIONS, FILTERED, PICKSCORES, PREVIEWS, PROMPT_PAIRS, RAW_PROMPTS, REAL_IMAGES, SYNTHETIC_IMAGES,
)
from .metadata import dataset_metadata, histogram, preview
from .params import params
from .partitions import SHARDS
from .resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, DetectorBackend, RealImageModels,
    ScorerBackend, SynthesisBackend,
)

P = params()
# A new version of an upstream dataset re-materializes what depends on it, shard by shard,
# when the automation sensor runs (`dagster dev` starts it).
EAGER = dg.AutomationCondition.eager()

# Failing rows listed in metadata or in a partition's failure (all are counted).
LISTED_FAILURES = 100


@contextlib.contextmanager
def _shard_fails_alone():
    """Turn a shard whose rows mostly raised into this partition's failure, listing the rows.
    No retry: the same data would fail the same way. Other partitions run on their own."""
    try:
        yield
    except steps.ShardFailed as err:
        raise dg.Failure(
            description=str(err), allow_retries=False,
            metadata={"failed_rows": dg.MetadataValue.int(len(err.failed)),
                      "attempted_rows": dg.MetadataValue.int(err.attempted),
                      "failed_row_list": dg.MetadataValue.json(_listed(err.failed))},
        ) from err


def _listed(failed: list[tuple[str, str]]) -> list[str]:
    return [f"{key}: {error}" for key, error in failed[:LISTED_FAILURES]]


def _step_metadata(out, rows_in: int | None, rows_out: int, result: steps.StepResult) -> dict:
    """`dataset_metadata` plus the rows that raised (key: error) and the orphans removed."""
    metadata = dataset_metadata(out, rows_in, rows_out, result.skipped)
    metadata["failed_rows"] = dg.MetadataValue.int(len(result.failed))
    if result.failed:
        metadata["failed_row_list"] = dg.MetadataValue.json(_listed(result.failed))
    if result.orphans_removed:
        metadata["orphans_removed"] = dg.MetadataValue.json(result.orphans_removed)
    return metadata


# -- prompts -------------------------------------------------------------------------------


class RawPromptsConfig(dg.Config):
    source: str = P["prompts"]["source"]
    text_column: str = P["prompts"]["text_column"]
    min_chars: int = P["prompts"]["min_chars"]
    max_chars: int = P["prompts"]["max_chars"]
    limit: int | None = P["prompts"]["limit"]


def _check(name: str, passed: bool, description: str, severity=dg.AssetCheckSeverity.ERROR, **metadata):
    """A check result, ERROR by default. An ERROR check's spec is `blocking=True`: when it fails,
    Dagster fails the step and nothing downstream runs (a WARN check's spec is not blocking)."""
    return dg.AssetCheckResult(
        check_name=name, passed=bool(passed), severity=severity, description=description, metadata=metadata
    )


@dg.asset(group_name="prompts", kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("nonempty_unique", asset="raw_prompts", blocking=True)])
def raw_prompts(config: RawPromptsConfig, storage: DatasetStorage) -> dg.MaterializeResult:
    """DiffusionDB-style prompts, cleaned, length-filtered and deduplicated."""
    from mumu_model.data.prompts import load_prompt_table

    table, skipped = load_prompt_table(
        config.source, text_column=config.text_column, min_chars=config.min_chars,
        max_chars=config.max_chars, limit=config.limit,
    )
    path = write_table(table, RAW_PROMPTS.path(storage))
    duplicates = int(table["prompt_id"].duplicated().sum())
    return dg.MaterializeResult(
        metadata={**dataset_metadata(path, len(table) + skipped.total, len(table), skipped), "preview": preview(table)},
        check_results=[_check("nonempty_unique", len(table) > 0 and duplicates == 0,
                              "at least one prompt, no duplicate prompt ids", rows=len(table), duplicates=duplicates)],
    )


class ContentStyleConfig(dg.Config):
    styles_per_content: int = P["content_style"]["styles_per_content"]
    seed: int = P["content_style"]["seed"]
    extra_contents: str | None = P["content_style"]["extra_contents"]
    extra_styles: str | None = P["content_style"]["extra_styles"]
    num_shards: int = P["num_shards"]


@dg.asset(group_name="prompts", deps=[raw_prompts], kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("styles_per_content", asset="content_style", blocking=True)],
          automation_condition=EAGER)
def content_style(
    config: ContentStyleConfig, storage: DatasetStorage, content_style_backend: ContentStyleBackend
) -> dg.MaterializeResult:
    """Each prompt split into content + style; each content paired with K styles, by shard."""
    from mumu_model.data.content_style import split_prompts
    from mumu_model.data.prompts import dedup_key, load_phrase_list, pair_contents_with_styles

    prompts = pd.read_parquet(RAW_PROMPTS.path(storage))
    split, skipped = split_prompts(prompts, content_style_backend.get())
    contents = list(split["content"]) + (load_phrase_list(config.extra_contents) if config.extra_contents else [])
    styles = [s for s in split["style"] if s] + (load_phrase_list(config.extra_styles) if config.extra_styles else [])
    pairs = pair_contents_with_styles(contents, styles, config.styles_per_content, config.seed)
    pairs["shard"] = [f"{steps.shard_of(p, config.num_shards):05d}" for p in pairs["pair_id"]]
    path = write_table(pairs, PROMPT_PAIRS.path(storage))
    expected = min(config.styles_per_content, len({dedup_key(s) for s in styles}))
    per_content = pairs.groupby("content")["style"].nunique()
    short = int((per_content < expected).sum())
    return dg.MaterializeResult(
        check_results=[_check("styles_per_content", len(pairs) > 0 and short == 0,
                              f"every content paired with {expected} distinct styles",
                              contents_short_of_styles=short)],
        metadata={
            **dataset_metadata(path, len(prompts), len(pairs), skipped),
            "prompts_split": dg.MetadataValue.int(len(split)),
            "distinct_contents": dg.MetadataValue.int(pairs["content"].nunique()),
            "distinct_styles": dg.MetadataValue.int(pairs["style"].nunique()),
            "pairs_per_shard": dg.MetadataValue.json(pairs["shard"].value_counts().sort_index().to_dict()),
            "preview": preview(pairs[["content", "style", "shard"]]),
        }
    )


# -- synthetic images ----------------------------------------------------------------------


class SynthesisConfig(dg.Config):
    height: int = P["synthesis"]["height"]
    width: int = P["synthesis"]["width"]
    steps: int = P["synthesis"]["steps"]
    guidance: float = P["synthesis"]["guidance"]
    batch_size: int = P["synthesis"]["batch_size"]
    image_format: str = P["synthesis"].get("image_format", "jpg")


@dg.asset(group_name="synthetic", deps=[content_style], partitions_def=SHARDS, kinds={"webdataset"},
          check_specs=[dg.AssetCheckSpec("all_pairs_rendered", asset="synthetic_images")], automation_condition=EAGER)
def synthetic_images(
    context: dg.AssetExecutionContext, config: SynthesisConfig, storage: DatasetStorage,
    synthesis_backend: SynthesisBackend,
) -> dg.MaterializeResult:
    """Text-to-image for this shard's (content, style) pairs, seeded per row."""
    shard = context.partition_key
    pairs = pd.read_parquet(PROMPT_PAIRS.path(storage))
    pairs = pairs[pairs["shard"] == shard]
    synthesizer = synthesis_backend.build_synthesizer(
        config.height, config.width, config.steps, config.guidance, config.batch_size
    )
    out = SYNTHETIC_IMAGES.path(storage, shard)
    with _shard_fails_alone():
        result = steps.synthesize(pairs, synthesizer, out, config.image_format)
    metadata = _step_metadata(out, len(pairs), result.rows, result)
    annotations = result.table["annotations"].dropna()
    if len(annotations):  # a renderer that knows what it drew: how many images are wrong on purpose
        defects = pd.Series([json.loads(a).get("defect") for a in annotations]).value_counts().to_dict()
        metadata["deliberate_defects"] = dg.MetadataValue.json({str(k): int(v) for k, v in defects.items()})
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[_check("all_pairs_rendered", result.rows == len(pairs), "every pair of the shard has an image",
                              dg.AssetCheckSeverity.WARN, missing=len(pairs) - result.rows)],
    )


# The scorer is an asset of the "pretrained" group: a hub checkpoint in the paper profile, a CLIP
# the toy profile trains on its own renders (mumu_assets.profiles.toy).
@dg.asset(group_name="synthetic", deps=[synthetic_images, dg.AssetKey("scorer_model")], partitions_def=SHARDS,
          kinds={"parquet"}, check_specs=[dg.AssetCheckSpec("scores_finite", asset="pickscore_scores", blocking=True)],
          automation_condition=EAGER)
def pickscore_scores(
    context: dg.AssetExecutionContext, storage: DatasetStorage, scorer_backend: ScorerBackend
) -> dg.MaterializeResult:
    """PickScore of each synthetic image against its prompt."""
    shard = context.partition_key
    out = PICKSCORES.path(storage, shard)
    with _shard_fails_alone():
        result = steps.score(SYNTHETIC_IMAGES.path(storage, shard), scorer_backend.get(), out)
    scores = result.table["score"]
    metadata = _step_metadata(out, None, result.rows, result)
    if len(scores):
        metadata.update(
            score_mean=dg.MetadataValue.float(float(scores.mean())),
            score_quantiles=dg.MetadataValue.json(
                {str(q): round(float(scores.quantile(q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
            ),
        )
    finite = bool(pd.Series(scores, dtype=float).map(math.isfinite).all())
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[_check("scores_finite", finite, "every PickScore is a finite number")],
    )


class FilterConfig(dg.Config):
    min_score: float = P["pickscore"]["min_score"]
    # > 0: also drop this quantile of the lowest scores (for a scorer with no calibrated scale)
    min_quantile: float = P["pickscore"].get("min_quantile", 0.0)


@dg.asset(group_name="synthetic", deps=[pickscore_scores], partitions_def=SHARDS, kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("kept_fraction", asset="filtered_synthetic")], automation_condition=EAGER)
def filtered_synthetic(
    context: dg.AssetExecutionContext, config: FilterConfig, storage: DatasetStorage
) -> dg.MaterializeResult:
    """The synthetic images at or above the minimum PickScore (their keys)."""
    shard = context.partition_key
    scores = pd.read_parquet(PICKSCORES.path(storage, shard))
    out = FILTERED.path(storage, shard)
    kept, stats = steps.filter_scores(scores, config.min_score, out, config.min_quantile)
    kept_fraction = float(len(kept) / len(scores)) if len(scores) else 0.0
    return dg.MaterializeResult(
        check_results=[_check("kept_fraction", kept_fraction >= 0.05,
                              "the PickScore threshold keeps at least 5% of the images (else it is miscalibrated)",
                              dg.AssetCheckSeverity.WARN, kept_fraction=kept_fraction)],
        metadata={
            **dataset_metadata(out, len(scores), len(kept)),
            "kept_fraction": dg.MetadataValue.float(kept_fraction),
            "min_score": dg.MetadataValue.float(config.min_score),
            "stats": dg.MetadataValue.json(stats),
            **_defect_metadata(stats),
        }
    )


def _defect_metadata(stats: dict) -> dict:
    """How well the filter rejects the images a renderer made wrong on purpose (toy profile)."""
    defects = stats.get("defects")
    if not defects:
        return {}
    metadata = {"defects_caught": dg.MetadataValue.int(defects["caught"]),
                "defects_total": dg.MetadataValue.int(defects["defective"]),
                "defect_recall": dg.MetadataValue.float(defects["recall"])}  # defects exist: not None
    if defects["precision"] is not None:
        metadata["defect_precision"] = dg.MetadataValue.float(defects["precision"])
    return metadata


# -- real images ---------------------------------------------------------------------------


class RealImagesConfig(dg.Config):
    source: str | None = P["real_images"]["source"]
    min_side: int = P["real_images"]["min_side"]
    max_people: int = P["real_images"]["max_people"]
    num_shards: int = P["num_shards"]


@dg.asset(group_name="real", partitions_def=SHARDS, kinds={"webdataset"})
def real_images(
    context: dg.AssetExecutionContext, config: RealImagesConfig, storage: DatasetStorage,
    real_image_models: RealImageModels,
) -> dg.MaterializeResult:
    """Real photos: SFW, high resolution, no watermark, 0 or 1 people, cropped on the person,
    captioned. With no source configured the shard is empty and says so."""
    shard = context.partition_key
    out = REAL_IMAGES.path(storage, shard)
    items = steps.real_image_items(config.source, int(shard), config.num_shards) if config.source else []
    with _shard_fails_alone():
        result = steps.ingest_real(items, out, **real_image_models.ingest_kwargs(config.min_side, config.max_people))
    metadata = _step_metadata(out, None, result.rows, result)
    metadata["source"] = dg.MetadataValue.text(config.source or "none configured")
    metadata["filters"] = dg.MetadataValue.json(real_image_models.describe())
    return dg.MaterializeResult(metadata=metadata)


# -- detections and captions ---------------------------------------------------------------


class DetectionConfig(dg.Config):
    box_threshold: float = P["detection"]["box_threshold"]
    text_threshold: float = P["detection"]["text_threshold"]
    batch_size: int = 8


def _caption_sources(storage: DatasetStorage, shard: str) -> list:
    kept = pd.read_parquet(FILTERED.path(storage, shard))
    return [
        (SYNTHETIC_IMAGES.path(storage, shard), set(kept["key"])),
        (REAL_IMAGES.path(storage, shard), None),
    ]


@dg.asset(group_name="captions", deps=[filtered_synthetic, real_images], partitions_def=SHARDS, kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("boxes_well_formed", asset="detections", blocking=True)],
          automation_condition=EAGER)
def detections(
    context: dg.AssetExecutionContext, config: DetectionConfig, storage: DatasetStorage,
    detector_backend: DetectorBackend,
) -> dg.MaterializeResult:
    """Boxes of each caption's noun phrases (and heads of persons), one query per image."""
    shard = context.partition_key
    out = DETECTIONS.path(storage, shard)
    detector = detector_backend.build_detector(config.box_threshold, config.text_threshold)
    with _shard_fails_alone():
        result = steps.detect(_caption_sources(storage, shard), detector, out, config.batch_size)
    table = result.table
    metadata = _step_metadata(out, result.rows, len(table), result)
    metadata["images_with_detections"] = dg.MetadataValue.int(table["key"].nunique())
    metadata["top_phrases"] = dg.MetadataValue.json(table["phrase"].value_counts().head(10).to_dict())
    bad = int(((table["x1"] <= table["x0"]) | (table["y1"] <= table["y0"]) | (table[["x0", "y0"]] < 0).any(axis=1)).sum())
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[_check("boxes_well_formed", bad == 0, "every box has positive size inside the image", bad_boxes=bad)],
    )


class CaptionConfig(dg.Config):
    seed: int = P["captions"]["seed"]
    max_crops: int = P["captions"]["max_crops"]
    max_images: int = P["captions"]["max_images"]
    control_probability: float = P["captions"]["control_probability"]
    text_only_probability: float = P["captions"].get("text_only_probability", 0.0)
    stage2_subject: str = P["captions"].get("stage2_subject", "person")  # "any": the largest object of any kind
    stage2_max_subjects: int | None = P["captions"].get("stage2_max_subjects")  # None: no limit
    # Words a phrase loses when its crop goes before it: what only the crop should tell (e.g. colours)
    crop_replaces_words: list[str] = P["captions"].get("crop_replaces_words", [])
    image_format: str = P["captions"].get("image_format", "jpg")
    min_crop_side: int = P["detection"]["min_crop_side"]
    reference_side: int = P["detection"]["reference_side"]
    max_area_fraction: float = P["detection"]["max_area_fraction"]
    head_probability: float = P["detection"]["head_probability"]


def _records_check(out, max_images: int, max_crops: int) -> dg.AssetCheckResult:
    """Every record written reads back as a valid multimodal prompt within the image limits."""
    problems = steps.validate_records(out, max_images, max_crops)
    return _check("records_parse", not problems, f"every record parses with <= {max_images} images, "
                  f"<= {max_crops} crops", problems=len(problems), examples=problems[:5])


def _caption_metadata(out, result: steps.StepResult, storage: DatasetStorage, name: str) -> dict:
    table = result.table
    metadata = _step_metadata(out, None, result.rows, result)
    areas = [a for row in table["crop_areas"] for a in row]
    metadata["with_crop_fraction"] = dg.MetadataValue.float(
        float((table["num_images"] > 0).mean()) if len(table) else 0.0
    )
    metadata["images_per_record"] = dg.MetadataValue.json(table["num_images"].value_counts().sort_index().to_dict())
    metadata["crop_area_histogram"] = histogram(areas, [0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0])
    metadata["preview"] = preview(table[["key", "prompt", "num_images"]])
    # data/previews is no DVC output: a picture for people, not part of the dataset version.
    grid = PREVIEWS.member(storage, name)
    if steps.preview_grid(out, grid):
        metadata["preview_grid"] = dg.MetadataValue.path(str(grid))
    return metadata


@dg.asset(group_name="captions", deps=[detections], partitions_def=SHARDS, kinds={"webdataset"},
          check_specs=[dg.AssetCheckSpec("records_parse", asset="multimodal_captions_stage1", blocking=True)],
          automation_condition=EAGER)
def multimodal_captions_stage1(
    context: dg.AssetExecutionContext, config: CaptionConfig, storage: DatasetStorage,
    control_image_models: ControlImageModels,
) -> dg.MaterializeResult:
    """Stage-1 training records: up to 3 crops before their words, 30% with a control image."""
    shard = context.partition_key
    out = CAPTIONS[1].path(storage, shard)
    with _shard_fails_alone():
        result = steps.caption(
            1, _caption_sources(storage, shard), pd.read_parquet(DETECTIONS.path(storage, shard)), out,
            seed=config.seed, max_crops=config.max_crops, max_images=config.max_images,
            control_probability=config.control_probability, control_backends=control_image_models.get(),
            min_side=config.min_crop_side, reference_side=config.reference_side,
            max_area_fraction=config.max_area_fraction, head_probability=config.head_probability,
            text_only_probability=config.text_only_probability, crop_replaces_words=config.crop_replaces_words,
            image_format=config.image_format,
        )
    metadata = _caption_metadata(out, result, storage, f"stage1-{shard}.png")
    metadata["control_kinds"] = dg.MetadataValue.json(result.table["control"].value_counts().to_dict())
    return dg.MaterializeResult(metadata=metadata, check_results=[_records_check(out, config.max_images, config.max_crops)])


@dg.asset(group_name="captions", deps=[detections], partitions_def=SHARDS, kinds={"webdataset"},
          check_specs=[dg.AssetCheckSpec("records_parse", asset="multimodal_captions_stage2", blocking=True)],
          automation_condition=EAGER)
def multimodal_captions_stage2(
    context: dg.AssetExecutionContext, config: CaptionConfig, storage: DatasetStorage
) -> dg.MaterializeResult:
    """Stage-2 training records: one high-resolution face or person crop per prompt (the toy
    world: the object of a one-object image, or now and then none, text-only)."""
    shard = context.partition_key
    out = CAPTIONS[2].path(storage, shard)
    with _shard_fails_alone():
        result = steps.caption(
            2, _caption_sources(storage, shard), pd.read_parquet(DETECTIONS.path(storage, shard)), out,
            seed=config.seed, reference_side=config.reference_side, max_area_fraction=config.max_area_fraction,
            subject=config.stage2_subject, max_subjects=config.stage2_max_subjects,
            text_only_probability=config.text_only_probability,
            crop_replaces_words=config.crop_replaces_words,
            image_format=config.image_format,
        )
    metadata = _caption_metadata(out, result, storage, f"stage2-{shard}.png")
    return dg.MaterializeResult(metadata=metadata, check_results=[_records_check(out, 1, 1)])


DATA_ASSETS = [
    raw_prompts, content_style, synthetic_images, pickscore_scores, filtered_synthetic, real_images,
    detections, multimodal_captions_stage1, multimodal_captions_stage2,
]
