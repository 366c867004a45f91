"""MUMUPipeline: SDXL's UNet and VAE conditioned on multimodal prompts.

The multimodal encoder (Idefics2 without perceiver) and the adapter replace SDXL's two CLIP
text encoders. They run once per call, before the denoising loop; only the UNet runs per
step, so a MUMU image costs about what an SDXL image costs. The unconditional branch of
guidance (the empty prompt, or the negative prompt) is encoded on its own, so it costs its
own length rather than the prompts' (4 images x 324 tokens at paper size); the empty prompt's
encoding is also cached between calls (`MUMUPipeline.clear_prompt_cache` says when).

The call takes diffusers' SDXL options under their names: precomputed `prompt_embeds` (from
`encode_prompt`, reused across seeds), `latents`, `callback_on_step_end`, `guidance_rescale` and
`cross_attention_kwargs` (docs/pipeline_api.md).
"""

from __future__ import annotations

import inspect
import os
import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder half of `encode_inputs`: (last hidden states [B, L, H], attention_mask [B, L],
    image_mask [B, L], True where a token is an image's)."""
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(encoder.dtype)
    hidden = encoder(**inputs, use_cache=False).last_hidden_state
    return hidden, inputs["attention_mask"], inputs["input_ids"] == encoder.config.image_token_id


def encode_inputs(
    encoder: MUMUEncoder, adapter: MUMUAdapter, inputs: dict[str, torch.Tensor], device: torch.device | str
) -> Conditioning:
    """Encoder + adapter on processor outputs (`encoder_inputs`): the UNet's conditioning.

    The one place conditioning is computed, for sampling and for training alike. Returns
    (prompt_embeds [B, L, D], pooled_embeds [B, P], attention_mask [B, L]).
    """
    hidden, mask, image_mask = _encoder_states(encoder, inputs, device)
    prompt_embeds, pooled = adapter(hidden, mask, image_mask)
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


def _shared(conditioning: Conditioning, batch: int) -> Conditioning:
    """One unconditional encoding for a whole batch, expanded (not copied) to `batch` rows."""
    embeds, pooled, mask = conditioning
    if embeds.shape[0] == 1 and batch > 1:
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1), mask.expand(batch, -1)
    return conditioning


def _given(
    embeds: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor | None, device: torch.device
) -> Conditioning | None:
    """Precomputed conditioning as the call uses it (None where not given); no mask: every token."""
    if embeds is None:
        return None
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    return embeds.to(device), pooled.to(device), mask.to(device=device, dtype=torch.long)


def _check_embeds(
    prefix: str, embeds: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor | None
) -> None:
    """`{prefix}prompt_embeds` [B, L, D] with its pooled embeds [B, P] and, if given, its mask [B, L]."""
    name = f"{prefix}prompt_embeds"
    if embeds is None:
        for other, value in ((f"{prefix}pooled_prompt_embeds", pooled), (f"{prefix}prompt_attention_mask", mask)):
            if value is not None:
                raise ValueError(f"{other} given without {name}")
        return
    if embeds.ndim != 3:
        raise ValueError(f"{name} must be [batch, tokens, dim], got shape {tuple(embeds.shape)}")
    if pooled is None:
        raise ValueError(f"{prefix}pooled_prompt_embeds is required with {name} (encode_prompt returns both)")
    if pooled.ndim != 2 or pooled.shape[0] != embeds.shape[0]:
        raise ValueError(
            f"{prefix}pooled_prompt_embeds must be [{embeds.shape[0]}, dim] for {name} of shape "
            f"{tuple(embeds.shape)}, got {tuple(pooled.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(
            f"{prefix}prompt_attention_mask must be {list(embeds.shape[:2])} for {name} of shape "
            f"{tuple(embeds.shape)}, got {tuple(mask.shape)}"
        )


def _rows(tensor: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """`tensor` for a UNet call on `rows` latents. Twice as many rows hold both guidance branches
    after guidance was turned off mid-loop: the conditional half (the second) is kept."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] == 2 * rows:
        return tensor[rows:]
    raise ValueError(f"{name} has {tensor.shape[0]} rows for a UNet call on {rows} latents")


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


# What a call samples with when neither its caller nor the saved pipeline says: the paper's 50
# DDIM steps and guidance 6 (the size: the UNet's native one).
PAPER_STEPS = 50
PAPER_GUIDANCE = 6.0


@dataclass(frozen=True)
class SamplingDefaults:
    """The settings a pipeline samples with when the caller gives none (`MUMUPipeline.sampling_defaults`)."""

    num_inference_steps: int
    guidance_scale: float
    resolution: int  # height and width in pixels


def check_sampling_defaults(
    num_inference_steps: int | None, guidance_scale: float | None, resolution: int | None, multiple: int | None
) -> None:
    """Refuse sampling defaults no call accepts (None: not set), naming the value; `multiple` is
    what the output's sides must be multiples of (None: unknown, not checked)."""
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or
                                            not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"sampling steps {num_inference_steps!r}: must be an integer >= 1")
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not 0 <= guidance_scale < float("inf")):  # also refuses NaN
        raise ValueError(f"sampling guidance {guidance_scale!r}: must be a finite number >= 0")
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"sampling resolution {resolution!r}: must be a positive number of pixels")
        if multiple and resolution % multiple:
            raise ValueError(f"sampling resolution {resolution}: must be a multiple of {multiple} for this model")


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
        sampling_steps: int | None = None,
        sampling_guidance: float | None = None,
        sampling_resolution: int | None = None,
    ):
        super().__init__()
        self.register_modules(
            encoder=encoder, processor=processor, adapter=adapter, unet=unet, vae=vae, scheduler=scheduler
        )
        # The sampling defaults are config values, so model_index.json carries them (null: not
        # set; folders saved before they existed have none and load with the paper's).
        self.register_to_config(max_images=max_images, sampling_steps=sampling_steps,
                                sampling_guidance=sampling_guidance, sampling_resolution=sampling_resolution)
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

    @property
    def size_multiple(self) -> int:
        """What the output's height and width must be multiples of (the VAE's and UNet's downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """What a call samples with when its caller gives no steps, guidance or size: the values
        saved with the pipeline (`set_sampling_defaults`), else the paper's 50 DDIM steps and
        guidance 6 at the UNet's native size."""
        config = self.config
        steps, guidance = config.get("sampling_steps"), config.get("sampling_guidance")
        resolution = config.get("sampling_resolution")
        return SamplingDefaults(
            num_inference_steps=int(steps) if steps is not None else PAPER_STEPS,
            guidance_scale=float(guidance) if guidance is not None else PAPER_GUIDANCE,
            resolution=int(resolution) if resolution is not None else self.default_sample_size,
        )

    @property
    def trained_sizes(self) -> list[int]:
        """The output sizes (square, in pixels) this model was made for: its recommended
        resolution and the UNet's native size."""
        return sorted({self.sampling_defaults.resolution, self.default_sample_size})

    def set_sampling_defaults(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None,
        resolution: int | None = None,
    ) -> None:
        """Record the settings this model samples best with, for calls that give none; the given
        ones replace the current ones, and `save_pretrained` writes them to model_index.json
        (`mumu_model.loading.write_sampling_defaults` does the same to a saved folder)."""
        check_sampling_defaults(num_inference_steps, guidance_scale, resolution, self.size_multiple)
        given = {"sampling_steps": num_inference_steps, "sampling_guidance": guidance_scale,
                 "sampling_resolution": resolution}
        self.register_to_config(**{key: value for key, value in given.items() if value is not None})

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

    def encode_prompt(
        self, prompt: PromptInput | list[PromptInput], image_root: str | os.PathLike | None = None
    ) -> Conditioning:
        """Encode prompts once (encoder + adapter), to pass to calls as `prompt_embeds` and co.

        `prompt` takes every form the call takes (`to_prompts`). Returns the tuple
        (prompt_embeds [B, L, D], pooled_prompt_embeds [B, P], prompt_attention_mask [B, L]):
        B prompts right-padded to the longest, L its tokens (text plus `tokens_per_image` per
        image), D the UNet's `cross_attention_dim`, P the pooled width SDXL's `text_embeds` take;
        the mask is 1 on tokens and 0 on padding, which the UNet then ignores. The tensors are in
        the adapter's dtype on the execution device. The same steps as training's `encode_inputs`,
        so the unconditional branch (`encode_prompt("")`) is encoded exactly as when training
        drops the conditioning. Never cached; the call's own empty-prompt cache is separate.

            embeds, pooled, mask = pipe.encode_prompt("a <img:dog.png> dog", image_root="images")
            image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask).images[0]
        """
        return self._encode_batches([self.to_prompts(prompt, image_root)])[0]

    def _encode_batches(self, batches: list[list[MultimodalPrompt]]) -> list[Conditioning]:
        """`encode_prompt` on each batch apart (each padded to its own longest prompt).

        The encoder runs on every batch before the adapter runs on any, so that under model
        CPU offload neither model is moved to the accelerator twice in a call.
        """
        device = self._execution_device
        states = [_encoder_states(self.encoder, encoder_inputs(self.processor, batch), device) for batch in batches]
        return [(*self.adapter(hidden, mask, image_mask), mask) for hidden, mask, image_mask in states]

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
        self,
        prompts: list[MultimodalPrompt] | None,
        negatives: list[MultimodalPrompt] | None,
        cond: Conditioning | None = None,
    ) -> Conditioning:
        """Unconditional then conditional conditioning (diffusers' order), padded to one length.

        The conditional branch is `cond` when given (precomputed `prompt_embeds`), else the
        encoding of `prompts`. The unconditional branch is `negatives` (one prompt, or one per
        prompt) or, when None or all empty, the empty prompt, taken from the cache when it is
        valid. It is encoded apart from the prompts, so it costs its own length, and padded
        (masked) to theirs or vice versa.
        """
        to_encode = [] if cond is not None else [prompts]
        if negatives is None or all(negative.is_empty for negative in negatives):
            key = self._empty_prompt_key()
            cached = self._empty_prompt_cache
            if cached is not None and key is not None and cached.key == key:
                encoded, uncond = self._encode_batches(to_encode), cached.conditioning
            else:
                *encoded, uncond = self._encode_batches(to_encode + [[MultimodalPrompt()]])
                self._store_empty_prompt(key, uncond)
        else:
            *encoded, uncond = self._encode_batches(to_encode + [negatives])
        cond = cond if cond is not None else encoded[0]
        return concat_conditioning(_shared(uncond, cond[0].shape[0]), cond)

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

    # -- the call ------------------------------------------------------------------------------------

    # What `callback_on_step_end` may ask for and replace: diffusers SDXL's names (prompt_embeds,
    # add_text_embeds and add_time_ids hold both guidance branches, unconditional first) plus the
    # attention mask of prompt_embeds.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "prompt_attention_mask", "add_text_embeds", "add_time_ids"]

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # Read at every step: a callback may turn guidance off mid-loop (SDXLCFGCutoffCallback).
        return self._guidance_scale > 1.0

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_inputs(
        self,
        prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        negative_prompt,
        num_images_per_prompt: int,
        output_type: str,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        """Refuse arguments no call accepts, with a ValueError naming the argument (diffusers' rules:
        `prompt` or `prompt_embeds`, not both; embeds come with their pooled embeds)."""
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not guidance_scale >= 0:  # also refuses NaN
            raise ValueError(f"guidance_scale must be >= 0 (<= 1 turns guidance off), got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, got {unknown}"
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt or prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        _check_embeds("", prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)
        _check_embeds("negative_", negative_prompt_embeds, negative_pooled_prompt_embeds,
                      negative_prompt_attention_mask)

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptInput | list[PromptInput] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: PromptInput | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        image_root: str | os.PathLike | None = None,
        eta: float = 0.0,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> MUMUPipelineOutput | tuple:
        r"""
        Args:
            prompt: a `MultimodalPrompt`, its text form (`"a <img:dog.png> dog"`), a list of
                parts (`["a ", dog_image, " dog"]`), or a list of those (a batch). Not with
                `prompt_embeds`.
            height, width: output size in pixels (default: the pipeline's `sampling_defaults`:
                the resolution saved with it, else the UNet's native size).
            num_inference_steps: denoising steps (default: the saved sampling defaults', else
                the paper's 50 DDIM steps).
            guidance_scale: classifier-free guidance (default: the saved sampling defaults', else
                the paper's 6); must be >= 0, <= 1 disables guidance.
            negative_prompt: replaces the empty prompt as the unconditional branch (paper: none):
                one prompt for the whole batch, or one per prompt. Encoded apart from the
                prompts, at its own length.
            num_images_per_prompt: images generated for each prompt (or each row of `prompt_embeds`).
            generator: torch generator(s) for reproducible sampling.
            output_type: "pil", "np", "pt" or "latent".
            image_root: folder that image references of text-form prompts are resolved in and
                confined to.
            eta: DDIM's eta (0 is deterministic DDIM).
            latents: initial noise [B * num_images_per_prompt, C, height / s, width / s] (C the
                UNet's in_channels, s `vae_scale_factor`), used instead of drawing it from
                `generator`; scaled by the scheduler's `init_noise_sigma`, as in diffusers.
            prompt_embeds, pooled_prompt_embeds, prompt_attention_mask: the conditional branch,
                precomputed by `encode_prompt`, so the prompts and their images are not encoded
                again. `pooled_prompt_embeds` is required with `prompt_embeds`; the mask defaults
                to all ones (pass it for padded batches).
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_attention_mask:
                the unconditional branch, likewise (one row for the batch, or one per prompt).
                Default: `negative_prompt` encoded, else the (cached) empty prompt.
            guidance_rescale: diffusers' `rescale_noise_cfg` factor (Lin et al. 2023, section
                3.4), applied to guided predictions; 0 leaves them unchanged.
            cross_attention_kwargs: passed to the UNet's attention processors, as in diffusers;
                `{"scale": s}` scales the UNet's peft LoRA layers for this call.
            callback_on_step_end: `fn(pipe, step_index, timestep, tensors) -> dict`, called after
                each scheduler step with the tensors named in `callback_on_step_end_tensor_inputs`
                (a subset of `_callback_tensor_inputs`); the tensors in the returned dict replace
                the loop's. A diffusers `PipelineCallback` brings its own tensor inputs. Setting
                `pipe._guidance_scale` turns guidance off for the remaining steps, as in diffusers;
                conditioning that still holds both branches is then cut to its conditional half.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        defaults = self.sampling_defaults
        height = height or defaults.resolution
        width = width or defaults.resolution
        num_inference_steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale, negative_prompt,
            num_images_per_prompt, output_type, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask,
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_attention_mask,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        guided = self.do_classifier_free_guidance
        device = self._execution_device
        dtype = self.unet.dtype
        cond = _given(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask, device)
        prompts = self.to_prompts(prompt, image_root) if cond is None else None
        batch = len(prompts) if cond is None else cond[0].shape[0]

        if guided:
            uncond = _given(negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_attention_mask,
                            device)
            negatives = None
            if negative_prompt is not None:
                negatives = self.to_prompts(negative_prompt, image_root)
                if len(negatives) not in (1, batch):
                    raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
            if uncond is not None:
                if uncond[0].shape[0] not in (1, batch):
                    raise ValueError(f"negative_prompt_embeds has {uncond[0].shape[0]} rows for {batch} prompts")
                cond = cond if cond is not None else self._encode_batches([prompts])[0]
                embeds, pooled, mask = concat_conditioning(_shared(uncond, batch), cond)
            elif cond is not None:
                embeds, pooled, mask = self._guidance_conditioning(None, negatives, cond)
            else:
                embeds, pooled, mask = self._guidance_conditioning(prompts, negatives)
        else:
            embeds, pooled, mask = cond if cond is not None else self._encode_batches([prompts])[0]

        # diffusers SDXL's names from here on, which the step-end callback sees.
        prompt_embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0).to(dtype)
        add_text_embeds = pooled.repeat_interleave(num_images_per_prompt, dim=0).to(dtype)
        prompt_attention_mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        add_time_ids = self._add_time_ids(height, width, prompt_embeds.shape[0], dtype, device)

        total = batch * num_images_per_prompt
        shape = (total, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._extra_step_kwargs(generator, eta)

        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                guided = self.do_classifier_free_guidance
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                rows = model_input.shape[0]
                noise = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=_rows(prompt_embeds, rows, "prompt_embeds"),
                    encoder_attention_mask=_rows(prompt_attention_mask, rows, "prompt_attention_mask"),
                    added_cond_kwargs={
                        "text_embeds": _rows(add_text_embeds, rows, "add_text_embeds"),
                        "time_ids": _rows(add_time_ids, rows, "add_time_ids"),
                    },
                    cross_attention_kwargs=self.cross_attention_kwargs,
                ).sample
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + self.guidance_scale * (cond - uncond)
                    if self.guidance_rescale > 0.0:
                        noise = rescale_noise_cfg(noise, cond, guidance_rescale=self.guidance_rescale)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    current = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "prompt_attention_mask": prompt_attention_mask,
                        "add_text_embeds": add_text_embeds,
                        "add_time_ids": add_time_ids,
                    }
                    requested = {k: current[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, requested)
                    if not isinstance(outputs, dict):
                        raise TypeError(f"callback_on_step_end must return a dict, got {type(outputs).__name__}")
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    prompt_attention_mask = outputs.pop("prompt_attention_mask", prompt_attention_mask)
                    add_text_embeds = outputs.pop("add_text_embeds", add_text_embeds)
                    add_time_ids = outputs.pop("add_time_ids", add_time_ids)
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
