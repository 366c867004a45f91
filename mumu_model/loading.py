"""Open a saved MUMU pipeline: check that a folder is one, then load it where it will run.

`check_pipeline_folder` reads only `model_index.json` and the component folders, so a command
can refuse an incomplete folder before it loads anything. `load_pipeline` takes a folder or a
hub id and raises `PipelineFolderError` in one line naming the folder and the problem.
`write_sampling_defaults` records in a saved folder the steps, guidance and size its model
samples best with (model_index.json's `sampling_*` values, which `MUMUPipeline` reads).
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


def _component_config(path: Path, name: str) -> dict:
    return json.loads((path / name / "config.json").read_text())


def folder_size_multiple(path: str | Path) -> int | None:
    """What a pipeline folder's output height and width must be multiples of, read from its VAE
    and UNet configs without loading weights; None when the folder does not say (a hub id, a
    missing or unreadable config)."""
    try:
        vae, unet = _component_config(Path(path), "vae"), _component_config(Path(path), "unet")
        # Each VAE block after the first halves the image; so does each UNet level after the first.
        return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def folder_native_size(path: str | Path) -> int:
    """The UNet's native output size of a pipeline folder, in pixels (its sample size in latent
    cells times the VAE's downsampling), read from the configs."""
    path = Path(path)
    try:
        vae, unet = _component_config(path, "vae"), _component_config(path, "unet")
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PipelineFolderError(f"pipeline {path}: cannot read the UNet's and VAE's configs: {err}") from None


def write_sampling_defaults(
    path: str | Path, num_inference_steps: int, guidance_scale: float, resolution: int | None = None
) -> dict:
    """Save the settings a pipeline folder's model samples best with into its model_index.json,
    where `MUMUPipeline` reads them (`sampling_defaults`) for calls that give none, as
    `set_sampling_defaults` + `save_pretrained` would. `resolution` None: the UNet's native size.
    Nothing but model_index.json is touched (it is replaced atomically). Returns what was written."""
    from .atomic import write_bytes_atomic
    from .pipeline import check_sampling_defaults

    path = check_pipeline_folder(path)
    if resolution is None:
        resolution = folder_native_size(path)
    try:
        check_sampling_defaults(num_inference_steps, guidance_scale, resolution, folder_size_multiple(path))
    except ValueError as err:
        raise PipelineFolderError(f"pipeline {path}: {err}") from None
    written = {"sampling_steps": num_inference_steps, "sampling_guidance": float(guidance_scale),
               "sampling_resolution": resolution}
    index_file = path / "model_index.json"
    index = {**json.loads(index_file.read_text()), **written}
    # diffusers' own layout: sorted keys, two-space indent.
    write_bytes_atomic(index_file, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return written


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
