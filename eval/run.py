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
   exported by a training run (`mumu_model.tracking.training_mlflow_run`).

The steps live in `eval.generation`, `eval.scoring` and `eval.reporting`; the metrics in
`eval.metrics`, `eval.faces`, the slot-binding judge (`eval.binding`) and the suites' worlds
(`eval.worlds`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mumu_model.devices import resolve_device_dtype
from mumu_model.loading import PipelineFolderError, check_pipeline_folder, load_pipeline
from mumu_model.pipeline import MUMUPipeline
from mumu_model.tracking import TRAINED_BY_TAG, project_tracking_uri, store_beside, training_mlflow_run

from .binding import binding_headline
from .generation import Sampling, free_memory, generate_sdxl, generate_suites
from .reporting import EvalResult, log_mlflow, write_report, write_summary
from .scoring import EvalModels, aggregate, load_scorers, score_entry, summarize
from .suites import EntryError, Suite, load_suite
from .worlds import load_world

logger = logging.getLogger("mumu.eval")

DEFAULT_EXPERIMENT = "mumu-eval"


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
        device, dtype: where and in what the pipelines run, as `mumu_model.devices.resolve_device_dtype`
            reads them (default: cuda in bfloat16 when available, else cpu in float32); a
            loaded `MUMUPipeline` is used where and as it is.
        tracking_uri: default $MLFLOW_TRACKING_URI, else `mlflow.db` beside `out_dir`
            (`mumu_model.tracking.store_beside`), so evaluations written next to each other
            land in one database to compare.
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

    # 1. Fail fast: the pipeline folder, the suite files (and their worlds), the metric models.
    if not isinstance(pipeline, MUMUPipeline):
        check_pipeline_folder(pipeline)
    loaded_suites = [s if isinstance(s, Suite) else load_suite(s) for s in suites]
    names = [s.name for s in loaded_suites]
    if len(set(names)) != len(names):
        raise ValueError(f"two suites share a name: {names}")
    worlds = {s.name: load_world(s.world) if s.world else None for s in loaded_suites}
    scorers = load_scorers(models, device)
    errors: list[EntryError] = [e for s in loaded_suites for e in s.errors]

    # 2. MUMU generates every entry.
    pipe = pipeline if isinstance(pipeline, MUMUPipeline) else load_pipeline(pipeline, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = type(pipe.scheduler)
    sampling = Sampling(seeds, steps, guidance, negative_prompt, resolution or pipe.default_sample_size)
    generated = generate_suites(pipe, loaded_suites, sampling, out_dir=out_dir,
                                text_only_ablation=text_only_ablation, batch_size=batch_size, errors=errors)
    if not isinstance(pipeline, MUMUPipeline):
        del pipe
        free_memory(device)

    # 3. The base SDXL on the text-only entries, for text adherence.
    if models.sdxl is not None and any(g.entry.text_only for g in generated):
        generate_sdxl(models.sdxl, generated, sampling, scheduler_class, device, dtype, out_dir)
        free_memory(device)

    # 4. Score, aggregate, write.
    rows: list[dict[str, Any]] = []
    for item in generated:
        try:
            rows.extend(score_entry(item, scorers, worlds[item.entry.suite], errors))
        except Exception as err:  # noqa: BLE001
            logger.exception("scoring %s/%s failed", item.entry.suite, item.entry.id)
            errors.append(EntryError(item.entry.suite, item.entry.id, f"scoring failed: {type(err).__name__}: {err}"))
    table = pd.DataFrame(rows)
    for column in table.columns:  # what a world saw, as text: "" (not NaN) where it saw nothing
        if table[column].map(lambda v: isinstance(v, str)).any():
            table[column] = table[column].fillna("")
    suite_metrics = {s.name: summarize(table[table["suite"] == s.name] if len(table) else table, worlds[s.name])
                     for s in loaded_suites}
    for suite in loaded_suites:
        suite_metrics[suite.name]["errors"] = float(sum(e.suite == suite.name for e in errors))
    totals = aggregate(suite_metrics, table)
    totals["errors"] = float(len(errors))

    settings = {
        "pipeline": str(pipeline.name_or_path if isinstance(pipeline, MUMUPipeline) else Path(pipeline).resolve()),
        "steps": str(steps),
        "guidance": str(guidance),
        "seeds": ",".join(map(str, seeds)),
        "negative_prompt": "" if negative_prompt is None else negative_prompt,
        "scheduler": scheduler_class.__name__,
        "resolution": str(sampling.size),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "text_only_ablation": str(bool(text_only_ablation)),
        **{f"suite.{s.name}.version": s.version for s in loaded_suites},
        **{f"suite.{s.name}.sha256": s.sha256[:16] for s in loaded_suites},
        **{f"suite.{s.name}.entries": str(len(s.entries) + len(s.errors)) for s in loaded_suites},
        **{f"models.{k}": v for k, v in models.describe().items()},
    }
    # Per suite, its world's figures and the binding judge's, each rate with its interval.
    headlines = {}
    for name, world in worlds.items():
        parts = [world.headline(suite_metrics[name]) if world is not None else "",
                 binding_headline(suite_metrics[name])]
        if line := " | ".join(part for part in parts if part):
            headlines[name] = line
    ranked_by = list(dict.fromkeys(world.main_metric for world in worlds.values() if world is not None))
    result = EvalResult(table, suite_metrics, totals, errors, settings, out_dir, headlines=headlines,
                        ranked_by=ranked_by)
    write_report(result, generated, names)

    # 5. MLflow.
    if mlflow_run:
        result.tracking_uri = project_tracking_uri(tracking_uri, default=store_beside(out_dir))
        existing = mlflow_run if isinstance(mlflow_run, str) else None
        run_tags = dict(tags or {})
        trained_by = None if isinstance(pipeline, MUMUPipeline) else training_mlflow_run(pipeline)
        if trained_by is not None and trained_by != existing:
            run_tags.setdefault(TRAINED_BY_TAG, trained_by)
        result.run_id = log_mlflow(result, result.tracking_uri, experiment, existing, run_name, run_tags)
        write_summary(result)  # again, now with the run id
    for error in errors:
        logger.warning("entry error: %s", error)
    logger.info("evaluated %d images in %.1f s, %d errors", len(table), time.perf_counter() - started, len(errors))
    return result


__all__ = [
    "DEFAULT_EXPERIMENT",
    "EvalModels",
    "EvalResult",
    "PipelineFolderError",
    "TRAINED_BY_TAG",
    "check_pipeline_folder",
    "evaluate",
]
