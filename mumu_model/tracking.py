"""MLflow for the whole project, and Dagster Pipes for training runs.

The store and its experiments (`project_tracking_uri`, `ensure_experiment`), batched logging
(`log_batch`), the link from a pipeline folder to the run that trained it
(`training_mlflow_run`), and a training run's `Tracker`: params, metrics, validation grids.

Only rank 0 tracks; other ranks get a `Tracker` whose methods do nothing. The default MLflow
store is a local sqlite file (MLflow 3's plain file store is in maintenance mode); a server
URI (`http://...`) works the same. A resumed run continues the MLflow run its checkpoint
names, so one training run is one MLflow run however often it was restarted.

Training and evaluation share one store, `sqlite:///runs/mlflow.db` unless MLFLOW_TRACKING_URI
says otherwise (`project_tracking_uri`); an evaluation finds the training run that exported a
pipeline folder with `training_mlflow_run`. A sqlite store is created once, under a file lock
beside the database (`ensure_store`), however many trainings and evaluations open it at once:
MLflow's own schema creation is not safe against a second process doing the same.

When Dagster launched the process through Pipes (its context is in the environment), progress
lines also go to Dagster's event log, at DEBUG: the trainer's own log already prints them on the
console, where Dagster's log is shown from INFO, so each line shows once there and the Dagster
UI still lists them. The end of the run reports an asset materialization. Without Pipes nothing
Pipes-related happens (no warning, no mock).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .training.config import TrainConfig

logger = logging.getLogger("mumu.training")

MLFLOW_BATCH = 100  # MLflow's limit on params / metrics per log_batch call


# The project's one MLflow store (training runs, evaluation runs, the model registry), relative
# to the project folder; `runs/` is the training output root of every profile.
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
# Tag of an evaluation run (and of a registered model version): the MLflow run that trained it.
TRAINED_BY_TAG = "mumu.trained_by"


def absolute_tracking_uri(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute against the working directory, so every
    process (and the artifact folder placed beside the database) names the same file."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"sqlite:///{Path(path).resolve()}"
    return uri


def project_tracking_uri(configured: str | None = None, default: str = DEFAULT_TRACKING_URI) -> str:
    """The store to log to: `configured` (an explicit setting), else $MLFLOW_TRACKING_URI, else
    `default` (a profile's params value, or `sqlite:///runs/mlflow.db`); relative sqlite paths
    made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default
    return absolute_tracking_uri(uri)


def store_beside(output_dir: str | Path) -> str:
    """A sqlite store in the parent of `output_dir`: `runs/mlflow.db` for `runs/stage1`, so runs
    written next to each other (training stages, evaluations) land in one database."""
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


def default_tracking_uri(config: TrainConfig) -> str:
    """`config.tracking_uri`, else $MLFLOW_TRACKING_URI, else the store beside the output folder."""
    return project_tracking_uri(config.tracking_uri, default=store_beside(config.output_dir))


def training_mlflow_run(pipeline_dir: str | Path) -> str | None:
    """The MLflow run id of the training run that exported `pipeline_dir`, or None.

    A trainer exports into `<output_dir>/runs/<run id>/pipeline` (`<output_dir>/pipeline` links
    there), beside the run's run.json and checkpoints. The id is read from run.json when it
    records one, else from the newest checkpoint's state.json. A folder that no training run
    wrote (`mumu init`, a copy) gives None.
    """
    from .training.checkpoint import CheckpointManager, read_state
    from .training.identity import RUN_FILE

    run_dir = Path(pipeline_dir).resolve().parent
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        recorded = json.loads(run_file.read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        return str(recorded)
    for _, checkpoint in reversed(CheckpointManager(run_dir).complete()):
        try:
            found = read_state(checkpoint).get("mlflow_run_id")
        except ValueError:
            continue
        if found:
            return str(found)
    return None


# The sqlite stores this process has made sure of (`ensure_store`).
_READY_STORES: set[str] = set()


def ensure_store(uri: str) -> str:
    """Make sure the MLflow store at `uri` exists, creating a sqlite one at most once however many
    processes open it at the same time; returns `uri`.

    MLflow creates a new sqlite database's tables (and runs its migrations) in whichever process
    opens it first, and two processes doing so at once collide ("table ... already exists",
    "duplicate column name"). Here the first opening happens under a file lock beside the database
    (`mlflow.db.lock`), so one process creates the tables and the others, waiting, find them
    made. Servers (`http://...`) and other databases create their schema themselves: untouched.
    """
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return uri
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])  # without SQLAlchemy's query options
    if path.name and str(path) != ":memory:":
        from filelock import FileLock
        from mlflow import MlflowClient

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            # Opening the store creates its tables when they are missing; a made store only opens.
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _READY_STORES.add(uri)
    return uri


def _artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        # Without one MLflow puts artifacts under ./mlruns of whatever the working directory is.
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client, name: str, uri: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing; a new experiment of a sqlite store keeps
    its artifacts in `mlartifacts/` beside the database unless `artifact_location` says where."""
    from mlflow.exceptions import MlflowException

    ensure_store(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location or _artifact_location(uri))
    except MlflowException:  # another process created it in between
        return client.get_experiment_by_name(name).experiment_id


def log_batch(client, run_id: str, params: Sequence = (), metrics: Sequence = ()) -> None:
    """Log MLflow `Param`s and `Metric`s in as many calls as MLflow's per-call limit needs."""
    for start in range(0, max(len(params), len(metrics)), MLFLOW_BATCH):
        client.log_batch(run_id, params=list(params[start:start + MLFLOW_BATCH]),
                         metrics=list(metrics[start:start + MLFLOW_BATCH]))


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

        self.uri = ensure_store(default_tracking_uri(config))
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
        return ensure_experiment(self.client, self.config.experiment, self.uri, self.config.artifact_location)

    # -- logging ----------------------------------------------------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]
        log_batch(self.client, self.run_id, params=items)

    def info(self, message: str) -> None:
        """A line for Dagster's event log when Dagster launched the run, at DEBUG: the Python log
        prints it on the console already (module docstring)."""
        if self.pipes is not None:
            self.pipes.log.debug(message)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.pipes is not None:  # at DEBUG, as `info`: the trainer's log prints its own line
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "grad_norm", "samples_per_s"))
            self.pipes.log.debug(f"step {step}: {shown}")
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        log_batch(self.client, self.run_id, metrics=items)

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
    from .images import pad_to_square

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

