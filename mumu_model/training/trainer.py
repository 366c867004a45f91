"""Train MUMU: the paper's two stages, one process or many (torchrun + FSDP2).

Top to bottom: the module being trained (encoder + adapter + UNet), how each part is frozen,
LoRA'd or fully trained (paper Table 1), the optimizer and LR schedule, the loss, and the
`Trainer` that runs steps, checkpoints, validates and writes the final pipeline.

The loss is SDXL's: epsilon-prediction MSE (or v-prediction MSE when the pipeline's scheduler
says `prediction_type="v_prediction"`, as the toy profile's does). Targets go through the VAE
(posterior mean x scaling factor, `data.vae_latents`, optionally cached), t ~ U{0..999}, noise
is added with the pipeline scheduler's training schedule (DDPM from its config), and the conditioning comes
from `encode_inputs`, the one function sampling uses too: dropped prompts are the empty prompt,
encoded exactly like the unconditional branch of classifier-free guidance.

LR schedule: linear warm-up from ~0 over `warmup_steps`, then constant (default) or cosine
down to `min_lr_ratio` x lr at `max_steps`. One AdamW param group per module (named
"vision", "connector", "text", "adapter", "unet"), each with its own lr; weight decay applies
to every trainable tensor of a group (one group per module keeps the lrs inspectable).

EMA (`ema_decay` > 0, `ema.EMA`): a moving average of exactly the trainable tensors, updated
after every optimizer step. Validation generates with it swapped in, checkpoints save it
(`ema.<name>` tensors) and resume restores it, and the exported pipeline / UNet LoRA are built
from it; the raw weights keep training underneath.

Runs. A run is identified by its recipe, its data version and its starting weights
(`identity`); it lives in `output_dir/runs/<run id>/` (checkpoints, exports, run.json) and the
latest finished run's exports are linked from `output_dir/pipeline` and `output_dir/unet_lora`.
New data or a changed recipe starts a new run beside the old one; `resume=latest` continues only
a checkpoint of the same identity, on any number of processes (`global_batch_size` keeps the
recipe; every step's noise is drawn for the whole global batch from one generator that every
rank advances alike and checkpoints carry), with other memory settings or a longer `max_steps`
(the run's message says what changed and how the LR schedule goes on). docs/training.md has
the table.

Ranks never wait on rank-0-only work: after the last collective (final checkpoint, validation)
every other rank leaves, and rank 0 alone exports and uploads.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..atomic import atomic_dir, write_bytes_atomic
from ..build import DTYPES, build_pipeline
from ..config import load_model_config
from ..devices import cast_pipeline
from ..encoder import configure_processor
from ..lora import add_unet_lora, export_unet_lora
from ..pipeline import MUMUPipeline, encode_inputs
from ..prompt import MultimodalPrompt
from . import checkpoint as ckpt
from . import parallel
from .checkpoint import STATE_FILE, CheckpointManager
from .config import MODULES, TrainConfig, config_from_dict, load_train_config
from .ema import EMA
from .identity import (PREEMPTED_FILE, RUN_FILE, content_hash, data_version, identity_differences, resume_changes, run_id,
                       run_identity)
from ..tracking import Tracker, validation_grid

logger = logging.getLogger("mumu.training")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing of that step was saved."""


class Preempted(Exception):
    """SIGTERM (a preemption, an eviction, a spot reclaim) stopped the run after the step it was
    in, once every rank had written the checkpoint of that step; `run` again to continue."""


# The exit status of a preempted run: sysexits' EX_TEMPFAIL, "try again later". Launchers requeue
# on it (docs/training.md); the requeued run resumes from the checkpoint written on the way out.
REQUEUE_EXIT_CODE = 75


class SigtermFlag:
    """While the block runs (in the main thread), SIGTERM sets `received` instead of ending the
    process, so the training loop can end its step, write a checkpoint and stop; the previous
    handler (by default: exit at once) is back outside the block, export included."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> "SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class DataChanged(ValueError):
    """A training shard changed on disk while the run was reading it (a refusal, like bad data)."""


# -- the module being trained ---------------------------------------------------------------------


class MUMUTrainModel(nn.Module):
    """Encoder + adapter + UNet as one module: one state dict for checkpoints, FSDP's root.

    Holds the pipeline's own modules (not copies), so the pipeline generates with the weights
    being trained. forward() is the training forward: conditioning through `encode_inputs`,
    then the UNet's noise prediction.
    """

    def __init__(self, encoder: nn.Module, adapter: nn.Module, unet: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.unet = unet

    def forward(
        self,
        encoder_inputs: dict[str, torch.Tensor],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        embeds, pooled, mask = encode_inputs(self.encoder, self.adapter, encoder_inputs, noisy_latents.device)
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample


# Which parameters belong to which trainable part (names as in MUMUTrainModel's state dict).
MODULE_PREFIXES = {
    "vision": "encoder.vision_model.",
    "connector": "encoder.connector.",
    "text": "encoder.text_model.",
    "adapter": "adapter.",
    "unet": "unet.",
}

# LoRA targets inside the encoder (relative to it; peft matches the whole name). The connector
# is Idefics2's modality projection MLP; in the LM and the ViT, attention and MLP projections.
ENCODER_LORA_TARGETS = {
    "vision": r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
    "connector": r"connector\.modality_projection\.(gate_proj|up_proj|down_proj)",
    "text": r"text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
}


def module_of(name: str) -> str:
    """The trainable part ("vision", ..., "unet") a parameter name belongs to."""
    name = parallel.clean_name(name)
    for module, prefix in MODULE_PREFIXES.items():
        if name.startswith(prefix):
            return module
    raise ValueError(f"parameter {name!r} belongs to none of {sorted(MODULE_PREFIXES)}")


# -- building the model -----------------------------------------------------------------------------


def resolve_init(path: str | Path) -> tuple[str, Path]:
    """What `init_from` names: ("pipeline", folder), ("checkpoint", folder); or a ValueError.

    A training output folder stands for its `pipeline/` (the latest finished run's export). A
    pipeline folder must be complete: every component model_index.json lists has its folder
    with a config and, for models, safetensors weights.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return "checkpoint", path
    folder = path if (path / "model_index.json").is_file() else path / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"init_from={str(path)!r}: not a MUMU pipeline folder (model_index.json), a training output "
            f"folder (pipeline/model_index.json) or a checkpoint folder ({STATE_FILE})"
        )
    index = json.loads((folder / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        part = folder / name
        configs = [f for f in ("config.json", "scheduler_config.json", "processor_config.json",
                               "preprocessor_config.json", "tokenizer_config.json") if (part / f).is_file()]
        if not part.is_dir() or not configs:
            raise ValueError(f"init_from={str(path)!r} is incomplete: {part} has no config (component {name!r})")
        if name in ("encoder", "adapter", "unet", "vae") and not any(part.glob("*.safetensors")):
            raise ValueError(f"init_from={str(path)!r} is incomplete: no *.safetensors weights in {part}")
    return "pipeline", folder.resolve()


def load_init_pipeline(path: str | Path) -> MUMUPipeline:
    """A MUMU pipeline folder, a training output folder (its pipeline/), or a checkpoint folder."""
    kind, folder = resolve_init(path)
    if kind == "pipeline":
        return MUMUPipeline.from_pretrained(folder)
    pipe, model = trained_model_from_checkpoint(folder)  # its EMA weights if it has them
    merge_loras(model)
    return pipe


def previous_unet_lora(init_from: str | Path | None):
    """The UNet LoRA of the stages `init_from` comes from, for `export_unet_lora(previous=...)`.

    A pipeline folder: the LoRA its run exported beside it (`<run dir>/unet_lora`, every stage so
    far); a checkpoint: that checkpoint's own UNet LoRA (its EMA when it has one) as
    (state dict, LoRA config); None when there is none.
    """
    if init_from is None:
        return None
    kind, folder = resolve_init(init_from)
    if kind == "pipeline":
        lora = folder.parent / "unet_lora"
        return lora if lora.is_dir() else None
    weights, state = ckpt.load_weights(folder)
    config = config_from_dict(state["config"])
    # A checkpoint names the model's parameters (peft's `...to_q.lora_A.default.weight`); LoRA
    # files, and the readers, use peft's saved names, which leave out the adapter's name.
    lora = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", name): tensor
            for name, tensor in weights.items() if name.startswith("unet.") and "lora_" in name}
    if not lora:
        return None
    return lora, {"r": config.lora_rank, "lora_alpha": config.lora_alpha or config.lora_rank}


def load_base_pipeline(config: TrainConfig) -> MUMUPipeline:
    """The model training starts from, before any LoRA: a profile build or `init_from`."""
    if config.init_from is None:
        # Master weights in fp32 (bf16 compute comes from autocast / FSDP's policy on GPU).
        overrides = {"dtype": "float32", **config.model_overrides,
                     "image_size": config.image_size, "max_images": config.max_images}
        return build_pipeline(load_model_config(config.model_profile, overrides))
    pipe = load_init_pipeline(config.init_from)
    # Stage 2 changes the conditioning resolution (252 -> 504 px in the paper): the ViT's
    # position embeddings are interpolated per image, so only the processor changes.
    configure_processor(pipe.processor, config.image_size)
    return pipe


def add_loras(model: MUMUTrainModel, config: TrainConfig) -> None:
    """Inject the LoRAs the config asks for (before freezing: peft freezes what it wraps)."""
    from peft import LoraConfig, inject_adapter_in_model

    alpha = config.lora_alpha or config.lora_rank
    patterns = [ENCODER_LORA_TARGETS[m] for m in ("vision", "connector", "text") if config.modes[m] == "lora"]
    if patterns:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=alpha, target_modules="(" + "|".join(patterns) + ")")
        inject_adapter_in_model(lora, model.encoder)
    if config.unet == "lora":
        add_unet_lora(model.unet, rank=config.lora_rank, alpha=alpha)


def set_trainable(model: MUMUTrainModel, config: TrainConfig) -> None:
    """frozen: nothing trains; lora: only the LoRA matrices; full: every parameter of the part."""
    found_lora = {module: False for module in MODULES}
    for name, param in model.named_parameters():
        module = module_of(name)
        mode = config.modes[module]
        is_lora = "lora_" in name
        found_lora[module] |= is_lora
        param.requires_grad_(mode == "full" or (mode == "lora" and is_lora))
    for module in MODULES:
        if config.modes[module] == "lora" and not found_lora[module]:
            raise ValueError(f"{module}: mode is lora but no LoRA layer was injected (no target matched)")


def setup_model(config: TrainConfig) -> tuple[MUMUPipeline, MUMUTrainModel]:
    """Base pipeline + LoRAs + trainable flags; identical on every rank (FSDP shards copies)."""
    pipe = load_base_pipeline(config)
    model = MUMUTrainModel(pipe.encoder, pipe.adapter, pipe.unet)
    torch.manual_seed(config.seed)  # LoRA initialisation: the same on every rank and on resume
    add_loras(model, config)
    set_trainable(model, config)
    pipe.vae.requires_grad_(False)
    return pipe, model


def merge_loras(module: nn.Module) -> int:
    """Fold every peft LoRA into its base layer and put the plain layer back; returns the count.

    The result has the original classes and parameter names, so the pipeline saves and loads
    as a plain MUMUPipeline.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, BaseTunerLayer):
            continue
        layer.merge()
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, layer.get_base_layer())
        merged += 1
    for sub in module.modules():  # peft's and diffusers' markers of an injected adapter
        if hasattr(sub, "peft_config"):
            del sub.peft_config
        if getattr(sub, "_hf_peft_config_loaded", False):
            sub._hf_peft_config_loaded = False
    return merged


def trained_model_from_checkpoint(path: str | Path, ema: bool | None = None) -> tuple[MUMUPipeline, MUMUTrainModel]:
    """The model a checkpoint was trained from, with its trained weights (LoRAs not merged).

    ema=None: the EMA weights when the run kept an EMA (the model it delivers), else the raw
    last-step weights; False: always the raw weights.
    """
    weights, state = ckpt.load_weights(path, ema=ema)
    config = config_from_dict(state["config"])
    pipe, model = setup_model(config)
    load_trainable(model, weights, where=str(path))
    return pipe, model


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load trainable weights by name into an unsharded model; every name must match."""
    params = {parallel.clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


# -- optimisation ----------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one named param group per trainable part, at that part's lr (Table 1)."""
    groups = []
    for module in MODULES:
        params = [p for n, p in model.named_parameters() if p.requires_grad and module_of(n) == module]
        if params:
            groups.append({"name": module, "params": params, "lr": config.lrs[module]})
    # foreach: one kernel per op over all tensors. torch picks it by default on GPU only; on CPU
    # the per-tensor loop costs as much as a small model's backward pass.
    return torch.optim.AdamW(
        groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=config.weight_decay,
        foreach=True,
    )


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of each group's lr for optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)  # never exactly 0 (nanoGPT)
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_continuation(old: TrainConfig, new: TrainConfig, step: int) -> str:
    """How the LR schedule goes on from `step` when a resume changes max_steps (one phrase)."""
    if step >= new.max_steps:
        return f"step {step} is already at max_steps {new.max_steps} or past it: nothing more trains"
    if new.lr_schedule == "constant":
        return f"the learning rate schedule (constant after warm-up) goes on unchanged to step {new.max_steps}"
    return (f"the cosine schedule now decays to min_lr_ratio at step {new.max_steps}: lr factor at step {step} "
            f"{lr_factor(old, step):.3g} -> {lr_factor(new, step):.3g}")


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    loss: float | None  # mean loss over the last `log_every` steps
    losses: list[float] = field(default_factory=list)  # every step this process ran
    checkpoint: Path | None = None
    pipeline_dir: Path | None = None
    unet_lora_dir: Path | None = None
    mlflow_run_id: str | None = None
    run_id: str | None = None
    run_dir: Path | None = None
    new_run: bool = True  # False: continued a checkpoint of the same run


def _shard_patterns(shards: tuple[str, ...]) -> tuple[str, ...]:
    """A folder stands for every tar in it (the caption assets write data/captions/stage1/*.tar)."""
    return tuple(str(Path(s) / "*.tar") if Path(s).is_dir() else s for s in shards)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


BLANK_KEY = "__mumu_blank__"


def with_vision_row(batch: dict, processor) -> dict:
    """`batch` with one more row, a prompt of one blank image weighted 0 in the loss, when none
    of its prompts holds an image.

    Under FSDP every rank must run the same modules in the same order in every step (each
    gathers its parameters together with the other ranks). A batch whose prompts were all
    dropped (or are all text) would skip the vision tower on one rank while the others run it;
    the extra row keeps every rank on the same path and changes no gradient.
    """
    from PIL import Image

    from ..encoder import encoder_inputs, processor_image_size
    from .data import merge_encoder_inputs

    if "pixel_values" in batch["encoder_inputs"]:
        return batch
    rows = len(batch["keys"])
    size = processor_image_size(processor)
    blank = encoder_inputs(processor, [MultimodalPrompt([Image.new("RGB", (size, size), (128, 128, 128))])])
    inputs = batch["encoder_inputs"]
    merged = merge_encoder_inputs([{k: v[i : i + 1] for k, v in inputs.items()} for i in range(rows)] + [dict(blank)],
                                  processor.tokenizer.pad_token_id)
    weights = batch.get("loss_weight", torch.ones(rows))
    return {
        **batch,
        "encoder_inputs": merged,
        "pixel_values": torch.cat([batch["pixel_values"], torch.zeros_like(batch["pixel_values"][:1])]),
        "keys": [*batch["keys"], BLANK_KEY],
        "loss_weight": torch.cat([weights, torch.zeros(1)]),
    }


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


class Trainer:
    def __init__(self, config: TrainConfig):
        from diffusers import DDPMScheduler

        from .data import DataConfig, LatentCache, expand_shards, make_loader

        if not config.shards:
            raise ValueError("train config: shards is empty; list the caption shards (tar files, folders or globs)")
        self.dist = parallel.init_distributed(config.device, config.dist_timeout_s)
        self.device = self.dist.device
        self.accumulation = config.accumulation_steps(self.dist.world_size)
        self.output_dir = Path(config.output_dir)
        self.bf16 = config.mixed_precision == "bf16" and self.device.type == "cuda"
        if config.mixed_precision == "bf16" and not self.bf16:
            logger.warning("mixed_precision=bf16 applies on GPU only; training in fp32 on %s", self.device)
        if config.init_from is not None:
            # The folder it names now: a training output's `pipeline` link moves when a newer run
            # finishes, and this run (its checkpoints, its export) must keep rebuilding from this one.
            _, folder = resolve_init(config.init_from)
            config = dataclasses.replace(config, init_from=str(folder))
        self.config = config

        # Validation prompts are parsed first: a typo fails now, not after hours of training.
        self.validation = [
            (text, MultimodalPrompt.from_text(text, config.validation_image_root, max_images=None))
            for text in config.validation_prompts
        ]

        # The run: its identity (hashing the data and the starting weights is rank 0's job).
        shard_files = expand_shards(_shard_patterns(config.shards))
        self._shard_stats = {path: _stat(path) for path in shard_files}
        # Rank 0 may hash for longer than `dist_timeout_s`: the others wait on a group of their own.
        setup = parallel.setup_group()
        identity = None
        if self.dist.is_main:
            data = config.data_version or data_version(config.shards, shard_files, self.output_dir / ".dvc-state")
            init = content_hash(config.init_from) if config.init_from else None
            identity = run_identity(config, self.dist.world_size, data, init)
        self.identity = json.loads(parallel.broadcast_bytes(json.dumps(identity).encode(), torch.device("cpu"), setup))
        self.run_id = run_id(self.identity)
        self.run_dir = self.output_dir / "runs" / self.run_id
        self.checkpoints = CheckpointManager(self.run_dir, config.checkpoints_total_limit)
        resume = self._resolve_resume(config.resume)
        self.new_run = resume is None

        if self.device.type == "cuda" and config.check_fit:  # fail before loading tens of GB when it cannot fit
            from .sizing import check_fits

            check_fits(config, self.dist.world_size, torch.cuda.get_device_properties(self.device).total_memory)

        # Model: built on the meta device, LoRA'd, frozen (in bf16 when computing in bf16),
        # checkpointed and sharded from outside, then each rank loads only its own shards.
        from .sharded_init import build_sharded

        self.pipe, self.model = build_sharded(
            config, self.device, frozen_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            activation_checkpointing=config.activation_checkpointing, mp_bf16=self.bf16, fsdp=self.dist.sharded,
            hsdp_replicas=config.hsdp_replicas,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.trainable = {parallel.clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(self.model, config)  # after sharding: DTensor params
        # The EMA shadows the same (sharded) parameter objects the optimizer updates.
        self.ema = None
        if config.ema_decay > 0:
            trainable = [(parallel.clean_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.ema = EMA(trainable, config.ema_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(config, step))
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"the pipeline's scheduler predicts {self.noise_scheduler.config.prediction_type!r}; "
                "the trainer supports 'epsilon' (SDXL) and 'v_prediction'"
            )
        # Noise and timesteps of every step come from this generator, the same on every rank.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + 1)
        self._step_noise: tuple[torch.Tensor, torch.Tensor] | None = None
        self._micro = 0  # the micro-batch of the step being computed

        # Data: this rank's slice of a deterministic, resumable stream.
        data_config = DataConfig(
            shards=_shard_patterns(config.shards),
            resolution=config.resolution,
            conditioning_dropout=config.conditioning_dropout,
            augment_probability=config.augment_probability,
            augmentations=config.augmentations,
            shard_weights=config.shard_weights,
            max_images=config.max_images,
            seed=config.seed if config.data_seed is None else config.data_seed,
        )
        # Each rank indexes its share of the shards and the ranks exchange the parts; workers
        # decode ahead while the main process keeps the (resumable) position.
        gather = (lambda data: parallel.all_gather_bytes(data, self._comm)) if self.dist.sharded else None
        self.loader = make_loader(data_config, self.pipe.processor, config.batch_size, self.dist.rank,
                                  self.dist.world_size, config.data_workers, config.data_prefetch, gather=gather)
        self.stream = self.loader.stream
        found = ckpt.read_state(resume).get("bad_data") if resume is not None else None
        if found is not None:  # what the run found unusable before this restart counts against its limit
            self.stream.load_found_state(found)
        # Damaged shards (and a resumed run past its limit) fail here, on every rank.
        self.loader.check_bad_fraction(config.max_bad_fraction)
        self.latent_cache = None
        if config.cache_latents:
            self.latent_cache = LatentCache(self.output_dir / "latents", self.pipe.vae, writer=f"rank{self.dist.rank}")

        # Resume: weights, optimizer, EMA, LR schedule, data position, step, MLflow run.
        self.step = 0
        self.last_saved: int | None = None
        self.run_message = f"run {self.run_id}"
        self.previous_run: str | None = None
        mlflow_run = None
        if self.dist.is_main:
            self.checkpoints.remove_partial()
            self._write_run_file()
        if resume is not None:
            mlflow_run = self._load_checkpoint(resume)
        elif self.dist.is_main:
            self._log_new_run()
        self.batches = self._batches()
        self.tracker = Tracker(config, enabled=self.dist.is_main, run_id=mlflow_run,
                               tags={"mumu.run_id": self.run_id, "data_version": self.identity["data"]})
        self.tracker.info(self.run_message)
        self.losses: list[float] = []
        self._last_skipped: dict = {}

    @property
    def _comm(self) -> torch.device:
        return self.device  # gloo talks CPU tensors, nccl CUDA tensors: the training device

    def _batches(self):
        loaded = iter(self.loader)
        if not self.dist.sharded:
            return loaded
        return (with_vision_row(batch, self.pipe.processor) for batch in loaded)

    # -- the run's identity ----------------------------------------------------------------------

    def _resolve_resume(self, resume: str | None) -> Path | None:
        """The checkpoint to continue: none, this run's latest, or a named one of the same identity."""
        if resume is None:
            return None
        if resume == "latest":
            return self.checkpoints.latest()
        path = Path(resume)
        state = ckpt.read_state(path)
        differences = identity_differences(state.get("identity", {}), self.identity)
        if differences:
            raise ValueError(
                f"resume={resume!r}: the checkpoint belongs to another run (run {state.get('run_id')}, this config "
                f"is run {self.run_id}); it differs in: {'; '.join(differences)}. Resume with the same recipe, data "
                "and init_from, or start a new run (resume=null)"
            )
        return path

    def _write_run_file(self) -> None:
        run_file = self.run_dir / RUN_FILE
        if not run_file.is_file():
            record = {"run_id": self.run_id, "identity": self.identity, "created": time.time()}
            write_bytes_atomic(run_file, json.dumps(record, indent=1).encode())

    def _log_new_run(self) -> None:
        """Say that a new run starts, and how it differs from the last one in this output folder."""
        others = []
        for run_file in (self.output_dir / "runs").glob(f"*/{RUN_FILE}"):
            if run_file.parent.name != self.run_id:
                record = json.loads(run_file.read_text())
                others.append((record.get("created", 0), run_file.parent, record))
        if not others:
            self.run_message = f"new run {self.run_id} in {self.run_dir}"
        else:
            _, folder, record = max(others, key=lambda item: item[0])
            differences = identity_differences(record.get("identity", {}), self.identity)
            self.previous_run = str(folder)
            self.run_message = (f"new run {self.run_id} in {self.run_dir}: it differs from the previous run "
                                f"{folder.name} (kept in {folder}) in: {'; '.join(differences)}")
        logger.info(self.run_message)

    def _check_data_unchanged(self) -> None:
        for path, stat in self._shard_stats.items():
            if not path.is_file() or _stat(path) != stat:
                raise DataChanged(
                    f"training shard {path} changed on disk during the run (size/mtime differ from when training "
                    f"started at this run's first step); the data this run trains on is no longer the data its "
                    f"identity names. Stop writing to the training data while a run reads it, then start again"
                )

    # -- one step ------------------------------------------------------------------------------

    def latents(self, batch: dict) -> torch.Tensor:
        from .data import vae_latents

        if self.latent_cache is not None:
            latents = self.latent_cache.get_batch(batch["keys"], batch["pixel_values"])
        else:
            latents = vae_latents(self.pipe.vae, batch["pixel_values"].to(self.device))
        return latents.to(self.device, torch.float32)

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator | None):
        """Noise and timesteps for a batch of latents: from `generator` when given; else this
        rank's rows of the step's table for the current micro-batch (`_draw_step_noise`)."""
        steps = self.noise_scheduler.config.num_train_timesteps
        if generator is not None:
            noise = torch.randn(latents.shape, generator=generator, device=generator.device)
            timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=generator.device)
            return noise.to(self.device), timesteps.to(self.device)
        if self._step_noise is None:
            self._step_noise = self._draw_step_noise(latents.shape[1:])
        noise, timesteps = self._step_noise
        # Rank r holds slots r, r+W, ... of the stream, so its row j of micro-batch m is the
        # step's global row (m B + j) W + r; rows past the table (a blank row) get row 0, weight 0.
        world, batch = self.dist.world_size, self.config.batch_size
        rows = [((self._micro * batch + j) * world + self.dist.rank) for j in range(latents.shape[0])]
        rows = torch.tensor([row if row < len(noise) else 0 for row in rows], device=noise.device)
        return noise[rows].to(self.device), timesteps[rows].to(self.device)

    def _draw_step_noise(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps of every sample of one optimizer step (the global batch, in the
        data stream's global order), from one generator every rank advances alike: the draws
        do not depend on how the batch is split over processes and micro-batches, and a
        checkpoint carries the generator, so a resumed run draws exactly what an uninterrupted
        one would, on any number of processes."""
        size = self.config.batch_size * self.dist.world_size * self.accumulation
        generator = self.noise_generator
        noise = torch.randn((size, *shape), generator=generator, device=generator.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=generator,
                                  device=generator.device)
        return noise, timesteps

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising MSE on one batch; noise and timesteps as `draw_noise` gives them."""
        latents = self.latents(batch)
        size = latents.shape[0]
        noise, timesteps = self.draw_noise(latents, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        # SDXL micro-conditioning: original size, crop top-left, target size (as at inference).
        res = self.config.resolution
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=self.device).repeat(size, 1)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            prediction = self.model(batch["encoder_inputs"], noisy, timesteps, time_ids)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = batch.get("loss_weight")
        if weights is None:
            return F.mse_loss(prediction.float(), target.float())
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        weights = weights.to(per_sample.device)
        return (per_sample * weights).sum() / weights.sum()

    def train_step(self, batches: dict | list[dict]) -> dict[str, float]:
        """One optimizer update over one batch or several micro-batches (gradient accumulation);
        raises TrainingDiverged (before touching the weights) on NaN/inf."""
        micro = [batches] if isinstance(batches, dict) else list(batches)
        self.model.train()
        mean_loss, dropped = 0.0, 0.0
        self._step_noise = None
        for self._micro, batch in enumerate(micro):
            loss = self.compute_loss(batch, None) / len(micro)
            # Every rank sees the same mean loss, so all stop together (backward is collective).
            part = parallel.all_reduce_mean(loss.detach()).item()
            if not math.isfinite(part):
                self.optimizer.zero_grad(set_to_none=True)
                self._diverged(f"loss is {part * len(micro)}", batch)
            mean_loss += part
            dropped += float(batch["dropped"].float().mean()) / len(micro)
            loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(f"gradient norm is {grad_norm}", micro[-1])
        lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": mean_loss, "grad_norm": grad_norm, "dropped_fraction": dropped, **lrs}
        if self.ema is not None:
            metrics["ema_decay"] = self.ema.update(self.step)  # the decay this step used (warm-up)
        self.step += 1
        return metrics

    def _diverged(self, what: str, batch: dict) -> None:
        last = self.checkpoints.latest()
        raise TrainingDiverged(
            f"{what} at step {self.step + 1} (batch keys {batch['keys'][:4]}); stopped without saving "
            f"this state; the last good checkpoint is {last if last else 'none (no checkpoint yet)'}"
        )

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        config = self.config
        logger.info(
            "run %s: training from step %d to %d: %d process(es) x batch %d x %d micro-step(s), modes %s, in %s",
            self.run_id, self.step, config.max_steps, self.dist.world_size, config.batch_size, self.accumulation,
            config.modes, self.run_dir,
        )
        global_batch = config.batch_size * self.dist.world_size * self.accumulation
        if self.dist.is_main:
            (self.output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        window_losses: list[float] = []
        window_time = 0.0
        status = "FAILED"
        try:
            with SigtermFlag() as sigterm:
                while self.step < config.max_steps:
                    started = time.perf_counter()  # throughput includes reading and collating the data
                    metrics = self.train_step([next(self.batches) for _ in range(self.accumulation)])
                    window_time += time.perf_counter() - started
                    self.losses.append(metrics["loss"])
                    window_losses.append(metrics["loss"])
                    if self.step % config.log_every == 0 or self.step == config.max_steps:
                        # Means over the steps since the last log; lrs and grad norm of this step.
                        metrics["loss"] = sum(window_losses) / len(window_losses)
                        metrics["step_time_s"] = window_time / len(window_losses)
                        metrics["samples_per_s"] = global_batch / metrics["step_time_s"]
                        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
                        metrics.update(self._data_metrics())  # collective: every rank reaches this line
                        window_losses, window_time = [], 0.0
                        self.tracker.log_metrics(metrics, self.step)
                        if self.dist.is_main:
                            logger.info("step %d: loss %.4f, grad norm %.3g, %.1f samples/s", self.step,
                                        metrics["loss"], metrics["grad_norm"], metrics["samples_per_s"])
                    if self.step % config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._any_rank(sigterm.received):  # collective: every rank asks after every step
                        self._stop_preempted()
                    if config.validate_every and self.step % config.validate_every == 0 and self.step < config.max_steps:
                        self.validate()
            result = self.finish()
            status = "FINISHED"
            return result
        except (KeyboardInterrupt, Preempted):
            status = "KILLED"
            raise
        finally:
            if self.loader is not None:
                self.loader.close()
            if status != "FINISHED":
                self.tracker.finish(status)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (collective when distributed)."""
        if not parallel.is_distributed():
            return flag
        return parallel.all_reduce_mean(torch.tensor([float(flag)], device=self._comm)).item() > 0

    def _stop_preempted(self) -> None:
        """Checkpoint the step just finished (collective) and raise `Preempted`."""
        path = self.save_checkpoint() if self.last_saved != self.step else self.checkpoints.latest()
        if self.dist.is_main:
            write_bytes_atomic(self.output_dir / PREEMPTED_FILE, json.dumps(
                {"run_id": self.run_id, "step": self.step, "checkpoint": str(path)}).encode())
        again = "run the same command again" if self.config.resume == "latest" else "run again with --resume latest"
        raise Preempted(f"SIGTERM: stopped after step {self.step} of {self.config.max_steps} and wrote {path}; "
                        f"{again} to continue run {self.run_id}")

    def _data_metrics(self) -> dict[str, float]:
        """Unreadable data so far, for the log; raises `BadData` naming the shards past the limit."""
        report = self.loader.check_bad_fraction(self.config.max_bad_fraction)
        metrics = {"data/unreadable_fraction": report["unreadable_fraction"]}
        for reason, entry in report["by_reason"].items():
            metrics[f"data/skipped/{reason}"] = entry["count"]
        if report["by_reason"] and self.dist.is_main and report["by_reason"] != self._last_skipped:
            logger.warning("skipped data so far (%.2f%% unreadable): %s", 100 * report["unreadable_fraction"],
                           json.dumps(report["by_reason"]))
        self._last_skipped = report["by_reason"]
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------

    def _checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict, list]:
        """This rank's shards by checkpoint name; the model and optimizer state dicts they come from."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        tensors = {f"model.{name}": tensor for name, tensor in model_state.items()}
        for name, entries in optimizer_state["state"].items():
            tensors.update({f"optim.{name}.{key}": value for key, value in entries.items()})
        if self.ema is not None:
            tensors.update({f"ema.{name}": shadow for name, shadow in zip(self.ema.names, self.ema.shadows)})
        return tensors, model_state, optimizer_state

    def save_checkpoint(self) -> Path:
        """Every rank writes its shards of step-N/ (collective); rank 0 adds state.json last."""
        self._check_data_unchanged()
        if self.latent_cache is not None:
            self.latent_cache.flush()
        tensors, _, optimizer_state = self._checkpoint_tensors()
        data_states = parallel.all_gather_bytes(json.dumps(self.stream.state_dict()).encode(), self._comm)
        state = {
            "run_id": self.run_id,
            "identity": self.identity,
            "config": self.config.to_dict(),
            "world_size": self.dist.world_size,
            "scheduler": self.scheduler.state_dict(),
            "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in optimizer_state["param_groups"]],
            "ema": self.ema is not None,
            "noise_generator": base64.b64encode(self.noise_generator.get_state().numpy().tobytes()).decode(),
            "data": [json.loads(blob) for blob in data_states],
            "bad_data": self.stream.found_state(),  # collective
            "loss": self.losses[-1] if self.losses else None,
            "mlflow_run_id": self.tracker.run_id,
            "time": time.time(),
        }
        path = self.checkpoints.save(self.step, tensors, state, is_main=self.dist.is_main)
        if self.dist.is_main:
            logger.info("wrote checkpoint %s", path)
        self.last_saved = self.step
        return path

    def _load_checkpoint(self, path: Path) -> str | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = ckpt.read_state(path)
        if state.get("ema") and self.ema is None:
            logger.warning("resume from %s: ema_decay=0, so the checkpoint's EMA weights are dropped", path)
        tensors, model_state, optimizer_state = self._checkpoint_tensors()
        if self.ema is not None and not state.get("ema"):
            logger.warning("resume from %s: the checkpoint has no EMA; the EMA starts from its weights", path)
            tensors = {name: t for name, t in tensors.items() if not name.startswith("ema.")}
        ckpt.load_into(path, tensors)  # every rank reads its own shards, whatever world size wrote them
        for group, saved in zip(optimizer_state["param_groups"], state["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(strict=False))
        if self.ema is not None and not state.get("ema"):
            self.ema.reset()
        self.scheduler.load_state_dict(state["scheduler"])
        generator_state = bytearray(base64.b64decode(state["noise_generator"]))
        self.noise_generator.set_state(torch.frombuffer(generator_state, dtype=torch.uint8).clone())
        self.stream.load_state_dict(self._data_state(state, path))
        self.step = self.last_saved = int(state["step"])
        # The next step's lr from this config's schedule: the same as the checkpoint's unless
        # max_steps changed the length a cosine decays over.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_factor(self.config, self.step)
        self.run_message = f"resumed run {self.run_id} from {path} at step {self.step}"
        changes = resume_changes(state["config"], state["world_size"], self.config, self.dist.world_size)
        if changes:
            self.run_message += f"; changed without starting a new run: {'; '.join(changes)}"
        if state["config"]["max_steps"] != self.config.max_steps:
            self.run_message += f"; {schedule_continuation(config_from_dict(state['config']), self.config, self.step)}"
        logger.info(self.run_message)
        return state.get("mlflow_run_id")

    def _data_state(self, state: dict, path: Path) -> dict:
        """This rank's data position, converted when the checkpoint was written by another world size."""
        saved = state["data"]
        if len(saved) == self.dist.world_size:
            return saved[self.dist.rank]
        from .data import reshard_states

        try:
            return reshard_states(saved, self.dist.rank, self.dist.world_size)
        except ValueError as err:
            raise ValueError(f"resume from {path}: written by {len(saved)} process(es), cannot continue on "
                             f"{self.dist.world_size}: {err}") from err

    # -- validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> None:
        """Generate every validation prompt x seed with the weights being trained (their EMA when
        EMA is on); rank 0 logs a grid.

        Under FSDP2 every rank runs the same generation: each block's forward all-gathers its
        full parameters, so the ranks must call it together (no rank-0-only generation, and no
        extra copy of the model). Generators are local, so nothing of training's randomness moves.
        """
        if not self.validation:
            return
        config = self.config
        size = config.validation_resolution or config.resolution
        self.model.eval()
        rows = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        weights = self.ema.swapped_in() if self.ema is not None else nullcontext()  # raw weights back after
        try:
            with autocast, weights:
                for text, prompt in self.validation:
                    outputs = []
                    for seed in config.validation_seeds:
                        generator = torch.Generator(device="cpu").manual_seed(seed)
                        image = self.pipe(prompt, height=size, width=size, num_inference_steps=config.validation_steps,
                                          guidance_scale=config.validation_guidance, generator=generator).images[0]
                        outputs.append(image)
                    rows.append((text, prompt.images, outputs))
        finally:
            self.model.train()
        if self.dist.is_main:
            self.tracker.log_image(validation_grid(rows, cell=max(size, 64)), f"validation/step-{self.step:08d}.png")

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """The last collective work (final checkpoint, validation); then every rank but 0 leaves,
        and rank 0 alone builds the exports from the checkpoint and uploads them."""
        config = self.config
        if self.last_saved != self.step:
            self.save_checkpoint()
        self.validate()
        data_report = self.loader.check_bad_fraction(config.max_bad_fraction)  # collective
        self.loader.close()
        self.loader = None
        checkpoint = self.checkpoints.root / ckpt.checkpoint_name(self.step)
        # EMA on: the checkpoint's EMA weights (a checkpoint resumed at max_steps that had no EMA
        # has none, and then the reset EMA equals the raw weights anyway); off: the raw weights.
        use_ema = None if self.ema is not None else False
        # No collective after this point: the other ranks may be gone while rank 0 exports.
        parallel.shutdown_distributed()
        self.model = self.optimizer = self.scheduler = self.ema = None
        self.pipe = None
        gc.collect()
        recent = self.losses[-config.log_every:]
        result = TrainResult(
            step=self.step,
            loss=sum(recent) / len(recent) if recent else None,
            losses=list(self.losses),
            checkpoint=checkpoint,
            mlflow_run_id=self.tracker.run_id,
            run_id=self.run_id,
            run_dir=self.run_dir,
            new_run=self.new_run,
        )
        if not self.dist.is_main:
            return result
        exports = export_final(checkpoint, self.run_dir, config.export_unet_lora, ema=use_ema,
                               dtype=DTYPES[config.export_dtype], previous_lora=previous_unet_lora(config.init_from))
        result.pipeline_dir, result.unet_lora_dir = exports["pipeline"], exports.get("unet_lora")
        publish_exports(self.output_dir, self.run_dir, exports)
        logger.info("run %s: wrote %s; linked from %s", self.run_id, ", ".join(str(p) for p in exports.values()),
                    self.output_dir)
        (self.run_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.tracker.log_artifact(self.run_dir / "train_config.yaml", "")
        for name in ("unet_lora", "adapter"):
            if name in exports:
                self.tracker.log_artifacts(exports[name], name)
        if config.log_pipeline_artifact:
            self.tracker.log_artifacts(exports["pipeline"], "pipeline")
        summary = {
            "final_loss": result.loss,
            "steps": result.step,
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "new_run": self.new_run,
            "previous_run": self.previous_run,
            "run_message": self.run_message,  # new, resumed, and what changed
            "data_version": self.identity["data"],
            "pipeline_path": str(result.pipeline_dir),
            "unet_lora_path": str(result.unet_lora_dir) if result.unet_lora_dir else None,
            "checkpoint_path": str(checkpoint),
            "mlflow_run_id": result.mlflow_run_id,
            "stage": config.stage,
            "world_size": self.dist.world_size,
            "data_unreadable_fraction": data_report["unreadable_fraction"],
            "data_skipped": json.dumps(data_report["by_reason"]),
        }
        self.tracker.log_dict(data_report, "data_report.json")
        self.tracker.finish("FINISHED", summary)
        return result


def export_final(
    checkpoint: Path,
    out_dir: Path,
    export_lora: bool = True,
    ema: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
    previous_lora=None,
) -> dict[str, Path]:
    """From a checkpoint (its EMA weights if it has them, unless ema=False), atomically:
    out_dir/pipeline/ (LoRAs merged: a plain MUMUPipeline, in `dtype`), out_dir/adapter/, and
    out_dir/unet_lora/ when the UNet trained a LoRA. The LoRA is the whole change from the UNet
    the first stage started from: with `previous_lora` (the exported LoRA of the run this one
    started from), the stages are concatenated (paper Finding 4: merge it into SDXL fine-tunes)."""
    pipe, model = trained_model_from_checkpoint(checkpoint, ema=ema)
    exports: dict[str, Path] = {}
    if export_lora and getattr(model.unet, "peft_config", None):
        exports["unet_lora"] = export_unet_lora(model.unet, out_dir / "unet_lora", previous=previous_lora)
    merge_loras(model)
    # Not pipe.to(dtype): diffusers warns at each of its models that none needs keeping in float32.
    cast_pipeline(pipe, dtype)
    exports["pipeline"] = out_dir / "pipeline"
    with atomic_dir(exports["pipeline"]) as tmp:
        pipe.save_pretrained(tmp)
    exports["adapter"] = out_dir / "adapter"
    with atomic_dir(exports["adapter"]) as tmp:
        pipe.adapter.save_pretrained(tmp)
    return exports


def publish_exports(output_dir: Path, run_dir: Path, exports: dict[str, Path]) -> None:
    """Point output_dir/<name> at the run's exports (relative links, each swapped atomically), so
    readers of `output_dir/pipeline` get the latest finished run and older runs stay intact."""
    for name, target in exports.items():
        link = output_dir / name
        if link.exists() and not link.is_symlink():  # a folder written by an older layout
            os.replace(link, run_dir / f"{name}.previous-layout")
        tmp = output_dir / f".{name}.link"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(target, output_dir))
        os.replace(tmp, link)


# -- entry point ------------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by `config`; returns on every rank."""
    trainer = Trainer(config)
    return trainer.train()


def run(config_path: str | None, overrides: list[str], resume: str | None = None) -> TrainResult:
    """The CLI's `mumu train CONFIG [--set f=v ...] [--resume latest]` (also `python -m mumu_model.training`)."""
    overrides = list(overrides)
    if resume is not None:
        overrides.append(f"resume={resume}")
    config = load_train_config(config_path, overrides)
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # saving and loading pipelines draws progress bars
        library.utils.logging.disable_progress_bar()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
    )
    try:
        return train(config)
    finally:
        parallel.shutdown_distributed()
