"""Run tracking: MLflow (params, metrics, validation grids, the final pipeline) and Dagster Pipes.

Only rank 0 tracks; other ranks get a `Tracker` whose methods do nothing. The default MLflow
store is a local sqlite file (MLflow 3's plain file store is in maintenance mode); a server
URI (`http://...`) works the same. A resumed run continues the MLflow run its checkpoint
names, so one training run is one MLflow run however often it was restarted.

When Dagster launched the process through Pipes (its context is in the environment), progress
lines go to Dagster's log and the end of the run reports an asset materialization; otherwise
nothing Pipes-related happens (no warning, no mock).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .config import TrainConfig

logger = logging.getLogger("mumu.training")

MLFLOW_BATCH = 100  # MLflow's limit on params / metrics per log_batch call


def default_tracking_uri(config: TrainConfig) -> str:
    if config.tracking_uri:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(config.output_dir).resolve().parent / 'mlflow.db')}"


def _artifact_location(config: TrainConfig, uri: str) -> str | None:
    if config.artifact_location:
        return config.artifact_location
    if uri.startswith("sqlite:///"):
        # Without one MLflow puts artifacts under ./mlruns of whatever the working directory is.
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    """MLflow + Dagster Pipes for one training run; every method is a no-op when disabled."""

    def __init__(self, config: TrainConfig, enabled: bool, run_id: str | None = None, tags: dict | None = None):
        self.config = config
        self.enabled = enabled and config.tracking
        self.client = None
        self.run_id: str | None = None
        self.pipes = _open_pipes() if enabled else None
        if not self.enabled:
            return
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.uri = default_tracking_uri(config)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            try:  # a resumed run continues its MLflow run
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            except MlflowException:
                logger.warning("MLflow run %s of the checkpoint is not in %s; starting a new run", run_id, self.uri)
        if self.run_id is None:
            experiment = self._experiment_id()
            tags = {"mumu.stage": str(config.stage), **(tags or {})}
            if self.pipes is not None:  # launched by Dagster: link the MLflow run to the Dagster run
                tags["dagster_run_id"] = self.pipes.run_id
            tags.update({str(k): str(v) for k, v in config.tags.items()})
            run = self.client.create_run(experiment, run_name=config.run_name, tags=tags)
            self.run_id = run.info.run_id
            self.log_params(config.flat())

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.config.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(
                self.config.experiment, artifact_location=_artifact_location(self.config, self.uri)
            )
        except MlflowException:  # another run created it in between
            return self.client.get_experiment_by_name(self.config.experiment).experiment_id

    # -- logging ----------------------------------------------------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + MLFLOW_BATCH])

    def info(self, message: str) -> None:
        """A line for Dagster's log when Dagster launched the run (the Python log has it anyway)."""
        if self.pipes is not None:
            self.pipes.log.info(message)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.pipes is not None:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "grad_norm", "samples_per_s"))
            self.pipes.log.info(f"step {step}: {shown}")
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + MLFLOW_BATCH])

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, local_file: str | Path, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_file), artifact_path=artifact_path or None)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str, summary: dict | None = None) -> None:
        """End the MLflow run (FINISHED / FAILED / KILLED); report to Dagster on success."""
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
        if self.pipes is not None:
            if status == "FINISHED" and summary is not None:
                self.pipes.report_asset_materialization(metadata=_pipes_metadata(summary))
            self.pipes.close()
            self.pipes = None


# -- Dagster Pipes ----------------------------------------------------------------------------------


def _open_pipes():
    """The Pipes context when Dagster launched this process, else None."""
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
    except ImportError:
        return None
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return None
    return open_dagster_pipes()


def _pipes_metadata(summary: dict) -> dict:
    metadata = {}
    for key, value in summary.items():
        if value is None:
            continue
        if isinstance(value, Path) or (isinstance(value, str) and key.endswith(("_dir", "_path"))):
            metadata[key] = {"raw_value": str(value), "type": "path"}
        elif isinstance(value, (int, float, str, bool)):
            metadata[key] = value
        else:
            metadata[key] = str(value)
    return metadata


# -- validation grids -------------------------------------------------------------------------------


def validation_grid(rows: list[tuple[str, list[Image.Image], list[Image.Image]]], cell: int) -> Image.Image:
    """One row per prompt: its conditioning images, a gap, then one output per seed.

    `rows` holds (prompt text, input images, outputs). Inputs are padded to square and shown
    at the outputs' size so crops can be compared with what the model drew; the prompt's
    text is written under each row.
    """
    from ..images import pad_to_square

    label = 14
    columns = max(len(inputs) for _, inputs, _ in rows) + 1 + max(len(outputs) for _, _, outputs in rows)
    grid = Image.new("RGB", (columns * cell, len(rows) * (cell + label)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    inputs_width = max(len(inputs) for _, inputs, _ in rows)
    for row, (text, inputs, outputs) in enumerate(rows):
        top = row * (cell + label)
        for column, image in enumerate(inputs):
            grid.paste(pad_to_square(image).resize((cell, cell)), (column * cell, top))
        for column, image in enumerate(outputs):
            grid.paste(image.resize((cell, cell)), ((inputs_width + 1 + column) * cell, top))
        draw.text((2, top + cell + 1), text[:200], fill=(0, 0, 0))
    return grid

