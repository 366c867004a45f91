"""A training run's identity: everything that changes what the run produces.

Three parts, hashed together into the run's id:
- the recipe: every `TrainConfig` field that changes the trained weights (model, modes, learning
  rates, steps, seeds, image sizes, ...), with the per-process batch replaced by the global batch,
  so the same recipe on another number of processes is the same run;
- the data: the training shards' version (`data_version` when the caller knows it, else DVC's
  hash of the shard folder, or an md5 over the shard files, computed at start);
- the starting weights: a content hash of the `init_from` folder (None when built from a profile).

Fields that only say where, how often or how loudly (output folder, checkpoint and log cadence,
tracking, validation, export format, device, timeouts) are not part of it. A run with a new
identity gets its own folder, `output_dir/runs/<run id>/`, and its own MLflow run; `resume=latest`
continues only a checkpoint of the same identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import TrainConfig

# Fields that do not change the trained weights.
NOT_IDENTITY = frozenset({
    "shards",  # stands for the data, identified by its version instead
    "data_version",
    "init_from",  # stands for the starting weights, identified by their content
    "batch_size",  # replaced by the global batch
    "global_batch_size",
    "cache_latents",
    "device",
    "dist_timeout_s",
    "hsdp_replicas",  # how the same computation is laid out on the ranks
    "output_dir",
    "checkpoint_every",
    "checkpoints_total_limit",
    "resume",
    "export_unet_lora",
    "export_dtype",
    "max_bad_fraction",
    "data_workers",
    "data_prefetch",
    "tracking",
    "tracking_uri",
    "artifact_location",
    "experiment",
    "run_name",
    "log_every",
    "validate_every",
    "validation_prompts",
    "validation_image_root",
    "validation_seeds",
    "validation_steps",
    "validation_guidance",
    "validation_resolution",
    "log_pipeline_artifact",
    "tags",
})

RUN_FILE = "run.json"


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted; hidden temp
    entries skipped). Symlinks are followed, so a training output's `pipeline` link hashes the
    run folder it points to."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"{path}: no files to hash")
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def data_version(shards: tuple[str, ...], shard_files: list[Path]) -> str:
    """The data's version: DVC's hash when `shards` names one folder (what dvc.lock records for
    it), else an md5 over the names and md5s of the shard files."""
    if len(shards) == 1 and Path(shards[0]).is_dir():
        from ..data.versioning import dvc_hash

        return dvc_hash(shards[0])
    digest = hashlib.md5()
    for file in sorted(shard_files):
        md5 = hashlib.md5()
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                md5.update(chunk)
        digest.update(f"{file}\0{md5.hexdigest()}\n".encode())
    return digest.hexdigest()


def run_identity(config: TrainConfig, world_size: int, data: str, init: str | None) -> dict:
    """The identity of the run `config` describes on `world_size` processes (see the module doc)."""
    recipe = {name: value for name, value in config.to_dict().items() if name not in NOT_IDENTITY}
    global_batch = config.global_batch_size or config.batch_size * world_size
    return {"recipe": recipe, "global_batch_size": global_batch, "data": data, "init": init}


def run_id(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def identity_differences(old: dict, new: dict) -> list[str]:
    """What differs between two identities, one readable item per field ('unet_lr 5e-06 -> 1e-05')."""
    out = []
    old_recipe, new_recipe = old.get("recipe", {}), new.get("recipe", {})
    for name in sorted(set(old_recipe) | set(new_recipe)):
        if old_recipe.get(name) != new_recipe.get(name):
            out.append(f"{name} {old_recipe.get(name)!r} -> {new_recipe.get(name)!r}")
    labels = {"global_batch_size": "global batch", "data": "data version", "init": "starting weights (init_from)"}
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            out.append(f"{label} {old.get(key)} -> {new.get(key)}")
    return out
