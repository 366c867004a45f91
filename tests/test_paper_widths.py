"""The paper architecture at its REAL widths, depth reduced, through the code real checkpoints use.

Built from the bundled public configs of Idefics2-8b and SDXL base (SigLIP 1152 wide, Mistral
4096 wide with its 32,003-token vocabulary, UNet channels 320/640/1280 with cross-attention 2048
and the 2816-wide added embedding, the 2048-wide adapter), with one layer where the real models
have many. Saved with save_pretrained and loaded back by `build_pipeline` from local folders;
then one LoRA training step with backward and one 2-step sampling call, on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Idefics2Config, Idefics2ImageProcessor, Idefics2Processor, PreTrainedTokenizerFast

from mumu_model import paper_configs
from mumu_model.encoder import MUMUEncoder, configure_processor, encoder_inputs
from mumu_model.prompt import MultimodalPrompt
from mumu_model.training.config import load_train_config
from mumu_model.training.trainer import build_optimizer, setup_model


def stand_in_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with Idefics2-8b's ids where they matter: <unk> 0, <s> 1, </s> 2, 32,000
    regular tokens (bytes, then fillers), then its special tokens at 32000-32002."""
    special = paper_configs.idefics2_special_tokens()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab[char] = len(vocab)
    while len(vocab) < special["base_vocab_size"]:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    extra = special["additional_special_tokens"]
    tokenizer.add_special_tokens([token["content"] for token in extra])
    for token in extra:
        assert tokenizer.token_to_id(token["content"]) == token["id"]
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special["bos_token"]["content"],
        eos_token=special["eos_token"]["content"],
        unk_token=special["unk_token"]["content"],
        pad_token=special["pad_token"]["content"],
        additional_special_tokens=[token["content"] for token in extra],
    )


def reduced_encoder_config() -> Idefics2Config:
    values = paper_configs.idefics2_config()
    values["vision_config"]["num_hidden_layers"] = 1
    values["text_config"]["num_hidden_layers"] = 1
    # MUMUEncoder builds the perceiver before replacing it: one layer is cheaper to discard.
    values["perceiver_config"]["resampler_depth"] = 1
    values["use_cache"] = False
    return Idefics2Config(**values)


def reduced_unet_config() -> dict:
    values = paper_configs.sdxl_config("unet")
    values.update(layers_per_block=1, transformer_layers_per_block=1)
    return values


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Local folders laid out like idefics2-8b and SDXL base: encoder (+ processor) and sdxl/."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("paper_widths")
    encoder_dir, sdxl_dir = root / "idefics2", root / "sdxl"
    torch.manual_seed(0)
    MUMUEncoder(reduced_encoder_config()).save_pretrained(encoder_dir)
    stand_in_tokenizer().save_pretrained(encoder_dir)
    for name, values in (("preprocessor_config.json", paper_configs.idefics2_preprocessor_config()),
                         ("processor_config.json", paper_configs.idefics2_processor_config())):
        (encoder_dir / name).write_text(json.dumps(values, indent=2))
    UNet2DConditionModel.from_config(reduced_unet_config()).save_pretrained(sdxl_dir / "unet")
    AutoencoderKL.from_config(paper_configs.sdxl_config("vae")).save_pretrained(sdxl_dir / "vae")
    EulerDiscreteScheduler.from_config(paper_configs.sdxl_config("scheduler")).save_pretrained(sdxl_dir / "scheduler")
    return encoder_dir, sdxl_dir


def test_bundled_configs_have_the_published_widths():
    config = Idefics2Config(**paper_configs.idefics2_config())
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.patch_size, vision.image_size, vision.num_hidden_layers) == (1152, 14, 980, 27)
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (4096, 32, 8, 32003)
    assert config.image_token_id == 32001
    unet = paper_configs.sdxl_config("unet")
    assert unet["block_out_channels"] == [320, 640, 1280] and unet["cross_attention_dim"] == 2048
    assert unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"] == 1280


def test_processor_gives_the_paper_token_budgets(checkpoints):
    encoder_dir, _ = checkpoints
    processor = Idefics2Processor.from_pretrained(encoder_dir)
    # As published: the torchvision image processor, 64 perceiver latents, splitting on.
    assert isinstance(processor.image_processor, Idefics2ImageProcessor)
    assert processor.image_seq_len == 64 and processor.image_processor.do_image_splitting
    assert processor.image_token_id == 32001
    photo = Image.new("RGB", (300, 200), (90, 140, 30))
    for image_size, tokens in ((252, 324), (504, 1296)):
        configure_processor(processor, image_size)
        inputs = encoder_inputs(processor, [MultimodalPrompt(["a ", photo, " field"])])
        assert int((inputs["input_ids"] == 32001).sum()) == tokens
        assert tuple(inputs["pixel_values"].shape[-2:]) == (image_size, image_size)


@pytest.fixture(scope="module")
def trained(checkpoints):
    """setup_model on the real-width folders (paper profile, one adapter layer), one LoRA step."""
    encoder_dir, sdxl_dir = checkpoints
    config = load_train_config(overrides={
        "model_profile": "paper", "model_overrides.encoder": str(encoder_dir),
        "model_overrides.sdxl": str(sdxl_dir), "model_overrides.adapter_layers": "1",
        "image_size": "252", "max_images": "2", "resolution": "64", "batch_size": "2",
    })
    pipe, model = setup_model(config)
    pipe.set_progress_bar_config(disable=True)
    optimizer = build_optimizer(model, config)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()
                if n.endswith(("lora_B.default.weight", "adapter.proj_in.weight", "text_model.embed_tokens.weight"))}

    photo = Image.new("RGB", (120, 90), (200, 40, 40))
    prompts = [MultimodalPrompt(["a ", photo, " car"]), MultimodalPrompt()]  # one dropped (CFG) prompt
    inputs = encoder_inputs(pipe.processor, prompts)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([10, 900])
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32).repeat(2, 1)
    loss = torch.nn.functional.mse_loss(model(inputs, noisy, timesteps, time_ids), noise)
    loss.backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()
             if p.requires_grad}
    optimizer.step()
    return pipe, model, inputs, loss, grads, snapshot


def test_lora_training_step_at_real_widths(trained):
    pipe, model, inputs, loss, grads, snapshot = trained
    assert torch.isfinite(loss)
    assert int((inputs["input_ids"] == 32001).sum()) == 324
    # Table 1: ViT frozen; connector, LM and UNet LoRA; adapter fully trained.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.vision_model.") for n in trainable)
    for prefix in ("encoder.connector.", "encoder.text_model.", "unet."):
        assert any(n.startswith(prefix) and "lora_" in n for n in trainable), prefix
        assert all("lora_" in n for n in trainable if n.startswith(prefix)), prefix
    # B starts at zero, so only B (and the adapter) has a gradient at the first step.
    assert all(grads[n] for n in trainable if "lora_B" in n or n.startswith("adapter."))
    changed = {n: not torch.equal(before, dict(model.named_parameters())[n]) for n, before in snapshot.items()}
    assert changed["encoder.text_model.embed_tokens.weight"] is False  # frozen base weight
    assert changed["adapter.proj_in.weight"]
    assert all(v for n, v in changed.items() if "lora_B" in n)
    assert model.encoder.text_model.embed_tokens.weight.shape == (32003, 4096)
    assert model.adapter.proj_out.out_features == 2048 and model.adapter.proj_pooled.out_features == 1280


def test_two_step_sampling_at_real_widths(trained):
    pipe = trained[0]
    photo = Image.new("RGB", (80, 80), (30, 60, 200))
    image = pipe(MultimodalPrompt(["a ", photo, " bird"]), height=64, width=64, num_inference_steps=2,
                 guidance_scale=6.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
