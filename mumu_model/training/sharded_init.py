"""Build the training model without ever holding it whole: meta device, FSDP2, per-rank loading.

`trainer.setup_model` builds the whole fp32 model on every rank (about 45 GB of host RAM per
rank at paper size) before FSDP2 shards it. `build_sharded` builds the same model the way
torchtitan does:

1. Structure on the META device: encoder, adapter and UNet are constructed from their configs
   with parameters on meta (buffers stay real, see 4.). Parts that are *built* rather than
   loaded (the tiny profile's encoder / UNet, a new adapter) are built for real on the CPU in
   `build_pipeline`'s order and seed, and kept as the source of their values. The VAE, the
   processor and the scheduler are ordinary (the VAE is small, frozen and never sharded).
2. LoRAs are injected by `trainer.add_loras` itself, after `torch.manual_seed(config.seed)` as
   in `setup_model`, while every meta parameter is replaced by a CPU stand-in that has the
   right shape and one element of storage: peft then creates and initialises the LoRA
   matrices on the CPU with the very random numbers the eager build draws. Their values are
   kept (they are small) and every parameter goes back to meta. `set_trainable` sets the
   flags; frozen parameters are cast to `frozen_dtype` (FSDP2 accepts mixed dtypes when the
   trainable ones are uniform).
3. Activation checkpointing and `parallel.apply_fsdp` wrap the meta model, `to_empty` gives
   each rank storage for its own shards only, and each rank fills them: loaded parts from
   their safetensors files, reading just this rank's rows (`safe_open(...).get_slice`, the
   same reads `torch.distributed.checkpoint`'s HuggingFaceStorageReader makes); built parts and
   LoRAs from the CPU values of 1. and 2. (identical on every rank, whatever the world size).
4. Buffers have no values on meta and `to_empty` leaves garbage in them: the real buffers of
   1. (rotary `inv_freq` of the Mistral LM, computed from the config) are copied back.

A safetensors folder is read directly instead of through `HuggingFaceStorageReader` because
that reader takes every `*.safetensors` in a folder: SDXL's unet/ holds the fp32 weights and an
fp16 variant side by side, and both would be read into the same tensors. Here a folder's
weights are its index (`*.safetensors.index.json`) or its one standard file, as `from_pretrained`
picks them. `init_from` a training checkpoint (its frozen weights are rebuilt from the run's
own starting point, its LoRAs merged) cannot be read in slices: rank 0 builds the model with
`setup_model` and broadcasts it one tensor at a time (rank 0 then needs the whole model in host
RAM; export the run's pipeline/ and start from that folder to avoid it).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..build import build_adapter, build_config_unet, build_encoder, build_processor, build_scheduler, build_vae
from ..config import ModelConfig, load_model_config
from ..encoder import MUMUEncoder, configure_processor, encoder_config
from ..pipeline import MUMUPipeline
from . import parallel
from .checkpoint import STATE_FILE
from .config import TrainConfig, config_from_dict
from .trainer import MUMUTrainModel, add_loras, resolve_init, set_trainable, setup_model

PARTS = ("encoder", "adapter", "unet")
# The weight files `from_pretrained` reads, sharded (an index) or not: transformers', diffusers'.
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
# Prefixes a checkpoint may put before our names: a full Idefics2 checkpoint
# (Idefics2ForConditionalGeneration) stores the encoder's weights under "model.".
FILE_PREFIXES = {"encoder": ("", "model."), "adapter": ("",), "unet": ("",)}
PEFT_BASE = ".base_layer"
# What a hub id's snapshot needs here (no .bin, no fp16 variants, no ONNX/Flax copies).
HUB_FILES = {
    "encoder": ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
    "sdxl": ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors*",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/*"],
}

# (name, global shape, dtype, the box of it this rank holds) -> the values of that box.
Fetch = Callable[[str, torch.Size, torch.dtype, tuple[slice, ...]], torch.Tensor]


# -- where the weights come from ---------------------------------------------------------------------


class SafetensorsFolder:
    """One model folder's safetensors weights, read one box of one tensor at a time."""

    def __init__(self, folder: str | Path, prefixes: tuple[str, ...] = ("",)):
        self.folder = Path(folder)
        self.prefixes = prefixes
        self.files = self._weight_map()
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def _weight_map(self) -> dict[str, Path]:
        from safetensors import safe_open

        for name in WEIGHT_FILES:
            index = self.folder / f"{name}.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {key: self.folder / file for key, file in weight_map.items()}
            if (self.folder / name).is_file():
                with safe_open(self.folder / name, framework="pt") as f:
                    return dict.fromkeys(f.keys(), self.folder / name)
        raise ValueError(f"{self.folder}: no {' or '.join(WEIGHT_FILES)} (nor its .index.json) to load weights from")

    def key(self, name: str) -> str:
        for prefix in self.prefixes:
            if prefix + name in self.files:
                return prefix + name
        raise ValueError(f"{self.folder}: the weights have no tensor {name!r}")

    def read(self, name: str, shape: torch.Size, box: tuple[slice, ...]) -> torch.Tensor:
        from safetensors import safe_open

        key = self.key(name)
        path = self.files[key]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        tensor = self._open[path].get_slice(key)
        if tuple(tensor.get_shape()) != tuple(shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tensor.get_shape()}, the model {list(shape)}")
        return tensor[box] if box else self._open[path].get_tensor(key)

    __call__ = read

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def _tensor_from(state: dict[str, torch.Tensor], where: str) -> Callable:
    def read(name: str, shape: torch.Size, box: tuple[slice, ...]) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"{where}: no tensor {name!r}")
        if state[name].shape != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {list(state[name].shape)}, the model {list(shape)}")
        return state[name][box]

    return read


# -- the model on meta --------------------------------------------------------------------------


def _meta_parameters():
    """Parameters on meta, buffers real: a buffer such as rotary inv_freq is computed from the
    config in the constructor and cannot be recovered from a file (it is not persistent)."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _to_meta(module: nn.Module) -> dict[str, torch.Tensor]:
    """Move the parameters of a module built for real to meta; returns its state dict's values."""
    values = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    _replace_parameters(module, lambda p: torch.empty(p.shape, dtype=p.dtype, device="meta"))
    return values


def _replace_parameters(module: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(make(param), requires_grad=param.requires_grad)


def _local_folder(name: str, field: str) -> Path:
    """A local folder as is; a hub id as its snapshot in the hub cache, downloaded by each
    node's first process while the others wait (then they find it in the cache)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first:
        path = snapshot_download(name, allow_patterns=HUB_FILES[field])
    parallel.barrier()
    if not first:
        path = snapshot_download(name, allow_patterns=HUB_FILES[field], local_files_only=True)
    return Path(path)


def _meta_from_profile(config: TrainConfig, values: bool = True) -> tuple[MUMUPipeline, dict[str, Callable]]:
    """`build_pipeline` of the config's profile, loaded parts on meta; the same random numbers
    for what is built (tiny parts, the adapter): same seed, same order, loading draws none.
    values=False: the structure only (built parts on meta too, no sources)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import Idefics2Processor

    overrides = {"dtype": "float32", **config.model_overrides,  # as trainer.load_base_pipeline
                 "image_size": config.image_size, "max_images": config.max_images}
    model_config: ModelConfig = load_model_config(config.model_profile, overrides)
    sources: dict[str, Callable] = {}
    built = nullcontext if values else _meta_parameters  # a factory: entered once per part
    torch.manual_seed(model_config.seed)
    if model_config.encoder is None:
        processor = build_processor(model_config.image_size)
        with built():
            encoder = build_encoder(processor, model_config.image_size, model_config.image_token_norm)
    else:
        folder = _local_folder(model_config.encoder, "encoder")
        with _meta_parameters():
            encoder = MUMUEncoder(encoder_config(folder, model_config.image_token_norm))
        processor = configure_processor(Idefics2Processor.from_pretrained(folder), model_config.image_size)
        sources["encoder"] = SafetensorsFolder(folder, FILE_PREFIXES["encoder"])
    vae = None
    if model_config.vae is not None:
        vae = AutoencoderKL.from_pretrained(model_config.vae, use_safetensors=True)
    if model_config.sdxl is None:
        if vae is None:
            vae = build_vae(sample_size=model_config.resolution)
        with built():
            unet = build_config_unet(model_config, vae)
        scheduler = build_scheduler(model_config)
    else:
        folder = _local_folder(model_config.sdxl, "sdxl")
        with _meta_parameters():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        sources["unet"] = SafetensorsFolder(folder / "unet", FILE_PREFIXES["unet"])
        if vae is None:
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    with built():
        adapter = build_adapter(model_config, encoder, unet)
    for name, part in (("encoder", encoder), ("adapter", adapter), ("unet", unet)):
        if values and name not in sources:  # built here: its values are the source
            sources[name] = _tensor_from(_to_meta(part), f"the built {name}")
    pipe = MUMUPipeline(encoder=encoder, processor=processor, adapter=adapter, unet=unet, vae=vae,
                        scheduler=scheduler, max_images=model_config.max_images)
    return pipe, sources


def _meta_from_folder(folder: Path, image_size: int) -> tuple[MUMUPipeline, dict[str, Callable]]:
    """A saved MUMU pipeline: encoder, adapter and UNet from their configs, on meta."""
    from diffusers import UNet2DConditionModel
    from transformers import Idefics2Config

    from ..adapter import MUMUAdapter

    with _meta_parameters():
        parts = {
            "encoder": MUMUEncoder(Idefics2Config.from_pretrained(folder / "encoder")),
            "adapter": MUMUAdapter.from_config(MUMUAdapter.load_config(folder / "adapter")),
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        }
    pipe = MUMUPipeline.from_pretrained(folder, **parts)  # VAE, processor, scheduler as usual
    configure_processor(pipe.processor, image_size)  # as trainer.load_base_pipeline (stage 2: 504 px)
    sources = {name: SafetensorsFolder(folder / name, FILE_PREFIXES[name]) for name in PARTS}
    return pipe, sources


def _meta_base(config: TrainConfig) -> tuple[MUMUPipeline, dict[str, Callable] | None]:
    """The base pipeline on meta and where each part's weights are; None: only rank 0 can
    produce them (`init_from` a checkpoint)."""
    if config.init_from is None:
        return _meta_from_profile(config)
    kind, folder = resolve_init(config.init_from)
    if kind == "pipeline":
        return _meta_from_folder(folder, config.image_size)
    # A checkpoint's model has its run's base structure (merging LoRAs changes no shape).
    saved = config_from_dict(json.loads((folder / STATE_FILE).read_text())["config"])
    base, _ = _meta_structure(saved)
    configure_processor(base.processor, config.image_size)
    return base, None


def _meta_structure(config: TrainConfig) -> tuple[MUMUPipeline, None]:
    if config.init_from is None:
        return _meta_from_profile(config, values=False)[0], None
    return _meta_base(config)[0], None


def _inject_loras(model: MUMUTrainModel, config: TrainConfig) -> dict[str, torch.Tensor]:
    """`add_loras` on the meta model, with `setup_model`'s seed; returns the LoRA values.

    peft creates LoRA matrices on the CPU, initialises them, then moves them to the device of
    the base weight: CPU stand-ins (the right shape, one element of storage) keep them real.
    """
    _replace_parameters(model, lambda p: torch.zeros((), dtype=p.dtype).expand(p.shape))
    torch.manual_seed(config.seed)
    add_loras(model, config)
    values = {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}
    _replace_parameters(model, lambda p: torch.empty(p.shape, dtype=p.dtype, device="meta"))
    return values


# -- loading per rank ---------------------------------------------------------------------------------


def named_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of every parameter and persistent buffer, as they are now
    (DTensor shards under FSDP2); names without activation-checkpointing wrappers."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        tensors = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        for name, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield parallel.clean_name(prefix + name), tensor


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's part of `tensor` (the local shard of a DTensor) and where it lies in the whole."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        (chunk,) = tensor.__create_chunk_list__()
        box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
        return tensor.to_local(), box
    return tensor, tuple(slice(0, s) for s in tensor.shape)


@torch.no_grad()
def load_local(model: nn.Module, fetch: Fetch) -> int:
    """Fill every parameter / persistent buffer's local part from `fetch`; returns the count."""
    count = 0
    for name, tensor in named_state(model):
        local, box = local_box(tensor)
        local.copy_(fetch(name, tensor.shape, tensor.dtype, box))
        count += 1
    return count


def _fetch_from_sources(sources: dict[str, Callable], lora: dict[str, torch.Tensor]) -> Fetch:
    """Model names -> the sources' names: LoRA matrices from `lora`, the rest from the part's
    source without the part prefix and peft's base_layer."""
    lora_values = _tensor_from(lora, "the LoRA initialisation")

    def fetch(name: str, shape: torch.Size, dtype: torch.dtype, box: tuple[slice, ...]) -> torch.Tensor:
        if "lora_" in name:
            return lora_values(name, shape, box)
        part, _, rest = name.partition(".")
        return sources[part](rest.replace(PEFT_BASE + ".", "."), shape, box)

    return fetch


def _fetch_from_rank0(config: TrainConfig, device: torch.device) -> Fetch:
    """Rank 0 builds the eager model (`setup_model`) and broadcasts one whole tensor at a time;
    every rank keeps its box. Every rank calls fetch in the same order (`named_state`)."""
    state = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        _, eager = setup_model(config)
        state = {name: tensor for name, tensor in named_state(eager)}

    def fetch(name: str, shape: torch.Size, dtype: torch.dtype, box: tuple[slice, ...]) -> torch.Tensor:
        if state is not None:
            if name not in state:
                raise ValueError(f"rank 0's model has no tensor {name!r}")
            full = state.pop(name).to(device, dtype).contiguous()  # popped: rank 0 frees as it goes
        else:
            full = torch.empty(shape, dtype=dtype, device=device)
        if dist.is_initialized():
            dist.broadcast(full, src=0)
        return full[box]

    return fetch


# -- the entry point --------------------------------------------------------------------------------


def build_sharded(
    config: TrainConfig,
    device: torch.device | str,
    *,
    frozen_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    mp_bf16: bool = False,
    fsdp: bool | None = None,
    hsdp_replicas: int = 1,
) -> tuple[MUMUPipeline, MUMUTrainModel]:
    """The model `setup_model(config)` builds, already checkpointed, sharded and on `device`,
    without any rank holding more of it than its own shards (see the module doc for what is
    built in full on the CPU: the parts a profile builds rather than loads, and the LoRAs).

    Equal, tensor for tensor (parameters and buffers), to `setup_model(config)` followed by:
    frozen parameters cast to `frozen_dtype` (trainable ones stay float32),
    `parallel.apply_activation_checkpointing` if `activation_checkpointing`, and
    `parallel.apply_fsdp(model, device, bf16=mp_bf16, replicas=hsdp_replicas)` if `fsdp` (None: when a process group is
    up). The pipeline's encoder / adapter / UNet are the model's modules, on `device` already
    (do not call `pipe.to`); its VAE is frozen, on `device`, in `vae_dtype`. Under a process
    group every rank must call this together.
    """
    device = torch.device(device)
    if fsdp is None:
        fsdp = dist.is_initialized()
    pipe, sources = _meta_base(config)
    model = MUMUTrainModel(pipe.encoder, pipe.adapter, pipe.unet)
    lora = _inject_loras(model, config)
    set_trainable(model, config)
    for name, param in list(model.named_parameters()):
        if not param.requires_grad and param.dtype != frozen_dtype:
            owner, _, attribute = name.rpartition(".")
            frozen = nn.Parameter(param.to(frozen_dtype), requires_grad=False)
            model.get_submodule(owner)._parameters[attribute] = frozen
    pipe.vae.requires_grad_(False)
    pipe.vae.to(device)
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(vae_dtype)

    if activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if fsdp:
        parallel.apply_fsdp(model, device, bf16=mp_bf16, replicas=hsdp_replicas)
    # The buffers are real (the constructors computed them); to_empty leaves garbage in them.
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)

    fetch = _fetch_from_rank0(config, device) if sources is None else _fetch_from_sources(sources, lora)
    try:
        load_local(model, fetch)
    finally:
        for source in (sources or {}).values():
            if isinstance(source, SafetensorsFolder):
                source.close()
    return pipe, model
