"""The Idefics2 encoder without perceiver: token budgets and loading real-format checkpoints."""

import torch
from safetensors.torch import load_file
from transformers import Idefics2ForConditionalGeneration, Idefics2Processor

from mumu_model.build import build_encoder, build_processor
from mumu_model.encoder import MUMUEncoder, PerceiverBypass, configure_processor, encoder_inputs
from mumu_model.prompt import MultimodalPrompt


def _image_token_counts(processor, inputs):
    return (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()


def test_tokens_per_image_follow_the_resolution(red_square):
    for image_size, budget in [(28, 4), (252, 324), (504, 1296)]:
        processor = configure_processor(build_processor(28), image_size)
        prompts = [MultimodalPrompt(["a ", red_square, " and ", red_square, " dog"]), MultimodalPrompt()]
        inputs = encoder_inputs(processor, prompts)
        assert _image_token_counts(processor, inputs) == [2 * budget, 0]
        assert inputs["pixel_values"].shape[-2:] == (image_size, image_size)


def test_every_patch_reaches_the_language_model(red_square):
    processor = build_processor(56)  # 4x4 patches
    encoder = build_encoder(processor, 56).eval()
    inputs = encoder_inputs(processor, [MultimodalPrompt([red_square, " dog"])])
    with torch.no_grad():
        out = encoder(**inputs)
    assert out.image_hidden_states.shape[0] == 16  # no pooling to a fixed 64/whatever
    assert out.last_hidden_state.shape[1] == inputs["input_ids"].shape[1]


def test_full_idefics2_checkpoint_loads_without_perceiver(tmp_path, red_square):
    """A real Idefics2 checkpoint (perceiver, LM head, `model.` prefix) loads into MUMUEncoder."""
    processor = build_processor(28)
    torch.manual_seed(0)
    full = Idefics2ForConditionalGeneration(build_encoder(processor, 28).config).eval()
    full.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any("perceiver_resampler" in k for k in saved)

    encoder = MUMUEncoder.from_pretrained(tmp_path).eval()
    assert isinstance(encoder.connector.perceiver_resampler, PerceiverBypass)
    reference = full.model.state_dict()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, reference[name]), name

    # The processor of such a checkpoint is reconfigured to one image, full token budget.
    loaded = configure_processor(Idefics2Processor.from_pretrained(tmp_path), 28)
    inputs = encoder_inputs(loaded, [MultimodalPrompt(["a ", red_square])])
    with torch.no_grad():
        hidden = encoder(**inputs).last_hidden_state
    assert torch.isfinite(hidden).all()


def test_saved_encoder_keeps_only_the_perceivers_final_norm(tiny_pipeline_dir):
    weights = load_file(tiny_pipeline_dir / "encoder" / "model.safetensors")
    assert [k for k in weights if "perceiver" in k] == ["connector.perceiver_resampler.norm.weight"]


def test_the_checkpoints_perceiver_norm_scales_the_image_tokens(tmp_path, red_square):
    """The trained norm of a full Idefics2 checkpoint loads into the bypass and sets the scale at
    which image tokens enter the language model."""
    processor = build_processor(28)
    config = build_encoder(processor, 28).config
    full = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        full.model.connector.perceiver_resampler.norm.weight.fill_(0.5)
    full.save_pretrained(tmp_path)
    encoder = MUMUEncoder.from_pretrained(tmp_path).eval()
    assert torch.equal(encoder.connector.perceiver_resampler.norm.weight, torch.full((64,), 0.5))

    inputs = encoder_inputs(processor, [MultimodalPrompt(["a ", red_square, " dog"])])
    with torch.no_grad():
        image_tokens = encoder(**inputs).image_hidden_states
        encoder.connector.perceiver_resampler.norm.weight.fill_(0.25)
        assert torch.allclose(encoder(**inputs).image_hidden_states * 2, image_tokens)


def test_a_fresh_encoder_feeds_image_and_text_tokens_on_one_scale(red_square):
    processor = build_processor(28)
    torch.manual_seed(0)
    encoder = build_encoder(processor, 28).eval()
    inputs = encoder_inputs(processor, [MultimodalPrompt(["a ", red_square, " dog and a cat"])])
    with torch.no_grad():
        image_rms = encoder(**inputs).image_hidden_states.pow(2).mean().sqrt()
        text_ids = inputs["input_ids"][inputs["input_ids"] != processor.image_token_id]
        text_rms = encoder.get_input_embeddings()(text_ids).pow(2).mean().sqrt()
    assert 0.5 < image_rms / text_rms < 2.0
    # Without the norm the connector's raw output is far smaller: the flaw the norm removes.
    torch.manual_seed(0)
    raw = build_encoder(processor, 28, image_token_norm=False).eval()
    with torch.no_grad():
        assert raw(**inputs).image_hidden_states.pow(2).mean().sqrt() < image_rms / 4


def test_an_encoder_saved_without_the_norm_loads_as_it_was(tmp_path, red_square):
    """Pipelines saved before the norm existed have no `image_token_norm` in their config."""
    processor = build_processor(28)
    torch.manual_seed(0)
    old = build_encoder(processor, 28, image_token_norm=False).eval()
    old.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"image_token_norm": false,', ""))
    assert "image_token_norm" not in (tmp_path / "config.json").read_text()
    loaded = MUMUEncoder.from_pretrained(tmp_path).eval()
    assert loaded.connector.perceiver_resampler.norm is None
    inputs = encoder_inputs(processor, [MultimodalPrompt(["a ", red_square])])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, old(**inputs).last_hidden_state)


def test_reserved_tokens_in_text_are_refused():
    import pytest

    from mumu_model.prompt import PromptError

    processor = build_processor(28)
    with pytest.raises(PromptError, match="reserved token"):
        encoder_inputs(processor, [MultimodalPrompt(["a <image> dog"])])
