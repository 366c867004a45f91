"""Testing utilities: tiny random-weight models built from config, saved like hub checkpoints.

Tests, benchmarks and offline demos cannot download the real checkpoints (SDXL, PickScore,
GroundingDINO, DETR, an NSFW ViT, LLaVA-NeXT, Depth Anything, a chat LLM, DINO, MUMU itself).
Each builder makes the real architecture from a config at a size that runs in milliseconds on
a CPU, saves it with `save_pretrained` (model and processor/tokenizer together, as on the hub)
to the folder it is given, and returns that folder. Callers load it by path through the same
`from_pretrained` code a real checkpoint takes, so loading, preprocessing and post-processing
are exercised, not mocked.

The weights are random: outputs are plumbing, not predictions. Where a caller needs a
predictable answer the head is biased on purpose (DETR always says "person", the classifier
always says its last label). Builds are deterministic: the same arguments give the same files.
Nothing in the library imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    Dinov2Config,
    DPTImageProcessor,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    ResNetConfig,
    SwinConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from .build import build_pipeline, build_unet, build_vae
from .config import load_model_config

__all__ = [
    "tiny_causal_lm",
    "tiny_clip",
    "tiny_clip_tokenizer",
    "tiny_depth_anything",
    "tiny_detr",
    "tiny_dino",
    "tiny_grounding_dino",
    "tiny_image_classifier",
    "tiny_llava_next",
    "tiny_pipeline",
    "tiny_sdxl_pipeline",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # The weights depend only on `seed`; forking the RNG keeps a build from resetting the
    # caller's global torch RNG (a training run that builds a scorer mid-way, say).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- CLIP text side, shared by SDXL and the PickScore-like CLIP -----------------------------

_TEXT_HIDDEN = 32  # each SDXL text encoder's width; the UNet cross-attends to both, concatenated
_POOLED_DIM = 32  # text_encoder_2's projection, added to the UNet time embedding


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with one token per byte and no merges: any text encodes, offline.

    transformers 5 builds `CLIPTokenizer` from an in-memory `vocab` dict and `merges` list (no
    vocab.json needed). CLIP marks word ends with "</w>", so each byte has both forms.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # eos_token_id must be the tokenizer's: CLIP pools the hidden state at the first EOS.
    # (eos_token_id=2 would switch CLIP to its legacy argmax-of-ids pooling.)
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,  # SDXL reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_POOLED_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# -- SDXL -------------------------------------------------------------------------------------


def _sdxl_unet() -> UNet2DConditionModel:
    # Cross-attends to both text encoders' hidden states, concatenated, as SDXL does.
    return build_unet(2 * _TEXT_HIDDEN, _POOLED_DIM, sample_size=16, block_out_channels=(16, 32),
                     transformer_layers_per_block=(1, 1))


def _sdxl_vae() -> AutoencoderKL:
    return build_vae(block_out_channels=(8, 16), sample_size=32)


def tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A whole `StableDiffusionXLPipeline` (two CLIP text encoders, UNet, VAE, Euler), saved
    as safetensors; load it with `StableDiffusionXLPipeline.from_pretrained(path)`."""
    path = Path(path)
    with _seeded(seed):
        tokenizer = tiny_clip_tokenizer()
        tokenizer_2 = tiny_clip_tokenizer()
        pipeline = StableDiffusionXLPipeline(
            vae=_sdxl_vae(),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer_2)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=_sdxl_unet(),
            # SDXL base's scheduler settings
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
            ),
        )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


# -- CLIP (PickScore) -------------------------------------------------------------------------

_CLIP_IMAGE_SIZE = 32


def tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A `CLIPModel` and its `CLIPProcessor` saved together, as PickScore is; load it with
    `PickScorer(str(path))`. Images are resized and centre-cropped to 32 px."""
    path = Path(path)
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=_CLIP_IMAGE_SIZE, patch_size=8,
        ).to_dict(),
        projection_dim=16,
        logit_scale_init_value=math.log(100.0),  # PickScore's trained scale is ~100 too
    )
    with _seeded(seed):
        model = CLIPModel(config)
    model.save_pretrained(path)
    side = _CLIP_IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


# -- GroundingDINO ----------------------------------------------------------------------------

# GroundingDINO splits its query into phrases at the BERT ids of [CLS], [SEP], "." and "?"
# (SPECIAL_TOKENS in transformers' modeling_grounding_dino), so a tiny vocabulary keeps them.
_BERT_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
_BERT_TINY_VOCAB_SIZE = 1100  # just above the highest special id, 1029


def tiny_grounding_dino(path: str | Path, words: Sequence[str], seed: int = 0, image_side: int = 64) -> Path:
    """A GroundingDINO whose vocabulary is `words` (plus BERT's special tokens at BERT's ids);
    load it with `GroundingDinoDetector(str(path))`.

    A word missing from `words` tokenizes to [UNK], so pass every word the captions use (BERT
    word pieces such as "##erness" too). Swin backbone and BERT text model from configs (no
    timm, no hub); `decoder_layers=2`, the least that works. Images are resized to
    `image_side` px on their short side.
    """
    path = Path(path)
    names = iter(dict.fromkeys(w.lower() for w in words))
    vocab = {}
    for index in range(_BERT_TINY_VOCAB_SIZE):
        vocab[_BERT_IDS.get(index) or next(names, None) or f"[unused{index}]"] = index
    # transformers 5 ignores `vocab_file=` here; `vocab=` works.
    tokenizer = BertTokenizer(vocab=vocab)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
            image_size=image_side, out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=_BERT_TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=30,
        max_text_len=64,
        # The 3 Swin stages only: a 4th, strided level would be 1x1 on small images, and
        # GroupNorm cannot normalise a single value per channel.
        num_feature_levels=3,
    )
    with _seeded(seed):
        model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(path)
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": image_side, "longest_edge": image_side * 3 // 2}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


# -- DETR (person counting) -------------------------------------------------------------------


def tiny_detr(path: str | Path, num_queries: int = 1, seed: int = 0) -> Path:
    """A DETR whose every query is a confident "person" (p~1), whatever the image; load it
    with `DetrPersonCounter(str(path))`. `num_queries` is thus the number of people it finds.

    ResNet backbone from config (no timm); images are resized to 64-96 px.
    """
    path = Path(path)
    config = DetrConfig(
        use_timm_backbone=False,
        backbone_config=ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", out_features=["stage2"]
        ),
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=num_queries,
        id2label={0: "N/A", 1: "person", 2: "dog"},
    )
    with _seeded(seed):
        model = DetrForObjectDetection(config)
    # A zero weight and a biased head make the class independent of the image (random
    # weights alone would give each query a random class): logits over [N/A, person, dog,
    # no-object]. The boxes stay random.
    with torch.no_grad():
        model.class_labels_classifier.weight.zero_()
        model.class_labels_classifier.bias.copy_(torch.tensor([-5.0, 5.0, -5.0, -5.0]))
    model.save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    return path


# -- image classifier (NSFW / watermark filters) ----------------------------------------------


def tiny_image_classifier(
    path: str | Path, labels: Sequence[str] = ("normal", "nsfw"), reject_bias: float = 5.0, seed: int = 0
) -> Path:
    """A ViT classifier over `labels` that ignores the image: the last label gets logit
    `reject_bias`, the others 0, so by default it always says "nsfw" with p = sigmoid(5) ~ 0.993
    (what a filter rejecting "nsfw" rejects). Load it with `ImageClassifierFilter(str(path), ...)`.

    Images are resized to 32 px.
    """
    path = Path(path)
    if len(labels) < 2:
        raise ValueError(f"an image classifier needs at least 2 labels, got {list(labels)}")
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    with _seeded(seed):
        model = ViTForImageClassification(config)
    with torch.no_grad():  # a zero weight makes the answer independent of the image
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[-1] = reject_bias
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# -- byte-level BPE tokenizers for the language models ----------------------------------------


def _bpe_tokenizer(
    texts: Sequence[str], special_tokens: Sequence[str], unk_token: str | None = None, **roles: Any
) -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE trained on `texts`: any text encodes (bytes), common words in
    one or a few tokens. Training is deterministic and takes milliseconds. `roles` name the
    special tokens' roles (bos_token="<s>", ...) for `PreTrainedTokenizerFast`."""
    backend = Tokenizer(models.BPE(unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if unk_token is not None:
        roles["unk_token"] = unk_token
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


# -- LLaVA-NeXT (captioner) -------------------------------------------------------------------

_LLAVA_CHAT_TEMPLATE = (  # llava-v1.6-mistral's format
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}"
)


def tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: a CLIP vision tower (32 px, patch 8) and a Mistral LM, anyres grid up to
    64 px, with llava-v1.6-mistral's chat template; load it with `LlavaNextCaptioner(str(path))`.
    """
    path = Path(path)
    tokenizer = _bpe_tokenizer(
        ["describe this image in one sentence a man with a dog"] * 4,
        special_tokens=["<unk>", "<s>", "</s>", "<image>"],
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},  # LlavaNextProcessor reads tokenizer.image_token
    )
    grid = [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=grid
    )
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=_LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(path)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=16,
        ),
        text_config=MistralConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with _seeded(seed):
        model = LlavaNextForConditionalGeneration(config)
    model.save_pretrained(path)
    return path


# -- Depth Anything (depth control images) ----------------------------------------------------


def tiny_depth_anything(path: str | Path, seed: int = 0) -> Path:
    """Depth Anything: a DINOv2 backbone (patch 14) and a DPT head, images resized to 56 px
    keeping their aspect ratio; load it with `TransformersDepthBackend(str(path))`."""
    path = Path(path)
    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14,
        image_size=56, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8,
    )
    with _seeded(seed):
        model = DepthAnythingForDepthEstimation(config)
    model.save_pretrained(path)
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14)
    processor.save_pretrained(path)
    return path


# -- a chat causal LM (content/style splitter) ------------------------------------------------

# A plain "role: content" chat format, so a rendered chat is easy to read and to assert on.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
# Text-to-image prompts and the splitter's JSON answer, so the BPE merges are words it sees.
_PROMPT_CORPUS = [
    "a castle on a hill at sunset, oil painting, by greg rutkowski, trending on artstation",
    "portrait of a cyberpunk girl with neon hair, digital art, highly detailed, 8k",
    "a cat sitting on a windowsill in the rain, watercolor, soft light",
    "an astronaut riding a horse on mars, photorealistic, octane render, cinematic lighting",
    "a cozy cabin in a snowy forest at night, concept art, by thomas kinkade",
    '{"content": "a castle on a hill at sunset", "style": "oil painting, by greg rutkowski"}',
    '{"content": "", "style": ""}',
]


def tiny_causal_lm(path: str | Path, seed: int = 0) -> Path:
    """A 1-layer Llama and a 300-token BPE tokenizer with a chat template; load it with
    `TransformersChatSplitter(str(path))` or `AutoModelForCausalLM.from_pretrained(path)`."""
    path = Path(path)
    tokenizer = _bpe_tokenizer(
        _PROMPT_CORPUS, special_tokens=["<pad>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """A DINO-shaped `ViTModel` (patch 16, random weights, 32 px) and its image processor,
    saved to `path`; load it with `DinoEmbedder(path)` as `facebook/dino-vits16` would be."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    config = ViTConfig(
        image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )
    with _seeded(seed):
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    # dino-vits16's preprocessing (resize, ImageNet mean/std), at 32 px.
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(path)
    return path


def tiny_pipeline(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Build MUMU's `tiny` profile (random weights), save it to `path`, and return `path`.

    Load it back with `MUMUPipeline.from_pretrained(path)`, the code real checkpoints use.
    """
    path = Path(path)
    pipeline = build_pipeline(load_model_config("tiny", {"seed": seed, **overrides}))
    pipeline.save_pretrained(path)
    return path
