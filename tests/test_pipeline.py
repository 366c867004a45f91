"""MUMUPipeline with tiny models built from config and loaded through from_pretrained(path)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from mumu_model import MUMUPipeline, MultimodalPrompt, PromptError
from mumu_model.build import build_pipeline
from mumu_model.config import load_model_config
from mumu_model.encoder import configure_processor, encoder_inputs
from mumu_model.pipeline import concat_conditioning, encode_inputs
from mumu_model.training.ema import EMA

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


def _count_calls(*modules) -> list[int]:
    """Forward calls of each module, counted from now."""
    counts = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_encoder_cost_does_not_grow_with_the_steps(pipe, red_square, steps, guidance):
    calls = _count_calls(pipe.encoder, pipe.unet)
    for expected_encoder_calls in ([2, 1] if guidance > 1 else [1, 1]):
        calls[:] = [0, 0]
        pipe([MultimodalPrompt(["a ", red_square]), "a dog"], num_inference_steps=steps, guidance_scale=guidance,
             output_type="latent")
        # Guidance batches the conditional and unconditional branches into ONE UNet call per step.
        # The empty prompt is encoded apart on the first call, then comes from the cache.
        assert calls == [expected_encoder_calls, steps]


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


# -- the unconditional branch: encoded at its own length --------------------------------------------


def _joint_conditioning(pipe, prompts, negatives):
    """The reference: the unconditional branch encoded in ONE batch with the prompts, so padded
    to their length (how the pipeline encoded it before it encoded the branch apart)."""
    batch = len(prompts)
    negatives = negatives or [MultimodalPrompt()]
    if len(negatives) == 1:
        negatives = negatives * batch
    embeds, pooled, mask = pipe.encode_prompt(prompts + negatives)
    order = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])  # unconditional first
    return embeds[order], pooled[order], mask[order]


def _guided_noise(pipe, latents, conditioning, guidance_scale=6.0):
    embeds, pooled, mask = conditioning
    time_ids = pipe._add_time_ids(64, 64, embeds.shape[0], embeds.dtype, "cpu")
    noise = pipe.unet(torch.cat([latents] * 2), 500, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    uncond, cond = noise.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _guidance_cases(red_square):
    blue = Image.new("RGB", (30, 30), (20, 20, 220))
    return {
        "one prompt": (MultimodalPrompt(["a ", red_square, " circle"]), None),
        "prompts of two lengths": (
            [MultimodalPrompt(["a dog"]), MultimodalPrompt(["a ", red_square, " and ", blue])], None),
        "negative longer than the prompt": ("a dog", MultimodalPrompt(["a ", red_square, " ", blue, " blurry, ugly"])),
        "a negative per prompt": (
            [MultimodalPrompt(["a ", red_square]), "a cat"], ["blurry", MultimodalPrompt([blue])]),
    }


@pytest.mark.parametrize("case", ["one prompt", "prompts of two lengths", "negative longer than the prompt",
                                  "a negative per prompt"])
def test_unconditional_branch_apart_matches_encoding_it_with_the_prompts(pipe, red_square, monkeypatch, case):
    prompt, negative = _guidance_cases(red_square)[case]
    prompts = pipe.to_prompts(prompt)
    negatives = None if negative is None else pipe.to_prompts(negative)
    batch = len(prompts)

    with torch.no_grad():
        apart = pipe._guidance_conditioning(prompts, negatives)
        joint = _joint_conditioning(pipe, prompts, negatives)
        # Same tokens, same embeddings on them; only the padding differs (masked in the UNet).
        length = min(apart[0].shape[1], joint[0].shape[1])
        for mask in (apart[2], joint[2]):
            assert not mask[:, length:].any()
        torch.testing.assert_close(apart[2][:, :length], joint[2][:, :length], rtol=0, atol=0)
        valid = apart[2][:, :length].bool()
        torch.testing.assert_close(apart[0][:, :length][valid], joint[0][:, :length][valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(apart[1], joint[1], rtol=1e-5, atol=1e-5)

        # The guided noise prediction of one UNet call, both ways.
        latents = torch.randn(batch, pipe.unet.config.in_channels, 8, 8, generator=seeded(0))
        torch.testing.assert_close(_guided_noise(pipe, latents, apart), _guided_noise(pipe, latents, joint),
                                   rtol=1e-5, atol=1e-5)

    # And whole calls: the same latents as the same denoising loop fed the joint encoding.
    def sample():
        generators = [seeded(i) for i in range(batch)]
        return pipe(prompt, negative_prompt=negative, num_inference_steps=4, generator=generators,
                    output_type="latent").images
    new = sample()
    monkeypatch.setattr(pipe, "_guidance_conditioning", lambda p, n: _joint_conditioning(pipe, p, n))
    reference = sample()
    torch.testing.assert_close(new, reference, rtol=1e-5, atol=1e-4)


def test_unconditional_branch_is_encoded_at_its_own_length(pipe, red_square):
    lengths, unet_inputs = [], []
    pipe.encoder.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    pipe.unet.register_forward_pre_hook(lambda _, args, kwargs: unet_inputs.append(kwargs), with_kwargs=True)
    prompt = MultimodalPrompt(["a ", red_square, " and a ", red_square, " on stripes"])
    pipe([prompt, prompt], num_inference_steps=1, output_type="latent")

    (prompts, prompt_length), (empty, empty_length) = lengths
    assert prompts == 2 and empty == 1  # the empty prompt: once, shared by the batch
    assert empty_length <= 2 < 2 * pipe.tokens_per_image < prompt_length  # its own tokens (BOS), no padding
    # The UNet gets one batch: the unconditional branch zero-padded to the prompts' length, masked.
    embeds, mask = unet_inputs[0]["encoder_hidden_states"], unet_inputs[0]["encoder_attention_mask"]
    assert embeds.shape[:2] == mask.shape == (4, prompt_length)
    assert mask[:2, empty_length:].sum() == 0 and (embeds[:2, empty_length:] == 0).all()
    assert mask[2:].all()


def test_concat_conditioning_pads_the_shorter_batch():
    short = (torch.ones(1, 2, 3), torch.ones(1, 5), torch.ones(1, 2, dtype=torch.long))
    long = (torch.full((2, 4, 3), 2.0), torch.full((2, 5), 2.0), torch.ones(2, 4, dtype=torch.long))
    embeds, pooled, mask = concat_conditioning(short, long)
    assert embeds.shape == (3, 4, 3) and pooled.shape == (3, 5) and mask.dtype == torch.long
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert (embeds[0, 2:] == 0).all() and (embeds[0, :2] == 1).all() and (embeds[1:] == 2).all()


# -- the empty prompt's cached encoding -------------------------------------------------------------


def test_empty_prompt_encoding_is_cached_between_calls(pipe, red_square):
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    calls = _count_calls(pipe.encoder)
    first = _generate(pipe, prompt)
    assert calls == [2] and pipe._empty_prompt_cache is not None
    assert np.array_equal(_generate(pipe, prompt), first) and calls == [3]  # served from the cache
    assert np.array_equal(_generate(pipe, prompt, negative_prompt=""), first) and calls == [4]
    pipe.clear_prompt_cache()
    assert pipe._empty_prompt_cache is None
    assert np.array_equal(_generate(pipe, prompt), first) and calls == [6]


def _perturb_adapter(pipe):
    pipe.adapter.load_state_dict({k: v + 0.05 for k, v in pipe.adapter.state_dict().items()})


def _replace_adapter(pipe):
    adapter = copy.deepcopy(pipe.adapter)
    with torch.no_grad():
        adapter.proj_pooled.bias.add_(0.5)
    pipe.register_modules(adapter=adapter)


@pytest.mark.parametrize(
    "change",
    [
        _perturb_adapter,
        _replace_adapter,
        lambda pipe: configure_processor(pipe.processor, 56),
        lambda pipe: pipe.to(torch.float64),
    ],
    ids=["weights loaded in place", "adapter replaced", "processor image size", "dtype"],
)
def test_cached_empty_prompt_is_recomputed_after_a_change(pipe, red_square, change):
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    _generate(pipe, prompt)
    change(pipe)
    calls = _count_calls(pipe.encoder)
    after = _generate(pipe, prompt)
    assert calls == [2]  # prompts and the empty prompt: the cache missed
    pipe.clear_prompt_cache()
    assert np.array_equal(_generate(pipe, prompt), after)


def test_validation_between_training_steps_is_never_served_a_stale_encoding(pipe, red_square):
    """As the trainer validates: eval + no_grad between training steps that change the weights.
    A fused optimizer does not bump the weights' version counters; the training forward (train
    mode, autograd on) is what drops the cache."""
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    optimizer = torch.optim.AdamW(pipe.adapter.parameters(), lr=0.05, fused=True)
    pipe.encoder.requires_grad_(False)
    previous = _generate(pipe, prompt)
    for _ in range(2):
        pipe.encoder.train(), pipe.adapter.train()
        inputs = encoder_inputs(pipe.processor, [MultimodalPrompt()])
        embeds, pooled, _ = encode_inputs(pipe.encoder, pipe.adapter, inputs, "cpu")
        (embeds.square().mean() + (pooled - 1).square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert pipe._empty_prompt_cache is None
        pipe.encoder.eval(), pipe.adapter.eval()

        validation = _generate(pipe, prompt)
        pipe.clear_prompt_cache()
        assert np.array_equal(validation, _generate(pipe, prompt))
        assert not np.allclose(validation, previous)
        previous = validation


def test_ema_swap_recomputes_the_cached_empty_prompt(pipe, red_square):
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    ema = EMA(pipe.adapter.named_parameters(), decay=0.5)
    with torch.no_grad():
        for shadow in ema.shadows:
            shadow.add_(0.05)
    raw = _generate(pipe, prompt)
    with ema.swapped_in():
        swapped = _generate(pipe, prompt)
        pipe.clear_prompt_cache()
        assert np.array_equal(swapped, _generate(pipe, prompt))
    assert not np.allclose(swapped, raw)
    assert np.array_equal(_generate(pipe, prompt), raw)


def test_nothing_is_cached_in_training_mode(pipe, red_square):
    pipe.adapter.train()
    _generate(pipe, MultimodalPrompt(["a ", red_square]))
    assert pipe._empty_prompt_cache is None


# -- model CPU offload -------------------------------------------------------------------------------


def test_cpu_offload_sequence_names_every_model(pipe):
    models = {name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}
    sequence = pipe.model_cpu_offload_seq.split("->")
    assert sorted(sequence) == sorted(models) and len(sequence) == len(set(sequence))


def test_model_cpu_offload_gives_the_same_images(pipe, red_square):
    """accelerate's hooks installed on the CPU (no accelerator here): every model is hooked, in
    the sequence's order, each moved once per call, and the images do not change."""
    prompt, negative = MultimodalPrompt(["a ", red_square, " circle"]), "a square"
    expected = [_generate(pipe, prompt, negative_prompt=negative), _generate(pipe, prompt)]
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device.type == "cpu"
    for name in ("encoder", "adapter", "unet", "vae"):
        assert getattr(getattr(pipe, name), "_hf_hook", None) is not None, name
    order = []
    for name in ("encoder", "adapter", "unet"):
        getattr(pipe, name).register_forward_pre_hook(lambda *_, name=name: order.append(name))
    for _ in range(2):  # the hooks are re-armed at the end of each call
        order.clear()
        # Offloading copies the weights: CPU kernels round a one-token prompt differently on
        # differently aligned memory (~1e-6), so the images match closely rather than bit for bit.
        np.testing.assert_allclose(_generate(pipe, prompt, negative_prompt=negative), expected[0], atol=1e-5)
        assert order == ["encoder", "encoder", "adapter", "adapter"] + ["unet"] * 4
        np.testing.assert_allclose(_generate(pipe, prompt), expected[1], atol=1e-5)
