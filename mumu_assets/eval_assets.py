"""The evaluation asset: the trained pipeline scored on the versioned prompt suites, logged to
the project's MLflow store (the training runs' store), registered as a model version, and made
the `champion` when its main metric beats the current champion's."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# live annotations.
from pathlib import Path

import dagster as dg
import pandas as pd

from eval.targets import check_targets, parse_targets
from mumu_model.atomic import write_bytes_atomic
from mumu_model.tracking import DEFAULT_TRACKING_URI

from .datasets import EVALUATIONS, EVALUATION_SUMMARY
from .metadata import preview
from .params import REPO_ROOT, params
from .resources import DatasetStorage
from .training_assets import stage1_model, stage2_model

# Defaults from params.yaml's `evaluation` group (a profile's params file sets its own, e.g. the
# toy world's colour suite with the text-only ablation); the paper's protocol where it has none.
E = params(group="evaluation") or {}
PROFILE = params(group="profile")
BUILTIN_SUITES = [str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "eval" / "suites").glob("*.yaml"))]


class EvalModelsResource(dg.ConfigurableResource):
    """The models behind the metrics (paths or hub ids); None leaves a metric out."""

    clip: str | None = None
    dino: str | None = None
    pickscore: str | None = None
    detector: str | None = None
    face: str | None = "dlib"
    sdxl: str | None = None

    def models(self):
        from eval.run import EvalModels

        return EvalModels(clip=self.clip, dino=self.dino, pickscore=self.pickscore, detector=self.detector,
                          face=self.face, sdxl=self.sdxl)


class EvaluationConfig(dg.Config):
    # The stage-2 output; set to runs/stage1/pipeline for stage 1.
    pipeline: str = E.get("pipeline", "runs/stage2/pipeline")
    suites: list[str] = E.get("suites") or BUILTIN_SUITES  # null in params: every built-in suite
    steps: int = E.get("steps", 50)  # paper: 50 DDIM steps, guidance 6, no negative prompt
    guidance: float = E.get("guidance", 6.0)
    seeds: list[int] = E.get("seeds", [0, 1])
    resolution: int | None = E.get("resolution", None)
    # None: $MLFLOW_TRACKING_URI, else params' evaluation.tracking_uri, else sqlite:///runs/mlflow.db:
    # the store training logs to, so an evaluation sits beside the run it scored.
    tracking_uri: str | None = None
    # Also generate each prompt with its images removed and score it apart (`_text_only` metrics).
    text_only_ablation: bool = E.get("text_only_ablation", False)
    batch_size: int = E.get("batch_size", 1)  # prompts per pipeline call (speed and memory only)
    # Where and in what the pipelines run: cpu, cuda, cuda:N, mps; float32, bfloat16, float16.
    # None: cuda in bfloat16 when CUDA is available, else cpu in float32.
    device: str | None = E.get("device", None)
    dtype: str | None = E.get("dtype", None)
    # Register the evaluated pipeline as a version of `model_name` (a copy of the pipeline in the
    # store's artifacts: the toy's is small, the paper's is tens of GB) and move `champion_alias`
    # to it when `champion_metric` (None: eval.compare.main_metric of the suites) beats the
    # champion's; an evaluation with entry errors never takes the alias.
    register_model: bool = E.get("register_model", False)
    model_name: str = E.get("model_name", f"mumu-{PROFILE}" if PROFILE else "mumu")
    champion_metric: str | None = E.get("champion_metric", None)
    champion_alias: str = E.get("champion_alias", "champion")
    # 'suite/metric' -> '>= 0.5' or '<= 0.25': what the profile's model is held to. The
    # `meets_targets` check reports every figure against its target (a warning, never blocking),
    # and the MLflow run gets the same as `target/<suite>/<metric>` metrics (1 met, 0 not).
    targets: dict[str, str] = E.get("targets") or {}


@dg.asset(group_name="evaluation", deps=[stage1_model, stage2_model, dg.AssetKey("scorer_model")], kinds={"mlflow"},
          check_specs=[dg.AssetCheckSpec("meets_targets", asset="evaluation")])
def evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, storage: DatasetStorage,
    eval_models: EvalModelsResource,
) -> dg.MaterializeResult:
    """DreamBench metrics, multimodal CLIP score, PickScore, face consistency and text adherence
    per suite; a summary table and grids here, the same in MLflow for `mumu eval compare`."""
    from eval.reporting import SAMPLES_GRID
    from eval.run import evaluate
    from mumu_model.devices import resolve_device_dtype
    from mumu_model.tracking import project_tracking_uri

    try:  # a bad value fails here, before anything is loaded, naming the config field
        device, dtype = resolve_device_dtype(config.device, config.dtype)
        parse_targets(config.targets)
    except ValueError as err:
        raise dg.Failure(description=f"evaluation config: {err}") from None
    context.log.info(f"evaluating on {device} in {str(dtype).removeprefix('torch.')}")
    out_dir = EVALUATIONS.member(storage, context.run_id)
    tracking_uri = project_tracking_uri(config.tracking_uri, default=E.get("tracking_uri") or DEFAULT_TRACKING_URI)
    result = evaluate(
        config.pipeline, [Path(s) for s in config.suites], models=eval_models.models(), steps=config.steps,
        guidance=config.guidance, seeds=tuple(config.seeds), out_dir=out_dir, resolution=config.resolution,
        tracking_uri=tracking_uri, run_name=f"eval-{context.run_id[:8]}", tags={"dagster_run_id": context.run_id},
        text_only_ablation=config.text_only_ablation, batch_size=config.batch_size, device=device, dtype=dtype,
    )
    # The latest scores at a fixed path: DVC's metrics file (`dvc metrics show / diff`).
    write_bytes_atomic(EVALUATION_SUMMARY.path(storage), (Path(result.out_dir) / "summary.json").read_bytes())
    summary = pd.DataFrame(result.suites).T
    summary.loc["aggregate"] = pd.Series(result.aggregate)
    # Intervals are in `headline` and the per-suite entries; the table keeps the rates readable.
    summary = summary[[c for c in summary.columns if "_ci_" not in c]]
    metadata = {
        "summary": dg.MetadataValue.md(summary.round(4).to_markdown()),
        "errors": dg.MetadataValue.int(len(result.errors)),
        "error_examples": dg.MetadataValue.json([str(e) for e in result.errors[:10]]),
        "mlflow_run_id": dg.MetadataValue.text(result.run_id or ""),
        "out_dir": dg.MetadataValue.path(str(result.out_dir)),
        "device": dg.MetadataValue.text(f"{device} {str(dtype).removeprefix('torch.')}"),
        "rows": preview(result.rows.drop(columns=[c for c in ("image",) if c in result.rows]), rows=8),
    }
    grids = sorted(Path(result.out_dir).rglob("*.png"))
    grids = [g for g in grids if "grid" in str(g)]
    if grids:
        metadata["grid"] = dg.MetadataValue.path(str(grids[0]))
    for name, value in result.aggregate.items():
        if isinstance(value, (int, float)):
            metadata[f"aggregate/{name}"] = dg.MetadataValue.float(float(value))
    if result.headlines:  # the suites' world and binding figures, each rate with its 95% interval
        metadata["headline"] = dg.MetadataValue.text("; ".join(f"{s}: {line}" for s, line in result.headlines.items()))
        for suite in result.headlines:  # and every rate of those suites with its interval and ablation
            metrics = result.suites[suite]
            for name, value in metrics.items():
                if f"{name.removesuffix('_text_only').split('_ci_')[0]}_ci_low" in metrics:
                    metadata[f"{suite}/{name}"] = dg.MetadataValue.float(float(value))
    if (Path(result.out_dir) / SAMPLES_GRID).is_file():  # the first entries of every suite, small
        metadata["samples"] = dg.MetadataValue.path(str(Path(result.out_dir) / SAMPLES_GRID))
    if config.register_model and result.run_id:
        metadata.update(_register(context, config, result))
    return dg.MaterializeResult(metadata=metadata, check_results=[_targets_check(context, config, result, tracking_uri)])


def _targets_check(context, config: EvaluationConfig, result, tracking_uri: str) -> dg.AssetCheckResult:
    """Every target's figure, met or not, as the check's metadata and as MLflow metrics."""
    checked = check_targets(result.suites, config.targets)
    for line in (r.line() for r in checked):
        context.log.info(f"target: {line}")
    if result.run_id and checked:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        for r in checked:
            client.log_metric(result.run_id, f"target/{r.name}", float(r.met))
        client.set_tag(result.run_id, "targets_met", f"{sum(r.met for r in checked)}/{len(checked)}")
    met = sum(r.met for r in checked)
    return dg.AssetCheckResult(
        check_name="meets_targets", passed=met == len(checked), severity=dg.AssetCheckSeverity.WARN,
        description=f"{met} of {len(checked)} targets met" if checked else "no targets set (evaluation.targets)",
        metadata={"met": dg.MetadataValue.int(met), "targets": dg.MetadataValue.int(len(checked)),
                  "figures": dg.MetadataValue.md("\n".join(f"- {r.line()}" for r in checked) or "-")},
    )


def champion_decision(config: EvaluationConfig, aggregate: dict, errors: int,
                      preferred: tuple[str, ...] = ()) -> tuple[str | None, float | None]:
    """(metric, value) that a registered evaluation competes with for the alias: the configured
    metric or the suites' main one (`preferred`: their worlds' main metrics first), as its
    `aggregate/` MLflow metric; value None when the evaluation cannot compete (no such metric,
    or entry errors left it incomplete)."""
    from eval.compare import main_metric

    name = config.champion_metric or main_metric(aggregate, preferred)
    if name is None:
        return None, None
    value = aggregate.get(name)
    return f"aggregate/{name}", (float(value) if value is not None and not errors else None)


def _register(context: dg.AssetExecutionContext, config: EvaluationConfig, result) -> dict:
    """Register the evaluated pipeline into the evaluation run; move the alias if it won."""
    from mumu_model.registry import promote_if_better, register_pipeline

    version = register_pipeline(config.pipeline, config.model_name, result.tracking_uri, run_id=result.run_id)
    metric, value = champion_decision(config, result.aggregate, len(result.errors), tuple(result.ranked_by))
    promoted = metric is not None and promote_if_better(
        config.model_name, version, metric, value, result.tracking_uri, alias=config.champion_alias)
    reference = f"models:/{config.model_name}@{config.champion_alias}"
    context.log.info(f"registered {config.model_name} version {version}; "
                     + (f"{reference} now points at it ({metric} {value:.4f})" if promoted
                        else f"{reference} stays ({metric} {value})"))
    return {
        "model_name": dg.MetadataValue.text(config.model_name),
        "model_version": dg.MetadataValue.text(version),
        "champion_metric": dg.MetadataValue.text(metric or ""),
        "champion": dg.MetadataValue.bool(promoted),
    }


EVAL_ASSETS = [evaluation]
