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
(ema.safetensors) and resume restores it, and the exported pipeline / UNet LoRA are built
from it; the raw weights keep training underneath.

Known limits: every rank builds the whole model before FSDP2 shards it (paper scale wants
meta-device initialisation); a checkpoint resumes with the process count that wrote it (each
rank's data position is saved); the bf16 / nccl path is written but was not run here (no GPU).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_dir
from ..build import build_pipeline
from ..config import load_model_config
from ..encoder import configure_processor
from ..lora import add_unet_lora, export_unet_lora
from ..pipeline import MUMUPipeline, encode_inputs
from ..prompt import MultimodalPrompt
from . import parallel
from .checkpoint import (
    STATE_FILE,
    CheckpointManager,
    capture_rng,
    pack_rank_state,
    restore_rng,
)
from .config import MODULES, TrainConfig, config_from_dict, load_train_config
from .ema import EMA
from .tracking import Tracker, validation_grid

logger = logging.getLogger("mumu.training")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing of that step was saved."""


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


def load_init_pipeline(path: str | Path) -> MUMUPipeline:
    """A MUMU pipeline folder, a training output folder (its pipeline/), or a checkpoint folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return MUMUPipeline.from_pretrained(path)
    if (path / "pipeline" / "model_index.json").is_file():
        return MUMUPipeline.from_pretrained(path / "pipeline")
    if (path / STATE_FILE).is_file():  # its EMA weights if it has them, as its exported pipeline/
        pipe, model = trained_model_from_checkpoint(path)
        merge_loras(model)
        return pipe
    raise ValueError(
        f"init_from={str(path)!r}: not a MUMU pipeline folder (model_index.json), a training output "
        f"folder (pipeline/model_index.json) or a checkpoint folder ({STATE_FILE})"
    )


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
    weights, state = CheckpointManager.load_weights(path, ema=ema)
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


def _shard_patterns(shards: tuple[str, ...]) -> tuple[str, ...]:
    """A folder stands for every tar in it (the caption assets write data/captions/stage1/*.tar)."""
    return tuple(str(Path(s) / "*.tar") if Path(s).is_dir() else s for s in shards)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    def __init__(self, config: TrainConfig):
        from diffusers import DDPMScheduler

        from .data import DataConfig, LatentCache, ShardStream

        if not config.shards:
            raise ValueError("train config: shards is empty; list the caption shards (tar files, folders or globs)")
        self.config = config
        self.dist = parallel.init_distributed(config.device)
        self.device = self.dist.device
        self.output_dir = Path(config.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir, config.checkpoints_total_limit)
        self.bf16 = config.mixed_precision == "bf16" and self.device.type == "cuda"
        if config.mixed_precision == "bf16" and not self.bf16:
            logger.warning("mixed_precision=bf16 applies on GPU only; training in fp32 on %s", self.device)

        # Validation prompts are parsed first: a typo fails now, not after hours of training.
        self.validation = [
            (text, MultimodalPrompt.from_text(text, config.validation_image_root, max_images=None))
            for text in config.validation_prompts
        ]

        # Model: identical on every rank, then LoRA'd, frozen, checkpointed and sharded from outside.
        self.pipe, self.model = setup_model(config)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        self.trainable = {parallel.clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
        if config.activation_checkpointing:
            parallel.apply_activation_checkpointing(self.model)
        if self.dist.sharded:
            parallel.apply_fsdp(self.model, self.device, bf16=self.bf16)
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
        # Noise and timesteps come from this generator, per rank, saved in checkpoints.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + self.dist.rank + 1)

        # Data: this rank's slice of a deterministic, resumable stream.
        data_config = DataConfig(
            shards=_shard_patterns(config.shards),
            resolution=config.resolution,
            conditioning_dropout=config.conditioning_dropout,
            augment_probability=config.augment_probability,
            max_images=config.max_images,
            seed=config.seed if config.data_seed is None else config.data_seed,
        )
        self.stream = ShardStream(data_config, rank=self.dist.rank, world_size=self.dist.world_size)
        self.latent_cache = LatentCache(self.output_dir / "latents", self.pipe.vae) if config.cache_latents else None

        # Resume: weights, optimizer, LR schedule, RNGs, data position, step, MLflow run.
        self.step = 0
        self.last_saved: int | None = None
        run_id = None
        if self.dist.is_main:
            self.checkpoints.remove_partial()
        resume = parallel.broadcast_bytes(str(self.checkpoints.resolve(config.resume) or "").encode(), self._comm)
        if resume:  # resume=latest with no checkpoint yet starts from scratch
            run_id = self._load_checkpoint(Path(resume.decode()))
        self.batches = self._batches()
        self.tracker = Tracker(config, enabled=self.dist.is_main, run_id=run_id)
        self.losses: list[float] = []

    @property
    def _comm(self) -> torch.device:
        return self.device  # gloo talks CPU tensors, nccl CUDA tensors: the training device

    def _batches(self):
        from .data import batches

        return batches(self.stream, self.pipe.processor, self.config.batch_size)

    # -- one step ------------------------------------------------------------------------------

    def latents(self, batch: dict) -> torch.Tensor:
        from .data import vae_latents

        if self.latent_cache is not None:
            latents = self.latent_cache.get_batch(batch["keys"], batch["pixel_values"])
        else:
            latents = vae_latents(self.pipe.vae, batch["pixel_values"].to(self.device))
        return latents.to(self.device, torch.float32)

    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The denoising MSE on one batch; noise and timesteps drawn from `generator`."""
        latents = self.latents(batch)
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=generator, device=self.device
        )
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
        return F.mse_loss(prediction.float(), target.float())

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer update; raises TrainingDiverged (before touching the weights) on NaN/inf."""
        self.model.train()
        loss = self.compute_loss(batch, self.generator)

        # Every rank sees the same mean loss, so all stop together (backward is collective).
        mean_loss = parallel.all_reduce_mean(loss.detach()).item()
        if not math.isfinite(mean_loss):
            self._diverged(f"loss is {mean_loss}", batch)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(f"gradient norm is {grad_norm}", batch)
        lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dropped = float(batch["dropped"].float().mean())
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
            "training from step %d to %d: %d process(es) x batch %d, modes %s, output %s",
            self.step, config.max_steps, self.dist.world_size, config.batch_size, config.modes, self.output_dir,
        )
        global_batch = config.batch_size * self.dist.world_size
        window_losses: list[float] = []
        window_time = 0.0
        status = "FAILED"
        try:
            while self.step < config.max_steps:
                started = time.perf_counter()  # throughput includes reading and collating the data
                metrics = self.train_step(next(self.batches))
                window_time += time.perf_counter() - started
                self.losses.append(metrics["loss"])
                window_losses.append(metrics["loss"])
                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    # Means over the steps since the last log; lrs and grad norm of this step.
                    metrics["loss"] = sum(window_losses) / len(window_losses)
                    metrics["step_time_s"] = window_time / len(window_losses)
                    metrics["samples_per_s"] = global_batch / metrics["step_time_s"]
                    metrics["peak_memory_mb"] = peak_memory_mb(self.device)
                    window_losses, window_time = [], 0.0
                    self.tracker.log_metrics(metrics, self.step)
                    if self.dist.is_main:
                        logger.info("step %d: loss %.4f, grad norm %.3g, %.1f samples/s", self.step,
                                    metrics["loss"], metrics["grad_norm"], metrics["samples_per_s"])
                if self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if config.validate_every and self.step % config.validate_every == 0 and self.step < config.max_steps:
                    self.validate()
            result = self.finish()
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if status != "FINISHED":
                self.tracker.finish(status)

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Gather full trainable weights + optimizer state to rank 0 and write step-N/ atomically."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        ema_state = self.ema.state_dict() if self.ema is not None else None  # collective under FSDP2
        meta, tensors = capture_rng(self.generator)
        meta["data"] = self.stream.state_dict()
        blobs = parallel.all_gather_bytes(pack_rank_state(meta, tensors), self._comm)
        path = None
        if self.dist.is_main:
            state = {
                "config": self.config.to_dict(),
                "model_hash": self.config.model_hash(),
                "world_size": self.dist.world_size,
                "scheduler": self.scheduler.state_dict(),
                "loss": self.losses[-1] if self.losses else None,
                "mlflow_run_id": self.tracker.run_id,
                "time": time.time(),
            }
            path = self.checkpoints.save(self.step, model_state, optimizer_state, state, blobs, ema=ema_state)
            logger.info("wrote checkpoint %s", path)
        self.last_saved = self.step
        parallel.barrier()
        return path

    def _load_checkpoint(self, path: Path) -> str | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        checkpoint = CheckpointManager.load(path)
        if checkpoint.state.get("model_hash") != self.config.model_hash():
            saved = config_from_dict(checkpoint.state["config"])
            fields = [k for k in ("model_profile", "model_overrides", "init_from", "image_size", "max_images",
                                  "lora_rank", "lora_alpha", *MODULES) if getattr(saved, k) != getattr(self.config, k)]
            raise ValueError(f"resume from {path}: the checkpoint belongs to another model (differs in {fields})")
        if len(checkpoint.rank_states) != self.dist.world_size:
            raise ValueError(
                f"resume from {path}: written by {len(checkpoint.rank_states)} process(es), resumed with "
                f"{self.dist.world_size}; each rank's data position is saved, so resume with the same count"
            )
        missing = sorted(self.trainable - set(checkpoint.model))
        if missing:
            raise ValueError(f"resume from {path}: trainable weights missing from the checkpoint, e.g. {missing[:3]}")
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=checkpoint.model,
            optim_state_dict=checkpoint.optimizer,
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        if self.ema is not None and checkpoint.ema is not None:
            self.ema.load_state_dict(checkpoint.ema)
        elif self.ema is not None:  # EMA switched on for a run that trained without it
            logger.warning("resume from %s: the checkpoint has no EMA; the EMA starts from its weights", path)
            self.ema.reset()
        elif checkpoint.ema is not None:
            logger.warning("resume from %s: ema_decay=0, so the checkpoint's EMA weights are dropped", path)
        self.scheduler.load_state_dict(checkpoint.state["scheduler"])
        meta, tensors = checkpoint.rank_states[self.dist.rank]
        restore_rng(meta, tensors, self.generator)
        self.stream.load_state_dict(meta["data"])
        self.step = self.last_saved = checkpoint.step
        logger.info("resumed from %s at step %d", path, self.step)
        return checkpoint.state.get("mlflow_run_id")

    # -- validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> None:
        """Generate every validation prompt x seed with the weights being trained (their EMA when
        EMA is on); rank 0 logs a grid.

        Under FSDP2 every rank runs the same generation: each block's forward all-gathers its
        full parameters, so the ranks must call it together (no rank-0-only generation, and no
        extra copy of the model). Generators are local, so training's RNG streams are untouched.
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
        """Final checkpoint and validation; then, from the checkpoint, the merged pipeline + LoRA
        (from the EMA weights when EMA is on)."""
        config = self.config
        if self.last_saved != self.step:
            self.save_checkpoint()
        self.validate()
        checkpoint = self.checkpoints.root / f"step-{self.step:08d}"
        # EMA on: the checkpoint's EMA weights (a checkpoint resumed at max_steps that had no EMA
        # has none, and then the reset EMA equals the raw weights anyway); off: the raw weights.
        use_ema = None if self.ema is not None else False
        # Free the training copy before rank 0 rebuilds an unsharded one from the checkpoint.
        self.model = self.optimizer = self.scheduler = self.ema = None
        self.pipe = None
        gc.collect()
        pipeline_dir = unet_lora_dir = None
        if self.dist.is_main:
            pipeline_dir, unet_lora_dir = export_final(checkpoint, self.output_dir, config.export_unet_lora,
                                                       ema=use_ema)
            logger.info("wrote %s%s", pipeline_dir, f" and {unet_lora_dir}" if unet_lora_dir else "")
            if config.log_pipeline_artifact:
                self.tracker.log_artifacts(pipeline_dir, "pipeline")
            if unet_lora_dir is not None:
                self.tracker.log_artifacts(unet_lora_dir, "unet_lora")
        parallel.barrier()
        recent = self.losses[-config.log_every:]
        result = TrainResult(
            step=self.step,
            loss=sum(recent) / len(recent) if recent else None,
            losses=list(self.losses),
            checkpoint=checkpoint,
            pipeline_dir=pipeline_dir,
            unet_lora_dir=unet_lora_dir,
            mlflow_run_id=self.tracker.run_id,
        )
        summary = {
            "final_loss": result.loss,
            "steps": result.step,
            "pipeline_path": str(pipeline_dir) if pipeline_dir else None,
            "unet_lora_path": str(unet_lora_dir) if unet_lora_dir else None,
            "checkpoint_path": str(checkpoint),
            "mlflow_run_id": result.mlflow_run_id,
            "stage": config.stage,
            "world_size": self.dist.world_size,
        }
        self.tracker.finish("FINISHED", summary)
        return result


def export_final(
    checkpoint: Path, output_dir: Path, export_lora: bool = True, ema: bool | None = None
) -> tuple[Path, Path | None]:
    """output_dir/pipeline/ (LoRAs merged: a plain MUMUPipeline) and output_dir/unet_lora/ (paper
    Finding 4: merge it into community SDXL fine-tunes), both from a checkpoint, atomically;
    from its EMA weights if it has them, unless ema=False."""
    pipe, model = trained_model_from_checkpoint(checkpoint, ema=ema)
    unet_lora_dir = None
    if export_lora and getattr(model.unet, "peft_config", None):
        unet_lora_dir = export_unet_lora(model.unet, output_dir / "unet_lora")
    merge_loras(model)
    pipeline_dir = output_dir / "pipeline"
    with atomic_dir(pipeline_dir) as tmp:
        pipe.save_pretrained(tmp)
    return pipeline_dir, unet_lora_dir


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
