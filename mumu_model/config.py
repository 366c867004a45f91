"""One flat, typed config for the sizes and checkpoints of a MUMU model.

A profile is a named `ModelConfig`. `paper` is MUMU-Idefics2-SDXL as published; `tiny` builds
the same classes from small configs with random weights, for tests and laptops. Every
checkpoint field takes a hub id or a local path; `None` means "build the tiny architecture".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

# Idefics2's SigLIP vision tower cuts images into 14x14 patches; with the perceiver removed,
# every patch is one token, so the conditioning resolution sets the token budget per image.
PATCH_SIZE = 14


@dataclass(frozen=True)
class ModelConfig:
    # Idefics2 checkpoint (hub id or path). None: the tiny Idefics2 architecture, random weights.
    encoder: str | None
    # SDXL pipeline folder or hub id providing unet/, vae/ and scheduler/. None: tiny SDXL parts.
    sdxl: str | None
    # A VAE folder or hub id that replaces the SDXL one (e.g. madebyollin/sdxl-vae-fp16-fix, or
    # the toy profile's VAE trained by the data graph). None: the SDXL folder's, or a tiny one.
    vae: str | None = None
    # Side of the square each conditioning image is padded and resized to (paper stage 1: 252 px
    # = 18x18 patches = 324 tokens; stage 2: 504 px = 1,296 tokens).
    image_size: int = 252
    # Images allowed in one prompt (paper stage 1: up to 3 crops + 1 canny/depth/sketch image).
    max_images: int = 4
    # The non-causal adapter transformer between the VLM and the UNet's cross-attention.
    adapter_layers: int = 16
    adapter_width: int = 2048
    adapter_heads: int = 16
    # Image tokens pass the perceiver's final RMSNorm on their way into the LM (a checkpoint's
    # trained norm, or a fresh one at the text embeddings' scale). Without it they enter at the
    # connector's raw scale and a causal LM overwrites later crops with the first
    # (docs/toy_learning.md, "Binding crops").
    image_token_norm: bool = True
    # The adapter's attention knows token order ("rope") or not ("none"); its pooled vector,
    # added to the UNet's time embedding everywhere, averages all tokens ("all") or the text's.
    adapter_positions: str = "none"
    adapter_pooled: str = "all"
    # Sizes of what is built rather than loaded (sdxl=None): the UNet's block widths (the first
    # block has no attention, as in SDXL), the side of generated images in pixels, and the
    # training noise schedule. Small latents need "squaredcos_cap_v2": SDXL's scaled_linear
    # schedule leaves a 16x16 latent's layout visible at the last timestep.
    unet_channels: tuple[int, ...] = (32, 64)
    # The built UNet's cross-attention width, and whether its first, finest block attends to the
    # prompt too (SDXL's has no attention there). Loaded UNets keep their own.
    unet_cross_attention_dim: int = 32
    unet_first_block_attention: bool = False
    resolution: int = 64
    noise_schedule: str = "scaled_linear"
    # What the built UNet learns to predict: SDXL's "epsilon", or "v_prediction", which keeps the
    # loss informative at the noisiest timesteps, where a small model decides layout and colour.
    prediction_type: str = "epsilon"
    # "float32", "bfloat16" or "float16": the dtype the parts are loaded or built in.
    dtype: str = "float32"
    seed: int = 0  # initialises whatever is built rather than loaded (the adapter, tiny parts)

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {self.image_size}")
        if self.adapter_width % self.adapter_heads:
            raise ValueError(
                f"adapter_width ({self.adapter_width}) must be divisible by adapter_heads ({self.adapter_heads})"
            )
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")
        if len(self.unet_channels) < 2 or any(c <= 0 or c % 8 for c in self.unet_channels):
            raise ValueError(f"unet_channels must be >= 2 positive multiples of 8, got {self.unet_channels}")
        if self.noise_schedule not in ("scaled_linear", "linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"noise_schedule must be scaled_linear, linear or squaredcos_cap_v2, got {self.noise_schedule!r}"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.adapter_positions not in ("none", "rope"):
            raise ValueError(f"adapter_positions must be none or rope, got {self.adapter_positions!r}")
        if self.adapter_pooled not in ("all", "text"):
            raise ValueError(f"adapter_pooled must be all or text, got {self.adapter_pooled!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2


PROFILES: dict[str, ModelConfig] = {
    "paper": ModelConfig(
        encoder="HuggingFaceM4/idefics2-8b",
        sdxl="stabilityai/stable-diffusion-xl-base-1.0",
        image_size=252,
        max_images=4,
        adapter_layers=16,
        adapter_width=2048,
        adapter_heads=16,
        dtype="bfloat16",
    ),
    "tiny": ModelConfig(
        encoder=None,
        sdxl=None,
        image_size=28,
        max_images=4,
        adapter_layers=2,
        adapter_width=64,
        adapter_heads=4,
        dtype="float32",
    ),
    # The embedded default: 32 px renders of coloured shapes, a VAE trained by the data
    # graph (set `vae`), crops of 28 px = 4 tokens, a 3-layer width-128 adapter, UNet (32, 64, 64),
    # v-prediction: a model this small learns to follow the prompt only with it (see
    # docs/toy_learning.md).
    "toy": ModelConfig(
        encoder=None,
        sdxl=None,
        image_size=28,
        max_images=4,
        adapter_layers=3,
        adapter_width=128,
        adapter_heads=4,
        unet_channels=(32, 64, 64),
        resolution=32,
        noise_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        dtype="float32",
    ),
}


def _parse_value(name: str, raw: str, annotation: str):
    hint = typing.get_type_hints(ModelConfig)[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if raw.lower() in ("none", "null", "") and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is type(None):
            continue
        if kind is bool:  # bool("false") is True
            if raw.lower() in ("true", "false", "1", "0", "yes", "no"):
                return raw.lower() in ("true", "1", "yes")
            continue
        if typing.get_origin(kind) is tuple:  # "32,64,64" or "[32, 64, 64]"
            try:
                return tuple(int(v) for v in raw.strip("[]()").split(","))
            except ValueError:
                continue
        try:
            return kind(raw)
        except ValueError:
            pass
    raise ValueError(f"config field {name!r} expects {annotation}, got {raw!r}")


def load_model_config(
    profile: str = "tiny",
    overrides: typing.Mapping[str, object] | typing.Sequence[str] = (),
    path: str | Path | None = None,
) -> ModelConfig:
    """Profile defaults, then the YAML file at `path` (may name its own `profile`), then overrides.

    Overrides are a mapping or "field=value" strings (the CLI's `--set`).
    """
    values: dict[str, object] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        profile = loaded.pop("profile", profile)
        values.update(loaded)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    if isinstance(overrides, typing.Mapping):
        values.update(overrides)
    else:
        for item in overrides:
            name, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not of the form field=value")
            values[name.strip()] = raw.strip()
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name, value in list(values.items()):
        if name not in fields:
            raise ValueError(f"unknown config field {name!r}; fields are {sorted(fields)}")
        if isinstance(value, str):
            values[name] = _parse_value(name, value, str(fields[name].type))
        elif isinstance(value, list):  # a YAML list for a tuple field
            values[name] = tuple(value)
    return dataclasses.replace(PROFILES[profile], **values)
