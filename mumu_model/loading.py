"""Open a saved MUMU pipeline: check that a folder is one, then load it where it will run.

`check_pipeline_folder` reads only `model_index.json` and the component folders, so a command
can refuse an incomplete folder before it loads anything. `load_pipeline` takes a folder or a
hub id and raises `PipelineFolderError` in one line naming the folder and the problem.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .pipeline import MUMUPipeline


class PipelineFolderError(ValueError):
    """The pipeline folder cannot be a MUMU pipeline: raised before anything else runs."""


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


def load_pipeline(source: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> MUMUPipeline:
    """Load the pipeline at `source` (a folder, checked first, or a hub id) in `dtype` (None: as
    saved) and move it to `device`."""
    from .pipeline import MUMUPipeline

    if Path(source).exists():
        check_pipeline_folder(source)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        with warnings.catch_warnings():
            # diffusers' rename of torch_dtype (a FutureWarning) would add lines to a one-line error.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = MUMUPipeline.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineFolderError(f"pipeline {source}: cannot load: {first}") from err
    return pipe.to(device)
