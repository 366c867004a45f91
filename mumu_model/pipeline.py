"""MUMUPipeline: SDXL's UNet and VAE conditioned on multimodal prompts.

The multimodal encoder (Idefics2 without perceiver) and the adapter replace SDXL's two CLIP
text encoders. They run once per call, on the prompts and on the unconditional prompt
together; only the UNet runs per denoising step, so a MUMU image costs about what an SDXL
image costs.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import Idefics2Processor

from .adapter import MUMUAdapter
from .encoder import MUMUEncoder, encoder_inputs, processor_image_size
from .prompt import MultimodalPrompt, PromptError

PromptInput = Union[MultimodalPrompt, str, Sequence[Union[str, PIL.Image.Image]]]


def encode_inputs(
    encoder: MUMUEncoder, adapter: MUMUAdapter, inputs: dict[str, torch.Tensor], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder + adapter on processor outputs (`encoder_inputs`): the UNet's conditioning.

    The one place conditioning is computed, for sampling and for training alike. Returns
    (prompt_embeds [B, L, D], pooled_embeds [B, P], attention_mask [B, L]).
    """
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(encoder.dtype)
    hidden = encoder(**inputs, use_cache=False).last_hidden_state
    mask = inputs["attention_mask"]
    prompt_embeds, pooled = adapter(hidden, mask)
    return prompt_embeds, pooled, mask


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
    """

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

    def encode_prompt(self, prompts: list[MultimodalPrompt]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder + adapter pass over a batch of prompts.

        Returns (prompt_embeds [B, L, D], pooled_embeds [B, P], attention_mask [B, L]).
        Training calls this too, so the unconditional branch used by guidance (the empty
        prompt) is encoded exactly as when training drops the conditioning.
        """
        inputs = encoder_inputs(self.processor, prompts)
        return encode_inputs(self.encoder, self.adapter, inputs, self._execution_device)

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
            negative_prompt: replaces the empty prompt as the unconditional branch (paper: none).
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

        # One encoder call for everything: the prompts, then the unconditional branch (the empty
        # prompt, encoded once and shared, or the negative prompt(s)).
        if guided:
            if negative_prompt is None:
                negatives = [MultimodalPrompt()]
            else:
                negatives = self.to_prompts(negative_prompt, image_root)
                if len(negatives) == 1:
                    negatives = negatives * batch
                elif len(negatives) != batch:
                    raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
            embeds, pooled, mask = self.encode_prompt(prompts + negatives)
            if len(negatives) == 1 and batch > 1:
                last = slice(batch, batch + 1)
                embeds = torch.cat([embeds[:batch], embeds[last].expand(batch, -1, -1)])
                pooled = torch.cat([pooled[:batch], pooled[last].expand(batch, -1)])
                mask = torch.cat([mask[:batch], mask[last].expand(batch, -1)])
            # diffusers' order: unconditional first, then conditional.
            embeds = torch.cat([embeds[batch:], embeds[:batch]])
            pooled = torch.cat([pooled[batch:], pooled[:batch]])
            mask = torch.cat([mask[batch:], mask[:batch]])
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
