"""Size a training run before running it: parameters and peak GPU memory from a TrainConfig.

The dry run builds the model the config describes on the META device, so nothing is
allocated, nothing is downloaded and it takes seconds on a CPU. It uses the trainer's own
builders (`mumu_model.build`'s, `MUMUTrainModel`, `add_loras`, `set_trainable`,
`parallel.repeated_blocks`), so the counts are those of the real run. Checkpoint sources are
read as configs only: a local folder's config.json, or the bundled public config of the hub ids
the paper uses (`mumu_model.paper_configs`); any other hub id is an error naming its field.

The memory estimate, per GPU, for world size W (W = 1: one process, nothing sharded; W > 1:
FSDP2 as `parallel.apply_fsdp` applies it), sharded S = W / hsdp_replicas ways (HSDP shards
within each group and replicates across groups; plain FSDP: S = W):

- weights: every parameter of encoder + adapter + UNet in float32 (the trainer loads the
  parts in float32; bf16 is the compute dtype of autocast and FSDP's policy), / S.
- gradients: the trainable parameters in float32, / S.
- AdamW: two float32 moments per trainable parameter, / S.
- all-gathered parameters (S > 1): while a block runs, FSDP holds it unsharded and prefetches
  the next, plus the unsharded remainder of its part (embeddings, projections): per part,
  remainder + 2 x its largest block, in the compute dtype, plus that block's trainable
  gradients in float32 before the reduce-scatter; the largest part counts.
- VAE: float32, replicated (it is not part of the sharded model).
- activations, B = batch per GPU, bytes per element 2 under bf16 autocast (else 4). Tokens per
  prompt: encoder L = max_images x (tokens_per_image + 2) + text_tokens, where
  tokens_per_image = (image_size / 14)^2 and the 2 are Idefics2's <fake_token_around_image>
  marks; the adapter sees the same L. The UNet works on latents of side
  resolution / vae_scale_factor (SDXL: 1024 px -> 128). Elements saved for backward, per
  token / position and per sample (constants measured with saved-tensor hooks under bf16
  autocast, with the paper's trainable flags: a LoRA'd or trained Linear keeps its input, a
  frozen one does not; fp32 norm statistics count double):
    Mistral layer (width h, key/value width k, gated MLP width i, every projection LoRA'd):
        8h + 2k + 4i
    adapter block / SigLIP layer (width h, MLP width i): 7h + 2i
    Idefics2 connector (LoRA'd gated MLP, outside any block): h_vision + 4 i_text per vision token
    UNet ResnetBlock2D (frozen, C_in -> C_out): 2 C_in + 3 C_out per position
    UNet transformer layer (LoRA on attention, width C, L encoder tokens):
        23 C per position + 2 C L per sample (the cross-attention keys and values)
    UNet output norm and convolution: 3 C per position
  A part keeps activations only if something at or before it trains (a frozen ViT keeps
  none). With activation checkpointing each repeated block (`parallel.repeated_blocks`)
  keeps only its inputs (hidden states; for UNet up blocks the skip connections), and in
  backward one block at a time recomputes its activations: kept = sum of block inputs +
  the largest block's activations. Without it, every block's activations are kept.
  Terms smaller than these (norms outside blocks, time embeddings, the loss) are left out.
- VAE encode (no grad, before the forward; cached latents skip it): three float32 maps of
  its first block's width at full resolution per sample; the peak takes the larger of this
  and the activations.
- CUDA context, cuBLAS/NCCL workspaces and allocator slack: a flat CUDA_OVERHEAD_BYTES.

World size: the `world_size` argument, else $WORLD_SIZE, else 8 (the paper's single 8xH100
node) for a model over 1B parameters and 1 for a smaller one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..build import build_adapter, build_config_unet, build_encoder, build_processor, build_vae
from ..config import PATCH_SIZE, ModelConfig, load_model_config
from ..paper_configs import config_dir
from .checkpoint import STATE_FILE
from .config import MODULES, TrainConfig, config_from_dict
from .parallel import clean_name, repeated_blocks
from .trainer import MUMUTrainModel, add_loras, module_of, set_trainable

GiB = 2**30
GPU_BYTES = 80 * GiB  # one H100
CUDA_OVERHEAD_BYTES = 2 * GiB
PAPER_SCALE_PARAMS = 1_000_000_000
PAPER_WORLD_SIZE = 8
TEXT_TOKENS = 128  # text tokens per prompt assumed beside the images (a long caption)
PARTS = (*MODULES, "vae")


@dataclass(frozen=True)
class PartSize:
    name: str
    total: int
    trainable: int
    dtype: str


@dataclass(frozen=True)
class SizingResult:
    """What `estimate` found; `dry_run_report` prints it."""

    parts: list[PartSize]
    world_size: int
    world_size_rule: str
    batch_size: int
    mixed_precision: str
    activation_checkpointing: bool
    tokens: dict[str, int]  # encoder, per_image, images, text, latent_side
    memory: list[tuple[str, int]]  # (what, bytes per GPU), in the order they add up
    peak_bytes: int
    largest_block: str
    source: str = ""
    modes: dict[str, str] = field(default_factory=dict)
    gpu_bytes: int = GPU_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(p.total for p in self.parts)

    @property
    def trainable_params(self) -> int:
        return sum(p.trainable for p in self.parts)

    def part(self, name: str) -> PartSize:
        return next(p for p in self.parts if p.name == name)

    @property
    def encoder_params(self) -> int:
        return sum(self.part(n).total for n in ("vision", "connector", "text"))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes


# -- the model on the meta device ------------------------------------------------------------------


def _model_config(config: TrainConfig) -> ModelConfig:
    # As trainer.load_base_pipeline: fp32 master weights, the data's image size and count.
    overrides = {"dtype": "float32", **config.model_overrides,
                 "image_size": config.image_size, "max_images": config.max_images}
    return load_model_config(config.model_profile, overrides)


def _source_dir(config: TrainConfig, name: str, source: str) -> Path:
    where = f"model_overrides.{name}" if name in config.model_overrides else name
    return config_dir(source, where)


def _meta_parts_from_profile(config: TrainConfig) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..encoder import MUMUEncoder, encoder_config

    model_config = _model_config(config)
    with torch.device("meta"):
        if model_config.encoder is None:
            processor = build_processor(model_config.image_size)
            encoder = build_encoder(processor, model_config.image_size, model_config.image_token_norm)
        else:
            folder = _source_dir(config, "encoder", model_config.encoder)
            encoder = MUMUEncoder(encoder_config(folder, model_config.image_token_norm))
        vae = None
        if model_config.vae is not None:
            folder = _source_dir(config, "vae", model_config.vae)
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        if model_config.sdxl is None:
            vae = vae if vae is not None else build_vae(sample_size=model_config.resolution)
            unet = build_config_unet(model_config, vae)
        else:
            folder = _source_dir(config, "sdxl", model_config.sdxl)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
            if vae is None:
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        adapter = build_adapter(model_config, encoder, unet)
    return encoder, adapter, unet, vae


def _meta_parts_from_pipeline(folder: Path) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Idefics2Config

    from ..adapter import MUMUAdapter
    from ..encoder import MUMUEncoder

    with torch.device("meta"):
        encoder = MUMUEncoder(Idefics2Config.from_pretrained(folder / "encoder"))
        adapter = MUMUAdapter.from_config(MUMUAdapter.load_config(folder / "adapter"))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    return encoder, adapter, unet, vae


def _meta_parts(config: TrainConfig) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """Encoder, adapter, UNet and VAE of the base model (before LoRA), as load_base_pipeline."""
    if config.init_from is None:
        return _meta_parts_from_profile(config)
    path = Path(config.init_from)
    if (path / "model_index.json").is_file():
        return _meta_parts_from_pipeline(path)
    if (path / "pipeline" / "model_index.json").is_file():
        return _meta_parts_from_pipeline(path / "pipeline")
    if (path / STATE_FILE).is_file():  # a checkpoint: its run's base model, LoRAs merged
        return _meta_parts(config_from_dict(json.loads((path / STATE_FILE).read_text())["config"]))
    raise ValueError(
        f"init_from={str(path)!r}: not a MUMU pipeline folder (model_index.json), a training output "
        f"folder (pipeline/model_index.json) or a checkpoint folder ({STATE_FILE})"
    )


def build_meta_model(config: TrainConfig) -> tuple[MUMUTrainModel, nn.Module]:
    """The model `trainer.setup_model` would train, LoRAs injected and flags set, on the meta
    device; and the VAE. Nothing is allocated."""
    encoder, adapter, unet, vae = _meta_parts(config)
    model = MUMUTrainModel(encoder, adapter, unet)
    with torch.device("meta"):
        add_loras(model, config)
    set_trainable(model, config)
    vae.requires_grad_(False)
    return model, vae


# -- activations -------------------------------------------------------------------------------------


def _mistral_layer_elements(h: int, k: int, i: int) -> int:
    """Elements a LoRA'd Mistral layer saves for backward, per token (see the module doc)."""
    return 8 * h + 2 * k + 4 * i


def _vit_layer_elements(h: int, i: int) -> int:
    """Elements an adapter block or a SigLIP layer saves for backward, per token."""
    return 7 * h + 2 * i


def _unet_blocks(unet: nn.Module, latent_side: int, encoder_tokens: int) -> list[tuple[str, int, int]]:
    """(name, activation elements, input elements) per UNet block, per sample.

    Inputs are what a checkpointed block keeps: its hidden states, and for up blocks the skip
    connections it consumes (the outputs of the down path).
    """

    def block_elements(block: nn.Module, side: int) -> int:
        positions = side * side
        total = 0
        for resnet in block.resnets:
            total += (2 * resnet.in_channels + 3 * resnet.out_channels) * positions
        for attention in getattr(block, "attentions", None) or []:
            width = attention.inner_dim
            layers = len(attention.transformer_blocks)
            total += layers * (23 * width * positions + 2 * width * encoder_tokens)
        # Down/upsampling convolutions are frozen and nearest upsampling saves nothing.
        return total

    blocks = []
    side = latent_side
    channels = unet.config.block_out_channels[0]  # conv_in's output
    skips = [channels * side * side]
    for index, block in enumerate(unet.down_blocks):
        blocks.append((f"unet.down_blocks.{index}", block_elements(block, side), channels * side * side))
        for resnet in block.resnets:
            skips.append(resnet.out_channels * side * side)
        channels = block.resnets[-1].out_channels
        if block.downsamplers:
            side //= 2
            skips.append(channels * side * side)
    if unet.mid_block is not None:
        blocks.append(("unet.mid_block", block_elements(unet.mid_block, side), channels * side * side))
        channels = unet.mid_block.resnets[-1].out_channels
    for index, block in enumerate(unet.up_blocks):
        consumed = [skips.pop() for _ in block.resnets]
        inputs = channels * side * side + sum(consumed)
        blocks.append((f"unet.up_blocks.{index}", block_elements(block, side), inputs))
        channels = block.resnets[-1].out_channels
        if block.upsamplers:
            side *= 2
    return blocks


# -- the estimate ------------------------------------------------------------------------------------


def resolve_world_size(world_size: int | None, total_params: int) -> tuple[int, str]:
    """The world size to size for, and the rule that chose it (printed by the report)."""
    if world_size is not None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        return world_size, "given"
    env = os.environ.get("WORLD_SIZE")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"$WORLD_SIZE={env!r} is not a positive integer")
        return int(env), "from $WORLD_SIZE"
    if total_params > PAPER_SCALE_PARAMS:
        return PAPER_WORLD_SIZE, "default: one 8-GPU node for a model over 1B parameters"
    return 1, "default: one process for a model under 1B parameters"


def _describe_source(config: TrainConfig) -> str:
    if config.init_from is not None:
        return f"init_from {config.init_from}"
    model = _model_config(config)
    parts = [f"profile {config.model_profile}"]
    for name in ("encoder", "sdxl", "vae"):
        value = getattr(model, name)
        if value is not None:
            parts.append(f"{name} {value}")
        elif name != "vae":
            parts.append(f"{name} built from config")
    return ", ".join(parts)


def estimate(config: TrainConfig, world_size: int | None = None, text_tokens: int = TEXT_TOKENS) -> SizingResult:
    """Parameter counts and the peak memory per GPU of training `config` (see the module doc)."""
    model, vae = build_meta_model(config)
    totals = dict.fromkeys(PARTS, 0)
    trainable = dict.fromkeys(PARTS, 0)
    part_of: dict[int, str] = {}  # parameter id -> "encoder" / "adapter" / "unet"
    for name, param in model.named_parameters():
        module = module_of(name)
        totals[module] += param.numel()
        trainable[module] += param.numel() if param.requires_grad else 0
        part_of[id(param)] = clean_name(name).split(".", 1)[0]
    totals["vae"] = sum(p.numel() for p in vae.parameters())
    model_params = sum(totals[m] for m in MODULES)
    model_trainable = sum(trainable[m] for m in MODULES)
    world, rule = resolve_world_size(world_size, model_params + totals["vae"])
    # HSDP shards within each group of world / hsdp_replicas ranks and replicates across groups.
    if world % config.hsdp_replicas:
        raise ValueError(f"hsdp_replicas={config.hsdp_replicas} does not divide the world size {world}")
    shard = world // config.hsdp_replicas

    bf16 = config.mixed_precision == "bf16"
    compute_bytes = 2 if bf16 else 4
    compute = ", bf16 compute" if bf16 else ""
    # The trainer stores frozen weights in the compute dtype and keeps fp32 masters of the trainable ones.
    frozen_dtype = "bf16" if bf16 else "fp32"
    def dtype(module: str) -> str:
        if trainable[module] == totals[module]:
            return f"fp32{compute}"
        return f"{frozen_dtype} frozen, fp32 trainable{compute}" if trainable[module] else f"{frozen_dtype}{compute}"

    parts = [PartSize(m, totals[m], trainable[m], dtype(m)) for m in MODULES]
    parts.append(PartSize("vae", totals["vae"], 0, "fp32"))

    # FSDP units: each repeated block, then what each part keeps outside its blocks.
    memory: list[tuple[str, int]] = []
    frozen = model_params - model_trainable
    memory.append((f"frozen weights, {frozen_dtype}, {_count(frozen)} / {shard}", compute_bytes * frozen // shard))
    memory.append((f"trainable weights, fp32, {_count(model_trainable)} / {shard}", 4 * model_trainable // shard))
    memory.append((f"gradients, fp32, {_count(model_trainable)} / {shard}", 4 * model_trainable // shard))
    memory.append((f"AdamW moments, 2 x fp32 / {shard}", 8 * model_trainable // shard))
    largest_block = "-"
    if shard > 1:
        blocks: dict[str, list[tuple[str, int, int]]] = {"encoder": [], "adapter": [], "unet": []}
        in_blocks = dict.fromkeys(blocks, 0)
        for parent, attribute in repeated_blocks(model):
            params = list(getattr(parent, attribute).parameters())
            if not params:
                continue
            part = part_of[id(params[0])]
            count = sum(p.numel() for p in params)
            grads = sum(p.numel() for p in params if p.requires_grad)
            label = f"{part} {type(getattr(parent, attribute)).__name__}"
            blocks[part].append((label, count, grads))
            in_blocks[part] += count
        gathered, what = 0, "-"
        for part, found in blocks.items():
            part_total = sum(totals[m] for m in _PART_MODULES[part])
            remainder = part_total - in_blocks[part]
            label, count, grads = max(found, key=lambda b: b[1], default=("-", 0, 0))
            size = (remainder + 2 * count) * compute_bytes + 4 * grads
            if size > gathered:
                gathered, what, largest_block = size, f"{part} remainder + 2 x {label} ({_count(count)})", label
        memory.append((f"all-gathered: {what}", gathered))
    memory.append(("VAE weights, fp32, replicated", 4 * totals["vae"]))

    # Activations (elements per sample, see the module doc).
    encoder_config = model.encoder.config
    vision, text = encoder_config.vision_config, encoder_config.text_config
    per_image = (config.image_size // PATCH_SIZE) ** 2
    images = config.max_images
    length = images * (per_image + 2) + text_tokens
    modes = config.modes
    grad = {}
    upstream = False
    for module in MODULES:  # a part saves activations if it or anything before it trains
        upstream = upstream or modes[module] != "frozen"
        grad[module] = upstream
    # (name, activation elements, input elements, repeats)
    blocks_act: list[tuple[str, int, int, int]] = []
    outside = 0
    if grad["vision"]:
        tokens = images * per_image
        elements = tokens * _vit_layer_elements(vision.hidden_size, vision.intermediate_size)
        blocks_act.append(("vision layer", elements, tokens * vision.hidden_size, vision.num_hidden_layers))
    if grad["connector"]:
        outside += images * per_image * (vision.hidden_size + 4 * text.intermediate_size)
    if grad["text"]:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv = text.num_key_value_heads * head_dim
        elements = length * _mistral_layer_elements(text.hidden_size, kv, text.intermediate_size)
        blocks_act.append(("text layer", elements, length * text.hidden_size, text.num_hidden_layers))
    adapter = model.adapter.config
    if grad["adapter"]:
        width, hidden = adapter.width, int(adapter.width * adapter.mlp_ratio)
        blocks_act.append(("adapter block", length * _vit_layer_elements(width, hidden),
                           length * width, adapter.num_layers))
    from ..pipeline import vae_scale_factor

    latent_side = config.resolution // vae_scale_factor(vae)
    if grad["unet"]:
        for name, elements, inputs in _unet_blocks(model.unet, latent_side, length):
            blocks_act.append((name, elements, inputs, 1))
        outside += 3 * model.unet.config.block_out_channels[0] * latent_side**2  # norm + conv_out
    scale = config.batch_size * compute_bytes
    if config.activation_checkpointing:
        kept = outside + sum(inputs * repeats for _, _, inputs, repeats in blocks_act)
        name, elements, _, _ = max(blocks_act, key=lambda b: b[1], default=("-", 0, 0, 1))
        memory.append(("activations: block inputs kept by checkpointing", kept * scale))
        memory.append((f"activations: one block recomputed in backward ({name})", elements * scale))
        activations = (kept + elements) * scale
    else:
        activations = (outside + sum(e * repeats for _, e, _, repeats in blocks_act)) * scale
        memory.append(("activations: every block (no checkpointing)", activations))
    vae_encode = 3 * vae.config.block_out_channels[0] * config.resolution**2 * config.batch_size * 4
    memory.append(("CUDA context, workspaces, allocator slack", CUDA_OVERHEAD_BYTES))
    static = sum(size for label, size in memory if not label.startswith("activations"))
    peak = static + max(activations, vae_encode)

    notes = [
        f"VAE encode of the targets (no grad, before the forward): {_gib(vae_encode)}; "
        "the peak takes the larger of it and the activations",
    ]
    tokens = {"encoder": length, "per_image": per_image, "images": images, "text": text_tokens,
              "latent_side": latent_side, "resolution": config.resolution}
    return SizingResult(
        parts=parts,
        world_size=world,
        world_size_rule=rule,
        batch_size=config.batch_size,
        mixed_precision=config.mixed_precision,
        activation_checkpointing=config.activation_checkpointing,
        tokens=tokens,
        memory=memory,
        peak_bytes=peak,
        largest_block=largest_block,
        notes=notes,
        source=_describe_source(config),
        modes=dict(modes),
    )


_PART_MODULES = {"encoder": ("vision", "connector", "text"), "adapter": ("adapter",), "unet": ("unet",)}


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def dry_run_report(config: TrainConfig, world_size: int | None = None) -> str:
    """The table and memory breakdown `mumu train CONFIG --dry-run` prints."""
    result = estimate(config, world_size)
    tokens = result.tokens
    lines = [
        f"MUMU training dry run (built on the meta device; no weights): {result.source}",
        f"tokens per prompt: encoder and adapter {tokens['encoder']:,} = {tokens['images']} images x "
        f"({tokens['per_image']:,} + 2) + {tokens['text']} text; UNet latents {tokens['latent_side']} x "
        f"{tokens['latent_side']} ({tokens['resolution']} px)",
        "",
        f"{'module':<10} | {'mode':<6} | {'total params':>14} | {'trainable':>14} | dtype",
        f"{'-' * 10}-+-{'-' * 6}-+-{'-' * 14}-+-{'-' * 14}-+-{'-' * 18}",
    ]
    for part in result.parts:
        mode = result.modes.get(part.name, "frozen")
        lines.append(f"{part.name:<10} | {mode:<6} | {part.total:>14,} | {part.trainable:>14,} | {part.dtype}")
    lines.append(f"{'total':<10} | {'':<6} | {result.total_params:>14,} | {result.trainable_params:>14,} |")
    precision = "bf16 autocast" if result.mixed_precision == "bf16" else "fp32"
    checkpointing = "on" if result.activation_checkpointing else "off"
    lines += [
        "",
        f"memory per GPU: world size {result.world_size} ({result.world_size_rule}), batch {result.batch_size} "
        f"per GPU, {precision}, activation checkpointing {checkpointing}"
        + (", FSDP2" if result.world_size > 1 else ", not sharded"),
    ]
    width = max(len(label) for label, _ in result.memory)
    for label, size in result.memory:
        lines.append(f"  {label:<{width}}  {_gib(size):>10}")
    lines.append(f"  {'peak':<{width}}  {_gib(result.peak_bytes):>10}")
    lines += [f"  note: {note}" for note in result.notes]
    lines.append(f"fits in 80 GB (H100): {'yes' if result.fits else 'no'}")
    return "\n".join(lines)


def check_fits(config: TrainConfig, world_size: int, gpu_bytes: int) -> SizingResult:
    """The estimate for `world_size` GPUs of `gpu_bytes` each; a ValueError with the breakdown when
    the estimated peak does not fit (checked before any weight is loaded)."""
    result = estimate(config, world_size)
    if result.peak_bytes > gpu_bytes:
        breakdown = "; ".join(f"{what} {_gib(size)}" for what, size in result.memory)
        raise ValueError(
            f"train config: the model does not fit: estimated peak {_gib(result.peak_bytes)} per GPU on {world_size} "
            f"GPU(s) of {_gib(gpu_bytes)} at batch_size {config.batch_size} ({breakdown}). Use more GPUs, a "
            f"smaller batch_size (with global_batch_size to keep the recipe), activation_checkpointing: true or "
            f"mixed_precision: bf16; `mumu train CONFIG --dry-run --world-size N` shows the estimate, and "
            f"--skip-fit-check (check_fit: false) trains anyway"
        )
    return result
