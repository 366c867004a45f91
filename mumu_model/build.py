"""Build a MUMUPipeline from a ModelConfig: load the checkpoints it names, build the rest.

`build_pipeline(config)` is the one entry point. A checkpoint field that is None (the `tiny`
and `toy` profiles) is built here from config with random weights by `build_processor`,
`build_encoder`, `build_unet` and `build_vae`: the real architectures (Idefics2 with a Mistral
LM, SDXL's UNet with text_time conditioning, AutoencoderKL) at a small size, so a small model
runs the same code, save and load included, as the paper's. The adapter is always new.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Idefics2Config, Idefics2ImageProcessor, Idefics2Processor, PreTrainedTokenizerFast

from .adapter import MUMUAdapter
from .config import PATCH_SIZE, ModelConfig
from .encoder import MUMUEncoder, configure_processor, encoder_config
from .pipeline import MUMUPipeline, vae_scale_factor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SDXL base's training noise schedule, with DDIM (the paper samples with 50 DDIM steps).
SDXL_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)

# A byte-level BPE learned from these words keeps tiny prompts short; any text still encodes.
_TINY_CORPUS = (
    "a an the and with of in on at his her their style photo painting drawing cartoon animated "
    "man woman person dog cat car scooter guitar monster armor robe portrait face head hat "
    "circle square triangle star heart cross ring diamond red orange yellow green blue purple "
    "pink brown black white gray stripes dots checker gradient noise plain background riding "
    "playing hiking wilderness day night city new york abstract geometric modernist cubist"
)


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    # Every prompt starts with BOS, as Idefics2's tokenizer does: the empty prompt is one token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_processor(image_size: int) -> Idefics2Processor:
    image_processor = Idefics2ImageProcessor(do_image_splitting=False)
    processor = Idefics2Processor(image_processor, build_tokenizer())
    return configure_processor(processor, image_size)


def build_encoder(processor: Idefics2Processor, image_size: int, image_token_norm: bool = True) -> MUMUEncoder:
    tokenizer = processor.tokenizer
    config = Idefics2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=PATCH_SIZE,
            image_size=image_size,
        ),
        perceiver_config=dict(hidden_size=64, resampler_n_latents=processor.image_seq_len),
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=processor.image_token_id,
        use_cache=False,
    )
    config.image_token_norm = image_token_norm
    return MUMUEncoder(config)


def build_unet(
    cross_attention_dim: int = 32,
    pooled_dim: int = 32,
    *,
    sample_size: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64),
    transformer_layers_per_block: tuple[int, ...] | None = None,
    first_block_attention: bool = False,
) -> UNet2DConditionModel:
    """SDXL's UNet layout (text_time added conditioning: pooled text + 6 micro-conditions,
    linear projections, no attention in the first block unless `first_block_attention`), tiny."""
    time_embed_dim = 8
    levels = len(block_out_channels)
    if transformer_layers_per_block is None:
        transformer_layers_per_block = (1,) * (levels - 1) + (2,)
    first_down, last_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if first_block_attention else ("DownBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=(first_down,) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + (last_up,),
        attention_head_dim=tuple(max(2, c // 16) for c in block_out_channels),
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
        use_linear_projection=True,
        norm_num_groups=8,
    )


def build_config_unet(config: ModelConfig, vae: AutoencoderKL) -> UNet2DConditionModel:
    """The UNet a config builds when it names no SDXL checkpoint, sized to the VAE's latents."""
    return build_unet(
        config.unet_cross_attention_dim,
        sample_size=config.resolution // vae_scale_factor(vae),
        block_out_channels=config.unet_channels,
        first_block_attention=config.unet_first_block_attention,
    )


def build_vae(block_out_channels: tuple[int, int] = (16, 32), sample_size: int = 64) -> AutoencoderKL:
    # Two blocks: the VAE downsamples by 2 (SDXL's by 8), so tiny images have large latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=block_out_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def build_scheduler(config: ModelConfig) -> DDIMScheduler:
    """The sampler of a UNet built from config: SDXL's schedule with the config's betas and
    prediction type, sampled with DDIM."""
    schedule = {**SDXL_SCHEDULE, "beta_schedule": config.noise_schedule}
    return DDIMScheduler(**schedule, prediction_type=config.prediction_type)


def unet_pooled_dim(unet: UNet2DConditionModel) -> int:
    """The pooled text embedding SDXL's UNet adds to its time embedding (1280 for SDXL base)."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        raise ValueError(f"MUMU needs an SDXL UNet (addition_embed_type='text_time'), got {config.addition_embed_type!r}")
    return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim


def build_adapter(config: ModelConfig, encoder: MUMUEncoder, unet: UNet2DConditionModel) -> MUMUAdapter:
    return MUMUAdapter(
        in_dim=encoder.config.text_config.hidden_size,
        width=config.adapter_width,
        num_layers=config.adapter_layers,
        num_heads=config.adapter_heads,
        cross_attention_dim=unet.config.cross_attention_dim,
        pooled_dim=unet_pooled_dim(unet),
        positions=config.adapter_positions,
        pooled=config.adapter_pooled,
    )


def build_pipeline(config: ModelConfig) -> MUMUPipeline:
    """Load every checkpoint the config names, build the rest; the adapter is always new."""
    dtype = DTYPES[config.dtype]
    torch.manual_seed(config.seed)
    if config.encoder is None:
        processor = build_processor(config.image_size)
        encoder = build_encoder(processor, config.image_size, config.image_token_norm)
    else:
        encoder = MUMUEncoder.from_pretrained(
            config.encoder, config=encoder_config(config.encoder, config.image_token_norm), dtype=dtype
        )
        processor = configure_processor(Idefics2Processor.from_pretrained(config.encoder), config.image_size)
    # A VAE the config names replaces SDXL's (or the tiny one); its depth sets the latent size.
    vae = None
    if config.vae is not None:
        vae = AutoencoderKL.from_pretrained(config.vae, torch_dtype=dtype, use_safetensors=True)
    if config.sdxl is None:
        if vae is None:
            vae = build_vae(sample_size=config.resolution)
        unet = build_config_unet(config, vae)
        scheduler = build_scheduler(config)
    else:
        unet = UNet2DConditionModel.from_pretrained(config.sdxl, subfolder="unet", torch_dtype=dtype)
        if vae is None:
            vae = AutoencoderKL.from_pretrained(config.sdxl, subfolder="vae", torch_dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(config.sdxl, subfolder="scheduler")
    adapter = build_adapter(config, encoder, unet)
    if dtype != torch.float32:  # what was built rather than loaded is still float32
        for module in (encoder, adapter, unet, vae):
            module.to(dtype)
    return MUMUPipeline(
        encoder=encoder,
        processor=processor,
        adapter=adapter,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        max_images=config.max_images,
    )
