"""MUMU pipelines in the MLflow model registry, as pyfunc models that generate from a prompt.

`register_pipeline(pipeline_dir, name)` logs a pipeline folder as an MLflow pyfunc model (the
folder is its `pipeline` artifact, the wrapper is code, not a pickle) into a run and registers
it as a new version of `name`; `set_alias` points an alias such as `champion` at a version, and
`promote_if_better` moves it only when a candidate's metric beats the current holder's. Load a
registered model anywhere with `mlflow.pyfunc.load_model("models:/mumu-toy@champion")`.

The model's input is a pandas DataFrame, one row per image to generate:

    prompt    str, required   the prompt's text form: "a <img:crop.png> circle"
    images    dict, optional  {reference: base64-encoded PNG (or JPEG)} for every <img:...> tag
                              of the prompt; images travel inline, nothing is read from the
                              serving machine's disk
    seed      int, optional   torch.Generator seed (default 0)
    steps     int, optional   denoising steps (default: model config `steps`, else the
                              pipeline's saved sampling defaults, else 50)
    guidance  float, optional guidance scale (default: model config `guidance`, else the
                              pipeline's saved sampling defaults, else 6.0)
    height, width  int, optional  output size in pixels (default: the pipeline's saved
                              resolution, else its native size)

The output is a DataFrame with one column, `image`: each row's result as base64-encoded PNG.
A bad row (unparsable prompt, missing or undecodable image) raises ValueError naming the row
and field. The model config (`model_config=` of `register_pipeline`, overridable at load time)
takes `device` and `dtype` (as `mumu generate` reads them; default cuda + bfloat16 when there
is a GPU, else cpu + float32), `steps` and `guidance` (default: the pipeline's own). Only the
keys given to `register_pipeline` are stored with the model: MLflow also logs them as params of
the run the model goes into, and an evaluation run already holds its own `steps`, `device`, ...
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from PIL import Image, UnidentifiedImageError

from .tracking import TRAINED_BY_TAG, ensure_experiment, ensure_store, project_tracking_uri, training_mlflow_run

PIPELINE_ARTIFACT = "pipeline"
MODEL_NAME = "model"  # the logged model's name inside its run
CHAMPION = "champion"
REGISTRY_EXPERIMENT = "mumu-registry"  # where a pipeline registered without a run is logged
# None: resolved when the model loads (the device and dtype by `resolve_device_dtype`; the steps and
# guidance are the pipeline's own sampling defaults, saved with it).
DEFAULT_MODEL_CONFIG: dict[str, Any] = {"device": None, "dtype": None, "steps": None, "guidance": None}

# Distributions the model needs at serving time (mumu_model itself travels as code).
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "diffusers", "accelerate", "safetensors",
                 "pillow", "numpy", "pandas", "pyyaml")
_MODEL_REFERENCE = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)@(?P<alias>[A-Za-z0-9_-]+)$")
# Executed by MLflow when the model loads ("models from code"): no pickled class in the model.
_MODEL_CODE = (
    "from mlflow.models import set_model\n\n"
    "from mumu_model.registry import MUMUPyfuncModel\n\n"
    "set_model(MUMUPyfuncModel())\n"
)


class MUMUPyfuncModel(mlflow.pyfunc.PythonModel):
    """A MUMU pipeline behind MLflow's pyfunc interface; the input and output are in the module
    docstring."""

    def load_context(self, context) -> None:
        from .devices import resolve_device_dtype
        from .loading import load_pipeline

        config = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        device, dtype = resolve_device_dtype(config["device"], config["dtype"])
        self.pipe = load_pipeline(context.artifacts[PIPELINE_ARTIFACT], device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        defaults = self.pipe.sampling_defaults
        self.steps = int(config["steps"]) if config["steps"] is not None else defaults.num_inference_steps
        self.guidance = float(config["guidance"]) if config["guidance"] is not None else defaults.guidance_scale

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
            raise ValueError("MUMU model input: expected a pandas DataFrame with a 'prompt' column")
        encoded = []
        for index, row in enumerate(model_input.to_dict("records")):
            prompt = self._prompt(row, index)
            image = self.pipe(
                prompt,
                height=_optional_int(row, "height", None, index),
                width=_optional_int(row, "width", None, index),
                num_inference_steps=_optional_int(row, "steps", self.steps, index),
                guidance_scale=_optional_float(row, "guidance", self.guidance, index),
                generator=torch.Generator("cpu").manual_seed(_optional_int(row, "seed", 0, index)),
            ).images[0]
            encoded.append(encode_png(image))
        return pd.DataFrame({"image": encoded})

    def _prompt(self, row: dict[str, Any], index: int):
        from .prompt import MultimodalPrompt, PromptError

        text = row.get("prompt")
        if not isinstance(text, str):
            raise ValueError(f"row {index}: prompt: expected the text form as a str, got {type(text).__name__}")
        supplied = row.get("images")
        if _missing(supplied):
            supplied = {}
        if not isinstance(supplied, Mapping):
            raise ValueError(f"row {index}: images: expected a mapping of reference -> base64 PNG, "
                             f"got {type(supplied).__name__}")
        images = {str(name): decode_image(data, f"row {index}: images[{name!r}]") for name, data in supplied.items()}
        try:
            return MultimodalPrompt.from_text(text, images=images, max_images=self.pipe.config.max_images)
        except PromptError as err:
            raise ValueError(f"row {index}: prompt: {err}") from None


# -- images as text ---------------------------------------------------------------------------------


def encode_png(image: Image.Image) -> str:
    """An image as base64-encoded PNG (the model's output, and how inputs are sent)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str | bytes, where: str = "image") -> Image.Image:
    """A base64-encoded PNG/JPEG as an RGB image; ValueError naming `where` if it is not one.
    The size is checked from the header before anything is decoded."""
    from .images import DEFAULT_MAX_PIXELS, to_rgb

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError(f"{where}: not base64 text") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"]) as image:
                width, height = image.size
                if width * height > DEFAULT_MAX_PIXELS:
                    raise ValueError(f"{where}: image too large: {width}x{height} pixels, at most {DEFAULT_MAX_PIXELS}")
                image.load()
                return to_rgb(image)
    except UnidentifiedImageError:
        raise ValueError(f"{where}: not a PNG or JPEG image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{where}: corrupt or too large image ({type(err).__name__})") from None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _optional_int(row: dict[str, Any], field: str, default: int | None, index: int) -> int | None:
    value = row.get(field)
    if _missing(value):
        return default
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"row {index}: {field}: expected an integer, got {value!r}")
    return int(value)


def _optional_float(row: dict[str, Any], field: str, default: float, index: int) -> float:
    value = row.get(field)
    return default if _missing(value) else float(value)


# -- registering ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model) on `uri`, the process-wide setting restored afterwards."""
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous_tracking = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
        for key, value in saved_env.items():  # set_*_uri also writes them into the environment
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _requirements() -> list[str]:
    pinned = []
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    inputs = Schema([
        ColSpec(DataType.string, "prompt"),
        ColSpec(Map(DataType.string), "images", required=False),
        ColSpec(DataType.long, "seed", required=False),
        ColSpec(DataType.long, "steps", required=False),
        ColSpec(DataType.double, "guidance", required=False),
        ColSpec(DataType.long, "height", required=False),
        ColSpec(DataType.long, "width", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string, "image")]))


def register_pipeline(
    pipeline_dir: str | Path,
    name: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    *,
    model_config: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log `pipeline_dir` as a pyfunc model and register it as a new version of `name`.

    Args:
        pipeline_dir: a MUMU pipeline folder (checked first: a missing or incomplete folder
            raises ValueError); it is copied into the run's artifacts.
        name: the registered model (created on first use).
        tracking_uri: the store, which is also the registry; default
            `mumu_model.tracking.project_tracking_uri()`.
        run_id: the run to log the model into, e.g. the evaluation run that scored the
            pipeline, so that the version's run holds its metrics; None starts a run in the
            `mumu-registry` experiment.
        model_config: defaults of the loaded model (`DEFAULT_MODEL_CONFIG` keys); only these
            are stored with it (and logged as the run's params, as MLflow does), the others
            resolve when it loads.
        tags: version tags; `mumu.trained_by` (the training run) is added when the folder was
            exported by a training run.

    Returns the new version number (a str, as MLflow gives it).
    """
    from mlflow import MlflowClient

    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(f"pipeline {pipeline_dir}: not a pipeline folder (no model_index.json)")
    unknown = set(model_config or {}) - set(DEFAULT_MODEL_CONFIG)
    if unknown:
        raise ValueError(f"model_config: unknown keys {sorted(unknown)} (known: {sorted(DEFAULT_MODEL_CONFIG)})")
    uri = ensure_store(project_tracking_uri(tracking_uri))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version_tags = {"mumu.pipeline": str(pipeline_dir.resolve()), **(tags or {})}
    trained_by = training_mlflow_run(pipeline_dir)
    if trained_by is not None:
        version_tags.setdefault(TRAINED_BY_TAG, trained_by)
    if run_id is None:
        experiment = ensure_experiment(client, REGISTRY_EXPERIMENT, uri)
        run_id = client.create_run(experiment, run_name=f"register-{name}", tags=version_tags).info.run_id
    else:
        client.get_run(run_id)  # an unknown run fails here, in MLflow's words

    with tempfile.TemporaryDirectory() as tmp, _tracking(uri), mlflow.start_run(run_id=run_id), \
            warnings.catch_warnings():
        # An input example would make MLflow load the model and generate to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        code = Path(tmp) / "mumu_pyfunc.py"
        code.write_text(_MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(code),
            artifacts={PIPELINE_ARTIFACT: str(pipeline_dir.resolve())},
            code_paths=[str(Path(__file__).resolve().parent)],  # mumu_model: the code of these weights
            # Only what the caller set: the rest resolves at load time (`load_context`), and
            # MLflow logs the model config as params of the run, where an evaluation run's own
            # `steps`, `guidance`, `device` and `dtype` would refuse other values.
            model_config=dict(model_config) if model_config else None,
            signature=_signature(),
            pip_requirements=_requirements(),  # given, so MLflow does not load the model to infer them
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


# -- aliases ----------------------------------------------------------------------------------------


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Point `name@alias` at `version` (moving it if another version held it)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def alias_version(name: str, alias: str, tracking_uri: str | None = None):
    """The `ModelVersion` that `name@alias` points at, or None when the alias (or model) is unset."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def parse_model_reference(text: str) -> tuple[str, str] | None:
    """(name, alias) of `models:/<name>@<alias>` or `<name>@<alias>`; None for anything else."""
    match = _MODEL_REFERENCE.match(text.strip())
    return (match["name"], match["alias"]) if match else None


def beats(candidate: float | None, champion: float | None) -> bool:
    """Whether a candidate's score takes the alias: it must be a number, and strictly higher than
    the champion's when there is a champion score (metrics here are higher-is-better)."""
    if candidate is None or math.isnan(candidate):
        return False
    return champion is None or math.isnan(champion) or candidate > champion


def promote_if_better(
    name: str, version: str | int, metric: str, value: float | None, tracking_uri: str | None = None,
    alias: str = CHAMPION,
) -> bool:
    """Move `name@alias` to `version` if `value` beats the current holder's `metric`, which is
    read from the holder's run (the evaluation it was registered from; a holder without that
    metric has no score to defend). Returns whether the alias moved."""
    client = _client(tracking_uri)
    holder = alias_version(name, alias, tracking_uri)
    champion = None
    if holder is not None:
        if str(holder.version) == str(version):
            return False
        if holder.run_id:
            champion = client.get_run(holder.run_id).data.metrics.get(metric)
    if not beats(value, champion):
        return False
    client.set_registered_model_alias(name, alias, str(version))
    return True


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    uri = ensure_store(project_tracking_uri(tracking_uri))
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


__all__ = [
    "CHAMPION",
    "DEFAULT_MODEL_CONFIG",
    "MUMUPyfuncModel",
    "PIPELINE_ARTIFACT",
    "TRAINED_BY_TAG",
    "alias_version",
    "beats",
    "decode_image",
    "encode_png",
    "parse_model_reference",
    "promote_if_better",
    "register_pipeline",
    "set_alias",
]
