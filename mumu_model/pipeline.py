"""MUMUPipeline: SDXL's UNet and VAE conditioned on multimodal prompts.

The multimodal encoder (Idefics2 without perceiver) and the adapter replace SDXL's two CLIP
text encoders. They run once per call, before the denoising loop; only the UNet runs per
step, so a MUMU image costs about what an SDXL image costs. The unconditional branch of
guidance (the empty prompt, or the negative prompt) is encoded on its own, so it costs its
own length rather than the prompts' (4 images x 324 tokens at paper size); the empty prompt's
encoding is also cached between calls (`MUMUPipeline.clear_prompt_cache` says when).
"""

from __future__ import annotations

import inspect
import os
import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle
from transformers import Idefics2Processor

from .adapter import MUMUAdapter
from .encoder import MUMUEncoder, encoder_inputs, processor_image_size
from .prompt import MultimodalPrompt, PromptError

PromptInput = Union[MultimodalPrompt, str, Sequence[Union[str, PIL.Image.Image]]]
# (prompt_embeds [B, L, D], pooled_embeds [B, P], attention_mask [B, L]): the UNet's conditioning.
Conditioning = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _encoder_states(
    encoder: MUMUEncoder, inputs: dict[str, torch.Tensor], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder half of `encode_inputs`: (last hidden states [B, L, H], attention_mask [B, L])."""
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(encoder.dtype)
    hidden = encoder(**inputs, use_cache=False).last_hidden_state
    return hidden, inputs["attention_mask"]


def encode_inputs(
    encoder: MUMUEncoder, adapter: MUMUAdapter, inputs: dict[str, torch.Tensor], device: torch.device | str
) -> Conditioning:
    """Encoder + adapter on processor outputs (`encoder_inputs`): the UNet's conditioning.

    The one place conditioning is computed, for sampling and for training alike. Returns
    (prompt_embeds [B, L, D], pooled_embeds [B, P], attention_mask [B, L]).
    """
    hidden, mask = _encoder_states(encoder, inputs, device)
    prompt_embeds, pooled = adapter(hidden, mask)
    return prompt_embeds, pooled, mask


def concat_conditioning(*parts: Conditioning) -> Conditioning:
    """Concatenate conditioning batches along the batch dimension, whatever their lengths.

    Shorter batches are right-padded to the longest with zero embeddings and a zero attention
    mask. The adapter and the UNet's cross-attention ignore masked tokens, so each prompt is
    conditioned exactly as in its own batch (up to float rounding): two batches encoded apart
    and concatenated here give the UNet what one batch encoded together gives it.
    """
    length = max(embeds.shape[1] for embeds, _, _ in parts)
    embeds = torch.cat([F.pad(e, (0, 0, 0, length - e.shape[1])) for e, _, _ in parts])
    pooled = torch.cat([p for _, p, _ in parts])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, _, m in parts])
    return embeds, pooled, mask


@dataclass
class _CachedEncoding:
    """The empty prompt's conditioning, the key it is valid for, and the hooks that drop it."""

    key: tuple
    conditioning: Conditioning
    hooks: list[RemovableHandle]


def _clear_when_trained(pipe: "weakref.ReferenceType[MUMUPipeline]"):
    """A forward pre-hook: a forward in training mode or with autograd on announces a training
    step, which may change the weights, so the pipeline's cached encoding is dropped."""

    def hook(module: torch.nn.Module, args) -> None:
        if module.training or torch.is_grad_enabled():
            pipeline = pipe()
            if pipeline is not None:
                pipeline.clear_prompt_cache()

    return hook


@dataclass
class MUMUPipelineOutput(BaseOutput):
    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along a side: each VAE block after the first halves the image."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class MUMUPipeline(DiffusionPipeline):
    r"""Generate images from multimodal prompts (text with images inline).

    Components: `encoder` (MUMUEncoder), `processor` (Idefics2Processor set to one image
    resolution), `adapter` (MUMUAdapter), `unet` (SDXL UNet2DConditionModel), `vae`
    (AutoencoderKL), `scheduler` (any diffusers scheduler; DDIM by default).

    `enable_model_cpu_offload()` (diffusers', needs accelerate) keeps one model at a time on
    the accelerator, in the order of `model_cpu_offload_seq`.
    """

    # The order the models run in a call: the encoder runs on every prompt batch before the
    # adapter runs, so offloading moves each model to the accelerator once per call.
    model_cpu_offload_seq = "encoder->adapter->unet->vae"

    def __init__(
        self,
        encoder: MUMUEncoder,
        processor: Idefics2Processor,
        adapter: MUMUAdapter,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
        max_images: int = 4,
    ):
        super().__init__()
        self.register_modules(
            encoder=encoder, processor=processor, adapter=adapter, unet=unet, vae=vae, scheduler=scheduler
        )
        self.register_to_config(max_images=max_images)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._empty_prompt_cache: _CachedEncoding | None = None

    @property
    def image_size(self) -> int:
        """Side in pixels each conditioning image is resized to; sets its token budget."""
        return processor_image_size(self.processor)

    @property
    def tokens_per_image(self) -> int:
        return self.processor.image_seq_len

    @property
    def default_sample_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to_prompts(self, prompt: PromptInput | list[PromptInput], image_root=None) -> list[MultimodalPrompt]:
        """A MultimodalPrompt, its text form, a list of parts, or a list of those (a batch)."""
        max_images = self.config.max_images
        if isinstance(prompt, (MultimodalPrompt, str)):
            return [MultimodalPrompt.coerce(prompt, image_root, max_images=max_images)]
        if isinstance(prompt, (list, tuple)):
            if len(prompt) == 0:
                raise PromptError("the prompt batch is empty; pass '' for the unconditional prompt")
            # A list holding images is one prompt in Python form (["a ", dog, " dog"]); any other
            # list is a batch, as in diffusers (a list of str is a batch of text-form prompts).
            if any(isinstance(p, PIL.Image.Image) for p in prompt):
                return [MultimodalPrompt.coerce(list(prompt), image_root, max_images=max_images)]
            return [MultimodalPrompt.coerce(p, image_root, max_images=max_images) for p in prompt]
        raise PromptError(f"cannot use a {type(prompt).__name__} as a prompt")

    def encode_prompt(self, prompts: list[MultimodalPrompt]) -> Conditioning:
        """One encoder + adapter pass over a batch of prompts, right-padded to the longest.

        Returns (prompt_embeds [B, L, D], pooled_embeds [B, P], attention_mask [B, L]); the
        mask is 0 on padding, which the adapter and the UNet ignore. The same steps as
        training's `encode_inputs`, so the unconditional branch used by guidance (the empty
        prompt) is encoded exactly as when training drops the conditioning. Never cached.
        """
        return self._encode_batches([prompts])[0]

    def _encode_batches(self, batches: list[list[MultimodalPrompt]]) -> list[Conditioning]:
        """`encode_prompt` on each batch apart (each padded to its own longest prompt).

        The encoder runs on every batch before the adapter runs on any, so that under model
        CPU offload neither model is moved to the accelerator twice in a call.
        """
        device = self._execution_device
        states = [_encoder_states(self.encoder, encoder_inputs(self.processor, batch), device) for batch in batches]
        return [(*self.adapter(hidden, mask), mask) for hidden, mask in states]

    # -- the empty prompt's encoding, cached ---------------------------------------------------------

    def clear_prompt_cache(self) -> None:
        """Drop the cached encoding of the empty prompt (the default unconditional branch).

        The cache holds one encoding, computed by a call and reused by the next calls while its
        key is unchanged: the execution device, the encoder's and adapter's dtypes and objects,
        autocast, the processor (object, image size, tokens per image), and each weight and
        buffer of the encoder and adapter (object, storage, in-place version counter). It is
        only filled and used with autograd off and the encoder and adapter in eval mode, never
        for sharded (DTensor) weights, and it is dropped as soon as either model runs a forward
        in training mode or with autograd on (a training step). So loading or copying weights
        in place, moving or casting the models, EMA swaps and training all invalidate it.
        Writes that bypass the version counter (`param.data.copy_(...)`) do not: call this
        after them.
        """
        cached, self._empty_prompt_cache = self._empty_prompt_cache, None
        if cached is not None:
            for handle in cached.hooks:
                handle.remove()

    def _empty_prompt_key(self) -> tuple | None:
        """The cache key of the empty prompt's encoding now; None where it must not be cached."""
        encoder, adapter = self.encoder, self.adapter
        if torch.is_grad_enabled() or encoder.training or adapter.training:
            return None
        weights = []
        for tensor in chain(encoder.parameters(), encoder.buffers(), adapter.parameters(), adapter.buffers()):
            # Sharded weights: a hit on one rank and a miss on another would desynchronise the
            # ranks' collectives. Inference tensors keep no version counter.
            if isinstance(tensor, DTensor) or tensor.is_inference():
                return None
            weights.append((id(tensor), tensor.data_ptr(), tensor._version))
        device = self._execution_device
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        processor = (id(self.processor), self.image_size, self.tokens_per_image)
        return (device, encoder.dtype, adapter.dtype, autocast, processor, id(encoder), id(adapter), tuple(weights))

    def _store_empty_prompt(self, key: tuple | None, conditioning: Conditioning) -> None:
        self.clear_prompt_cache()
        if key is None:
            return
        pipe = weakref.ref(self)
        hooks = [module.register_forward_pre_hook(_clear_when_trained(pipe)) for module in (self.encoder, self.adapter)]
        self._empty_prompt_cache = _CachedEncoding(key, conditioning, hooks)

    def _guidance_conditioning(
        self, prompts: list[MultimodalPrompt], negatives: list[MultimodalPrompt] | None
    ) -> Conditioning:
        """Unconditional then conditional conditioning (diffusers' order), padded to one length.

        The unconditional branch is `negatives` (one prompt, or one per prompt) or, when None or
        all empty, the empty prompt, taken from the cache when it is valid. It is encoded apart
        from the prompts, so it costs its own length, and padded (masked) to theirs or vice versa.
        """
        batch = len(prompts)
        if negatives is None or all(negative.is_empty for negative in negatives):
            key = self._empty_prompt_key()
            cached = self._empty_prompt_cache
            if cached is not None and key is not None and cached.key == key:
                (cond,), uncond = self._encode_batches([prompts]), cached.conditioning
            else:
                cond, uncond = self._encode_batches([prompts, [MultimodalPrompt()]])
                self._store_empty_prompt(key, uncond)
        else:
            cond, uncond = self._encode_batches([prompts, negatives])
        if uncond[0].shape[0] == 1 and batch > 1:  # one unconditional encoding, shared
            embeds, pooled, mask = uncond
            uncond = (embeds.expand(batch, -1, -1), pooled.expand(batch, -1), mask.expand(batch, -1))
        return concat_conditioning(uncond, cond)

    def _add_time_ids(self, height: int, width: int, batch: int, dtype, device) -> torch.Tensor:
        # SDXL's micro-conditioning: original size, crop top-left, target size. MUMU keeps it.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        return time_ids.repeat(batch, 1)

    def _extra_step_kwargs(self, generator, eta: float) -> dict:
        # Schedulers differ in which of these their step() accepts.
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptInput | list[PromptInput],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        negative_prompt: PromptInput | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        image_root: str | os.PathLike | None = None,
        eta: float = 0.0,
        return_dict: bool = True,
    ) -> MUMUPipelineOutput | tuple:
        r"""
        Args:
            prompt: a `MultimodalPrompt`, its text form (`"a <img:dog.png> dog"`), a list of
                parts (`["a ", dog_image, " dog"]`), or a list of those (a batch).
            height, width: output size in pixels (default: the UNet's native size).
            num_inference_steps: denoising steps (paper: 50 DDIM steps).
            guidance_scale: classifier-free guidance (paper: 6). <= 1 disables guidance.
            negative_prompt: replaces the empty prompt as the unconditional branch (paper: none):
                one prompt for the whole batch, or one per prompt. Encoded apart from the
                prompts, at its own length.
            num_images_per_prompt: images generated for each prompt.
            generator: torch generator(s) for reproducible sampling.
            output_type: "pil", "np", "pt" or "latent".
            image_root: folder that image references of text-form prompts are resolved in and
                confined to.
            eta: DDIM's eta (0 is deterministic DDIM).
        """
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")

        prompts = self.to_prompts(prompt, image_root)
        batch = len(prompts)
        guided = guidance_scale > 1.0
        device = self._execution_device

        if guided:
            negatives = None
            if negative_prompt is not None:
                negatives = self.to_prompts(negative_prompt, image_root)
                if len(negatives) not in (1, batch):
                    raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
            embeds, pooled, mask = self._guidance_conditioning(prompts, negatives)
        else:
            embeds, pooled, mask = self.encode_prompt(prompts)

        dtype = self.unet.dtype
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0).to(dtype)
        pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0).to(dtype)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        time_ids = self._add_time_ids(height, width, embeds.shape[0], dtype, device)
        added_cond = {"text_embeds": pooled, "time_ids": time_ids}

        total = batch * num_images_per_prompt
        shape = (total, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._extra_step_kwargs(generator, eta)

        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress:
            for t in timesteps:
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=mask,
                    added_cond_kwargs=added_cond,
                ).sample
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                progress.update()

        if output_type == "latent":
            images = latents
        else:
            images = self._decode(latents)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return MUMUPipelineOutput(images=images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # SDXL's VAE overflows in float16; its config asks to decode in float32.
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        vae_dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        try:
            # The inverse of training's `vae_latents`: unscale, then unshift (SD3/Flux VAEs shift).
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor + shift).sample
        finally:
            if upcast:
                self.vae.to(torch.float16)
