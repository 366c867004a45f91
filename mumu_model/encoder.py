"""Idefics2 without its perceiver: the multimodal prompt encoder of MUMU.

Idefics2 pools every image to 64 tokens with a perceiver resampler. The paper removes it
because so few tokens lose detail; each image then keeps one token per 14x14 patch, so the
token budget is set by the resolution the image is resized to (paper: 252 px -> 324 tokens,
504 px -> 1,296 tokens). transformers has no switch for this, so the bypass lives in a
subclass: `from_pretrained` rebuilds the subclass and the bypass survives loading.

The perceiver also ended in an RMSNorm, so the language model was trained on image tokens of
that norm's scale. Without it the connector's raw output enters the LM at whatever scale it has
(a fresh tiny build: a seventh of the text tokens' RMS), and a causal LM then fills every later
crop's small residual stream with what it attends to, the first crop included. So the bypass
keeps that norm (`image_token_norm`, the encoder config's attribute; the checkpoint's trained
`perceiver_resampler.norm.weight` loads into it). Encoders saved without the attribute keep
feeding the raw output.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from transformers import Idefics2Config, Idefics2Model, Idefics2Processor
from transformers import initialization as init
from transformers.models.idefics2.modeling_idefics2 import Idefics2RMSNorm

# diffusers finds how to load a component of a custom module by looking its base classes up in
# that module's namespace; without this name `MUMUPipeline.from_pretrained` cannot load the encoder.
from transformers import PreTrainedModel  # noqa: F401

from .config import PATCH_SIZE
from .images import pad_to_square
from .prompt import MultimodalPrompt, PromptError


class ImageTokenNorm(Idefics2RMSNorm):
    """The perceiver's final RMSNorm, kept: image tokens enter the LM on the scale it was trained on."""


class PerceiverBypass(nn.Module):
    """Stands where the perceiver resampler was: every patch token reaches the language model,
    through the perceiver's final norm when `norm` is given."""

    def __init__(self, norm: ImageTokenNorm | None = None):
        super().__init__()
        self.norm = norm

    def forward(self, context: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return context if self.norm is None else self.norm(context)


class MUMUEncoder(Idefics2Model):
    # A full Idefics2 checkpoint also holds the perceiver and the LM head; of them only the
    # perceiver's final norm is used (when the config keeps it: then it is an expected key).
    _keys_to_ignore_on_load_unexpected = [r"perceiver_resampler\.", r"lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        norm = None
        if getattr(config, "image_token_norm", False):
            perceiver = config.perceiver_config
            norm = ImageTokenNorm(config.text_config.hidden_size, eps=perceiver.rms_norm_eps)
            # post_init has run already: initialise the new norm here as _init_weights would.
            torch.nn.init.constant_(norm.weight, config.text_config.initializer_range)
        self.connector.perceiver_resampler = PerceiverBypass(norm)

    def _init_weights(self, module):
        super()._init_weights(module)
        # A fresh norm scales image tokens to the RMS of freshly initialised token embeddings
        # (their std), so both kinds of token start on one scale; a checkpoint's norm loads over it.
        if isinstance(module, ImageTokenNorm):
            init.constant_(module.weight, self.config.text_config.initializer_range)


def encoder_config(source: str, image_token_norm: bool) -> Idefics2Config:
    """The Idefics2 config of a checkpoint (hub id or folder), with the bypass's norm set.

    A MUMU pipeline's saved encoder records `image_token_norm` itself; use its config as it is."""
    config = Idefics2Config.from_pretrained(source)
    config.image_token_norm = image_token_norm
    return config


def configure_processor(processor: Idefics2Processor, image_size: int) -> Idefics2Processor:
    """Set the processor to one fixed square resolution and the matching number of image tokens."""
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    image_processor = processor.image_processor
    # Idefics2 splits large images into 4 crops + the whole; MUMU gives each image one budget.
    image_processor.do_image_splitting = False
    image_processor.size = {"longest_edge": image_size, "shortest_edge": image_size}
    processor.image_seq_len = (image_size // PATCH_SIZE) ** 2
    # Padding goes on the right so that every prompt's tokens keep the same positions alone or
    # in a batch; the attention mask hides the padding from the adapter and the UNet.
    processor.tokenizer.padding_side = "right"
    return processor


def processor_image_size(processor: Idefics2Processor) -> int:
    return int(processor.image_processor.size["longest_edge"])


def prepare_conditioning_image(image: Image.Image, image_size: int) -> Image.Image:
    """Pad to square with black (as in training), then resize to the token budget's resolution.

    Crops are always resized up or down to the budget: the paper never uses fewer tokens.
    """
    return pad_to_square(image).resize((image_size, image_size), Image.Resampling.BICUBIC)


def reserved_tokens(processor: Idefics2Processor) -> list[str]:
    """The strings the processor gives a meaning of its own: a prompt may not hold them as text."""
    return [processor.image_token, processor.fake_image_token, str(processor.end_of_utterance_token)]


def encoder_inputs(
    processor: Idefics2Processor, prompts: list[MultimodalPrompt]
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of multimodal prompts through the real Idefics2 processor."""
    image_size = processor_image_size(processor)
    reserved = reserved_tokens(processor)
    texts, images = [], []
    for index, prompt in enumerate(prompts):
        for part in prompt.parts:
            if isinstance(part, str):
                for token in reserved:
                    if token in part:
                        raise PromptError(
                            f"prompt {index} contains the encoder's reserved token {token!r} as text; "
                            "write '<<' for a literal '<' in the text form"
                        )
        texts.append(prompt.text_with_placeholders(processor.image_token))
        images.append([prepare_conditioning_image(image, image_size) for image in prompt.images])
    has_images = any(images)
    return processor(
        text=texts,
        images=images if has_images else None,
        padding="longest",
        return_tensors="pt",
    )
