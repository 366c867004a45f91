"""MUMUPipeline with tiny models built from config and loaded through from_pretrained(path)."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from mumu_model import MUMUPipeline, MultimodalPrompt, PromptError
from mumu_model.build import build_pipeline
from mumu_model.config import load_model_config

from .conftest import seeded


def _generate(pipe, prompt, steps=4, seed=0, **kwargs):
    return pipe(prompt, num_inference_steps=steps, generator=seeded(seed), output_type="np", **kwargs).images


def test_generates_pil_images_of_native_size(pipe, red_square):
    images = pipe(MultimodalPrompt(["a ", red_square, " circle"]), num_inference_steps=2).images
    assert len(images) == 1 and isinstance(images[0], Image.Image)
    assert images[0].size == (pipe.default_sample_size, pipe.default_sample_size)


def test_same_seed_same_image_other_seed_other_image(pipe, red_square):
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    first, again, other = (_generate(pipe, prompt, seed=s) for s in (0, 0, 1))
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_save_load_gives_identical_image(pipe, tmp_path, red_square):
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    before = _generate(pipe, prompt)
    pipe.save_pretrained(tmp_path / "copy")
    reloaded = MUMUPipeline.from_pretrained(tmp_path / "copy")
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(before, _generate(reloaded, prompt))
    assert reloaded.config.max_images == pipe.config.max_images
    assert reloaded.tokens_per_image == pipe.tokens_per_image == 4


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_encoder_runs_once_per_call_whatever_the_steps(pipe, red_square, steps, guidance):
    calls = {"encoder": 0, "unet": 0}
    pipe.encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    pipe.unet.register_forward_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1))
    pipe([MultimodalPrompt(["a ", red_square]), "a dog"], num_inference_steps=steps, guidance_scale=guidance,
         output_type="latent")
    # Guidance batches the conditional and unconditional branches into ONE UNet call per step.
    assert calls == {"encoder": 1, "unet": steps}


def test_unconditional_branch_is_the_empty_prompt(pipe, red_square):
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    default = _generate(pipe, prompt, guidance_scale=6.0)
    explicit = _generate(pipe, prompt, guidance_scale=6.0, negative_prompt="")
    assert np.array_equal(default, explicit)
    other = _generate(pipe, prompt, guidance_scale=6.0, negative_prompt="a square")
    assert not np.allclose(default, other)


def test_a_prompt_is_unaffected_by_its_batch(pipe, red_square):
    """Padding is masked: a short prompt gives the same image alone or beside a long one."""
    short = MultimodalPrompt(["a dog"])
    long = MultimodalPrompt(["a ", red_square, " and a ", red_square, " on stripes, cartoon style"])
    alone = _generate(pipe, short)
    generators = [seeded(0), seeded(0)]
    batched = pipe([short, long], num_inference_steps=4, generator=generators, output_type="np").images
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)


def test_batches_text_form_and_images_per_prompt(pipe, red_square, tmp_path):
    red_square.save(tmp_path / "red.png")
    images = pipe(
        ["a <img:red.png> circle", ["a ", red_square], ""],
        num_inference_steps=2,
        num_images_per_prompt=2,
        image_root=tmp_path,
        output_type="pt",
    ).images
    assert images.shape == (6, 3, pipe.default_sample_size, pipe.default_sample_size)


def test_python_form_list_is_one_prompt(pipe, red_square):
    assert len(pipe.to_prompts(["a ", red_square, " dog"])) == 1
    assert len(pipe.to_prompts(["a dog", "a cat"])) == 2


def test_any_diffusers_scheduler_swaps_in(pipe, red_square):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = _generate(pipe, MultimodalPrompt(["a ", red_square]), steps=3)
    assert np.isfinite(images).all()


def test_custom_size(pipe):
    assert _generate(pipe, "a dog", height=32, width=96).shape == (1, 32, 96, 3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(height=30), ValueError, "multiples of 4"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(output_type="jpeg"), ValueError, "output_type"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(negative_prompt=["a", "b"]), ValueError, "negative prompts"),
    ],
)
def test_bad_arguments(pipe, kwargs, error, message):
    kwargs.setdefault("num_inference_steps", 1)
    with pytest.raises(error, match=message):
        pipe("a dog", **kwargs)


def test_bad_prompts(pipe, red_square):
    with pytest.raises(PromptError, match="at most 4"):
        pipe(MultimodalPrompt([red_square] * 5, max_images=None), num_inference_steps=1)
    with pytest.raises(PromptError, match="batch is empty"):
        pipe([], num_inference_steps=1)
    with pytest.raises(PromptError):
        pipe(42, num_inference_steps=1)
    with pytest.raises(PromptError, match="position 2"):
        pipe("a <img:missing.png>", num_inference_steps=1)


def test_paper_profile_loads_checkpoints_from_paths(tmp_path, tiny_pipeline_dir, red_square):
    """The `paper` profile's code path: every part from_pretrained from a local folder."""
    tiny = MUMUPipeline.from_pretrained(tiny_pipeline_dir)
    tiny.encoder.save_pretrained(tmp_path / "idefics2")
    tiny.processor.save_pretrained(tmp_path / "idefics2")
    for name in ("unet", "vae", "scheduler"):
        getattr(tiny, name).save_pretrained(tmp_path / "sdxl" / name)
    config = load_model_config(
        "paper",
        {"encoder": str(tmp_path / "idefics2"), "sdxl": str(tmp_path / "sdxl"), "image_size": 56,
         "adapter_layers": 1, "adapter_width": 32, "adapter_heads": 2, "dtype": "float32"},
    )
    pipe = build_pipeline(config)
    assert pipe.tokens_per_image == 16
    assert torch.equal(pipe.unet.conv_in.weight, tiny.unet.conv_in.weight)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(_generate(pipe, MultimodalPrompt([red_square, " dog"]), steps=2)).all()


def test_decoding_inverts_the_training_latents_of_a_shifted_vae(pipe):
    from mumu_model.training.data import vae_latents

    pipe.vae.register_to_config(scaling_factor=0.5, shift_factor=0.3)  # as SD3 and Flux VAEs have
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
        decoded = pipe._decode(vae_latents(pipe.vae, pixels))
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


def test_v_prediction_profile_builds_a_v_prediction_scheduler():
    config = load_model_config("toy")
    assert config.prediction_type == "v_prediction"
    assert build_pipeline(config).scheduler.config.prediction_type == "v_prediction"
    assert build_pipeline(load_model_config("tiny")).scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type must be epsilon or v_prediction, got 'sample'"):
        load_model_config("tiny", {"prediction_type": "sample"})
