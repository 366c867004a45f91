"""A training run's identity: everything that sets where the run's weights head.

Three parts, hashed together into the run's id:
- the recipe: every `TrainConfig` field that changes the trained weights' trajectory (model,
  modes, learning rates and schedule shape, seeds, image sizes, ...), with the per-process batch
  replaced by the global batch, so the same recipe on another number of processes is the same run;
- the data: the training shards' version (`data_version` when the caller knows it, else DVC's
  hash of the shard folder, or an md5 over the shard files, computed at start);
- the starting weights: a content hash of the `init_from` folder (None when built from a profile).

Not part of it: fields that only say where, how often or how loudly (output folder, checkpoint
and log cadence, tracking, validation, export format, device, timeouts); how the same steps are
computed (activation checkpointing, mixed precision, the per-process batch and the process count
when `global_batch_size` is set, HSDP groups, data workers): what users change after an
out-of-memory error or on another cluster; and how long the run goes (`max_steps`): extending a
run continues it (a cosine schedule is stretched to the new end from the step it resumes at).
`resume_changes` lists such changes when a run resumes. A run with a new identity gets its own
folder, `output_dir/runs/<run id>/`, and its own MLflow run; `resume=latest` continues only a
checkpoint of the same identity.
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
    "max_steps",  # the run's length: extending it continues the run
    "activation_checkpointing",  # memory settings: the same steps, computed another way
    "mixed_precision",
    "cache_latents",
    "device",
    "dist_timeout_s",
    "check_fit",
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
# Written into `output_dir` by rank 0 of a preempted run (step, checkpoint, run id), removed when a
# run starts: how a launcher that sees only a failed job (torchrun exits 1 whatever its workers'
# status; a Kubernetes Job reports failed) tells a preemption from a failure.
PREEMPTED_FILE = "preempted.json"


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


def data_version(shards: tuple[str, ...], shard_files: list[Path], state_dir: str | os.PathLike | None = None) -> str:
    """The data's version: DVC's hash when `shards` names folders (what dvc.lock records for each,
    joined by '+' in order; through DVC's state database when `state_dir` or the folder's DVC
    repository has one, so unchanged shards are not read again), else an md5 over the names and
    md5s of the shard files."""
    if shards and all(Path(s).is_dir() for s in shards):
        from ..data.versioning import dvc_hash, dvc_state_dir

        return "+".join(dvc_hash(s, state_dir=dvc_state_dir(s) or state_dir) for s in shards)
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
    labels = {"global_batch_size": "global batch (global_batch_size, else batch_size x processes)",
              "data": "data version", "init": "starting weights (init_from)"}
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            out.append(f"{label} {old.get(key)} -> {new.get(key)}")
    return out


# Config fields a resume may change without a word: where things go and run-by-run bookkeeping.
QUIET = frozenset({"resume", "tags", "run_name", "output_dir", "shards", "init_from", "data_version"})


def resume_changes(saved: dict, saved_world_size: int, config: TrainConfig, world_size: int) -> list[str]:
    """What a resume changes without changing the run, one readable item per field: the fields
    of a checkpoint's config (`saved`) that differ from `config`, and the process count."""
    out = []
    current = config.to_dict()
    for name in sorted(set(current) - QUIET):
        if name in saved and saved[name] != current[name]:
            out.append(f"{name} {saved[name]!r} -> {current[name]!r}")
    if saved_world_size != world_size:
        out.append(f"processes {saved_world_size} -> {world_size}")
    return out
