"""One flat, typed config for a MUMU training run (nanoGPT style).

A run is described by a YAML file of `TrainConfig` fields plus `--set field=value` overrides,
in that order; anything not given keeps its default. The defaults ARE the paper's recipe
(Table 1): ViT frozen; ViT->LM connector and LM with rank-8 LoRA at lr 3e-6; the adapter fully
trained at lr 1e-5; the SDXL UNet with a rank-8 LoRA at lr 5e-6. A tiny/toy config may set any
module to `full`.

    model_profile: tiny            # or paper; model_overrides: {adapter_layers: 2, ...}
    shards: [data/captions/stage1/*.tar]
    resolution: 64
    max_steps: 1000
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import PATCH_SIZE, PROFILES

# The parts of MUMU that train separately, each with its own mode and learning rate (Table 1).
MODULES = ("vision", "connector", "text", "adapter", "unet")
MODES = ("frozen", "lora", "full")


@dataclass(frozen=True)
class TrainConfig:
    # -- model --------------------------------------------------------------------------------
    # Build the model from a profile of mumu_model.config (paper: load Idefics2-8b and SDXL
    # base; tiny: random tiny parts) with `model_overrides` (ModelConfig fields)...
    model_profile: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    # ...or start from a saved MUMU pipeline folder, a training output folder (its pipeline/),
    # or a training checkpoint folder (step-N/, LoRA merged in): stage 2 starts from stage 1.
    init_from: str | None = None
    stage: int = 1  # 1: up to 4 images at 252 px; 2: one face/person crop at 504 px

    # -- data ---------------------------------------------------------------------------------
    # WebDataset tars written by mumu_model.data.shards.write_shard: files, folders (every
    # *.tar inside) or glob patterns, relative to the working directory.
    shards: tuple[str, ...] = ()
    resolution: int = 1024  # side of the (square) target image, in pixels
    image_size: int = 252  # side each conditioning image is resized to: 252 px = 324 tokens
    max_images: int = 4  # images per prompt (stage 2: 1)
    conditioning_dropout: float = 0.1  # fraction of prompts replaced by the empty prompt (CFG)
    augment_probability: float = 0.2  # fraction of conditioning images augmented (paper: 20%)
    # Each augmented image gets one of these, uniformly (paper: crop, flip, noise, grayscale);
    # also margin, scale, jitter (mumu_model.training.data.EXTRA_AUGMENTATIONS).
    augmentations: tuple[str, ...] = ("crop", "flip", "noise", "grayscale")
    # Visits per epoch of each sample, one weight per `shards` entry (empty: 1 each): mixes
    # sources of different sizes, e.g. [1.0, 0.2] (mumu_model.training.data.DataConfig).
    shard_weights: tuple[float, ...] = ()
    cache_latents: bool = False  # cache VAE latents of targets on disk (output_dir/latents)
    data_workers: int = 2  # processes decoding samples ahead of training; 0 decodes in the training process
    data_prefetch: int = 2  # batches each worker decodes ahead
    data_seed: int | None = None  # the data stream's seed; None: `seed`

    # -- what trains, and how fast (paper Table 1) -----------------------------------------
    vision: str = "frozen"
    vision_lr: float = 3e-6
    connector: str = "lora"
    connector_lr: float = 3e-6
    text: str = "lora"
    text_lr: float = 3e-6
    adapter: str = "full"
    adapter_lr: float = 1e-5
    unet: str = "lora"
    unet_lr: float = 5e-6
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: alpha = rank (scale 1)

    # -- optimisation -------------------------------------------------------------------------
    batch_size: int = 4  # per process and micro-step
    # Samples per optimizer step over all processes; None: batch_size x world size. When set,
    # each process accumulates global_batch_size / (batch_size x world size) micro-steps, so a
    # run can resume on another number of processes and train exactly the same recipe.
    global_batch_size: int | None = None
    max_steps: int = 300_000
    warmup_steps: int = 1000  # linear warm-up from 0, then `lr_schedule`
    lr_schedule: str = "constant"  # "constant" or "cosine" (to min_lr_ratio x lr at max_steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # EMA of the trainable weights, in [0, 1); 0 disables. Validation images and the exported
    # pipeline use the EMA weights; checkpoints keep both. It averages over about
    # 1 / (1 - ema_decay) steps (1,000 at 0.999), with diffusers' EMAModel warm-up (decay at
    # step t = min(ema_decay, (1 + t) / (10 + t))) so short runs do not keep the initial weights.
    # EMA weights sample better than the raw weights at toy scale; see docs/toy_learning.md.
    ema_decay: float = 0.0
    mixed_precision: str = "no"  # "bf16": autocast + FSDP bf16 params on GPU only; "no": fp32
    activation_checkpointing: bool = False
    # Replica groups for HSDP: 1 shards the model over every rank (FSDP); N > 1 shards it within
    # each group of world_size / N ranks and replicates it across the groups (set N = nodes:
    # parameter all-gathers stay on a node's fast links, only gradients cross nodes).
    hsdp_replicas: int = 1
    seed: int = 0
    device: str | None = None  # None: this worker's GPU (mumu_model.devices.worker_device), else cpu
    # How long a collective may wait for the slowest rank before the run fails (NCCL's default
    # is 10 minutes). Rank-0-only work (export, MLflow uploads) runs after the other ranks left.
    dist_timeout_s: float = 600.0
    # On a GPU, stop before loading anything when the memory estimate (`mumu train --dry-run`)
    # says the run does not fit; false (`mumu train --skip-fit-check`) when you know better.
    check_fit: bool = True

    # -- output and checkpoints -------------------------------------------------------------
    output_dir: str = "runs/mumu"
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    checkpoints_total_limit: int | None = 3  # keep the newest N checkpoints; None keeps all
    # None (start a new run), "latest" (newest complete checkpoint of the run with this run's
    # identity: same recipe, data and starting weights) or a step-N folder of such a run.
    resume: str | None = None
    export_unet_lora: bool = True  # also write unet_lora/ when the UNet has a LoRA
    export_dtype: str = "bfloat16"  # dtype of the exported pipeline: bfloat16, float16 or float32
    # The training data's version (its DVC hash) when the caller knows it (the Dagster asset
    # does); None: computed from the shards' content at start. Part of the run's identity.
    data_version: str | None = None
    # Stop with an error naming the shards when more than this share of the samples is unreadable.
    max_bad_fraction: float = 0.01

    # -- tracking (MLflow on rank 0; Dagster Pipes when launched by Dagster) -----------------
    tracking: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///<output_dir's parent>/mlflow.db, so runs
    # beside each other (stage 1, stage 2, sweeps) land in one database to compare.
    tracking_uri: str | None = None
    artifact_location: str | None = None  # new experiments only; None: beside a sqlite db
    experiment: str = "mumu"
    run_name: str | None = None
    log_every: int = 10
    validate_every: int = 1000  # steps; 0 disables; validation also runs at the end
    validation_prompts: tuple[str, ...] = ()  # text form: "a <img:red_circle.png> circle"
    validation_image_root: str | None = None  # folder the prompts' image paths are confined to
    validation_seeds: tuple[int, ...] = (0,)
    validation_steps: int = 50  # DDIM steps (paper: 50)
    validation_guidance: float = 6.0  # paper: 6
    validation_resolution: int | None = None  # None: `resolution`
    # MLflow always gets the UNet LoRA, the adapter and the config; the whole pipeline (tens of GB
    # at paper size) only when asked.
    log_pipeline_artifact: bool = False
    tags: dict = field(default_factory=dict)  # e.g. {dagster_run_id: ..., data_dvc_hash: ...}

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"train config: {message}")

        if self.hsdp_replicas < 1:
            fail(f"hsdp_replicas must be at least 1, got {self.hsdp_replicas}")
        if self.model_profile not in PROFILES:
            fail(f"model_profile must be one of {sorted(PROFILES)}, got {self.model_profile!r}")
        if self.stage not in (1, 2):
            fail(f"stage must be 1 or 2, got {self.stage}")
        for module in MODULES:
            mode = getattr(self, module)
            if mode not in MODES:
                fail(f"{module} must be one of {MODES}, got {mode!r}")
            if mode != "frozen" and not getattr(self, f"{module}_lr") > 0:
                fail(f"{module}_lr must be > 0 when {module} trains, got {getattr(self, f'{module}_lr')}")
        if all(getattr(self, module) == "frozen" for module in MODULES):
            fail("every module is frozen: nothing would train")
        if self.image_size <= 0 or self.image_size % PATCH_SIZE:
            fail(f"image_size must be a positive multiple of {PATCH_SIZE}, got {self.image_size}")
        for name in ("resolution", "batch_size", "max_steps", "lora_rank", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_prefetch < 1:
            fail(f"data_prefetch must be >= 1, got {self.data_prefetch}")
        for name in ("warmup_steps", "validate_every", "max_images", "data_workers"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            fail(f"global_batch_size must be >= 1 or null, got {self.global_batch_size}")
        if not self.dist_timeout_s > 0:
            fail(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.export_dtype not in ("bfloat16", "float16", "float32"):
            fail(f"export_dtype must be bfloat16, float16 or float32, got {self.export_dtype!r}")
        from .data import check_augmentations, check_shard_weights

        try:
            check_augmentations(self.augmentations)
            check_shard_weights(self.shards, self.shard_weights)
        except ValueError as err:
            fail(str(err))
        for name in ("conditioning_dropout", "augment_probability", "min_lr_ratio", "max_bad_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            fail(f"ema_decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            fail(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "bf16"):
            fail(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.grad_clip < 0:
            fail(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            fail(f"checkpoints_total_limit must be >= 1 or null, got {self.checkpoints_total_limit}")
        if not self.validation_seeds and self.validation_prompts:
            fail("validation_prompts are set but validation_seeds is empty")
        unknown = set(self.model_overrides) - {f.name for f in dataclasses.fields(PROFILES["tiny"])}
        if unknown:
            fail(f"model_overrides has unknown ModelConfig fields {sorted(unknown)}")
        # The data decides these, not the model: one source of truth.
        clashes = {"image_size", "max_images"} & set(self.model_overrides)
        if clashes:
            fail(f"set {sorted(clashes)} as training fields, not in model_overrides")

    @property
    def lrs(self) -> dict[str, float]:
        return {module: getattr(self, f"{module}_lr") for module in MODULES}

    @property
    def modes(self) -> dict[str, str]:
        return {module: getattr(self, module) for module in MODULES}

    def to_dict(self) -> dict:
        """Plain JSON/YAML types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict[str, str]:
        """Every field as a string, nested dicts flattened to `a.b`: MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                if not value:
                    out[prefix] = "{}"
                for key, item in sorted(value.items()):
                    walk(f"{prefix}.{key}", item)
            elif isinstance(value, list):
                out[prefix] = json.dumps(value)
            else:
                out[prefix] = str(value)

        for key, value in self.to_dict().items():
            walk(key, value)
        return out

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` processes."""
        if self.global_batch_size is None:
            return 1
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train config: global_batch_size {self.global_batch_size} is not a multiple of batch_size "
                f"{self.batch_size} x {world_size} process(es)"
            )
        return self.global_batch_size // per_step


def _coerce(name: str, value, hint):
    """A YAML value or a --set string as the field's declared type, or a ValueError naming it."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in allowed:
            return None
        raise ValueError(f"train config: field {name!r} cannot be null")
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None):
            continue
        if origin is tuple:
            item = typing.get_args(kind)[0]
            if isinstance(value, str):  # --set shards=a.tar,b.tar or a YAML flow list
                parsed = yaml.safe_load(value) if value.startswith("[") else value.split(",")
                value = parsed if isinstance(parsed, list) else [parsed]
            if isinstance(value, (list, tuple)):
                return tuple(item(v) if not isinstance(v, item) else v for v in value)
            return (item(value),)
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, dict):
                return dict(value)
            continue
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            continue
        if origin is str:
            return str(value)
        try:
            if origin is int and isinstance(value, float) and not value.is_integer():
                continue
            return origin(value)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"train config: field {name!r} expects {hint}, got {value!r}")


def parse_overrides(items: typing.Sequence[str]) -> dict[str, str]:
    """`["field=value", ...]` (the CLI's --set) to a mapping; values are parsed by field type."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"override {item!r} is not of the form field=value")
        values[name.strip()] = raw.strip()
    return values


def load_train_config(
    path: str | Path | None = None,
    overrides: typing.Mapping[str, object] | typing.Sequence[str] = (),
) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then overrides (a mapping or "field=value" strings)."""
    values: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"train config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"train config {path}: expected a mapping of TrainConfig fields")
        values.update(loaded)
    hints = typing.get_type_hints(TrainConfig)
    items = overrides.items() if isinstance(overrides, typing.Mapping) else parse_overrides(overrides).items()
    for name, value in items:
        # "tags.dagster_run_id=..." or "model_overrides.encoder=..." sets one key of a dict field.
        head, dot, key = name.partition(".")
        if dot and hints.get(head) is dict:
            # Tags stay strings as given (a hash "0123" must not become the YAML int 83);
            # model_overrides values are YAML scalars (adapter_layers=2 is an int).
            if head != "tags" and isinstance(value, str):
                value = yaml.safe_load(value)
            values[head] = {**(values.get(head) or {}), key: value}
        else:
            values[name] = value
    where = f" ({path})" if path is not None else ""
    for name in list(values):
        if name not in hints:
            raise ValueError(f"train config{where}: unknown field {name!r}; fields are {sorted(hints)}")
        values[name] = _coerce(name, values[name], hints[name])
    return TrainConfig(**values)


def config_from_dict(values: dict) -> TrainConfig:
    """A config saved by `to_dict` (a checkpoint's state.json) back as a TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{name: _coerce(name, value, hints[name]) for name, value in values.items() if name in hints})
