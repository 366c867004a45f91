"""MUMUPipeline's diffusers SDXL call options, each checked against its definition in diffusers.

Tiny pipelines built from config and loaded through from_pretrained(path) (tests/conftest.py).
The reference for the loop options is diffusers' SDXL denoising loop written out below.
"""

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, SDXLCFGCutoffCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from mumu_model import MUMUPipeline, MultimodalPrompt
from mumu_model.lora import add_unet_lora
from mumu_model.pipeline import concat_conditioning

from .conftest import seeded


@pytest.fixture
def prompt(red_square):
    return MultimodalPrompt(["a ", red_square, " circle"])


def _latents(pipe, batch=1, seed=0):
    side = pipe.default_sample_size // pipe.vae_scale_factor
    return randn_tensor((batch, pipe.unet.config.in_channels, side, side), generator=seeded(seed))


def _count_calls(*modules) -> list[int]:
    counts = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


@torch.no_grad()
def _reference(pipe, cond, latents, steps, guidance=6.0, rescale=0.0, cutoff=None, on_step=None):
    """diffusers SDXL's loop on one prompt: CFG against the empty prompt (unconditional first),
    `rescale_noise_cfg` when `rescale` > 0, guidance off after step `cutoff` (SDXLCFGCutoffCallback),
    and `on_step(i, latents, prompt_embeds) -> (latents, prompt_embeds)` after each scheduler step."""
    embeds, pooled, mask = concat_conditioning(pipe.encode_prompt(""), cond)
    size = pipe.default_sample_size
    time_ids = pipe._add_time_ids(size, size, 2, embeds.dtype, "cpu")
    pipe.scheduler.set_timesteps(steps)
    latents = latents * pipe.scheduler.init_noise_sigma
    for i, t in enumerate(pipe.scheduler.timesteps):
        guided = guidance > 1 and (cutoff is None or i <= cutoff)
        rows = slice(None) if guided else slice(1, None)  # the conditional row alone
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        noise = pipe.unet(model_input, t, encoder_hidden_states=embeds[rows], encoder_attention_mask=mask[rows],
                          added_cond_kwargs={"text_embeds": pooled[rows], "time_ids": time_ids[rows]}).sample
        if guided:
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_text - noise_uncond)
            if rescale > 0:
                noise = rescale_noise_cfg(noise, noise_text, guidance_rescale=rescale)
        latents = pipe.scheduler.step(noise, t, latents).prev_sample
        if on_step is not None:
            latents, embeds = on_step(i, latents, embeds)
    return latents


def _sample(pipe, prompt=None, steps=3, **kwargs):
    return pipe(prompt, num_inference_steps=steps, output_type="latent", **kwargs).images


# -- encode_prompt and prompt_embeds ----------------------------------------------------------------


def test_encode_prompt_returns_the_documented_shapes(pipe, red_square):
    short, long = MultimodalPrompt(["a dog"]), MultimodalPrompt(["a ", red_square, " and a ", red_square])
    embeds, pooled, mask = pipe.encode_prompt([short, long])
    batch, length, dim = embeds.shape
    assert (batch, dim) == (2, pipe.unet.config.cross_attention_dim)
    assert pooled.shape[0] == 2 and pooled.ndim == 2
    assert mask.shape == (2, length) and mask.dtype == torch.long
    assert mask[1].all() and length > 2 * pipe.tokens_per_image  # the long prompt: no padding
    assert 0 < mask[0].sum() < length and not mask[0, mask[0].sum():].any()  # the short one: right-padded
    # Any prompt form the call takes; the Python form of one prompt is one row.
    assert pipe.encode_prompt(["a ", red_square])[0].shape[0] == 1


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_embeds_from_encode_prompt_give_the_prompts_images(pipe, red_square, guidance):
    """One encoding reused across seeds gives what the prompts give, padded batch included."""
    prompts = [MultimodalPrompt(["a dog"]), MultimodalPrompt(["a ", red_square, " on stripes"])]
    embeds, pooled, mask = pipe.encode_prompt(prompts)
    for seed in (0, 1):
        common = dict(num_inference_steps=3, guidance_scale=guidance, num_images_per_prompt=2, output_type="np")
        expected = pipe(prompts, generator=[seeded(seed + i) for i in range(4)], **common).images
        given = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
                     generator=[seeded(seed + i) for i in range(4)], **common).images
        assert np.array_equal(given, expected)


def test_negative_embeds_give_the_negative_prompts_images(pipe, prompt, red_square):
    negative = MultimodalPrompt(["a ", red_square, " blurry, ugly"])
    expected = _sample(pipe, prompt, negative_prompt=negative, generator=seeded(0))
    neg, neg_pooled, neg_mask = pipe.encode_prompt(negative)
    for prompt_kwargs in (dict(prompt=prompt), dict(zip(("prompt_embeds", "pooled_prompt_embeds"),
                                                         pipe.encode_prompt(prompt)))):
        given = _sample(pipe, negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                        negative_prompt_attention_mask=neg_mask, generator=seeded(0), **prompt_kwargs)
        assert torch.equal(given, expected)
    assert not torch.allclose(expected, _sample(pipe, prompt, generator=seeded(0)))


def test_given_embeds_are_not_encoded_again(pipe, prompt):
    embeds, pooled, _ = pipe.encode_prompt(prompt)
    neg = pipe.encode_prompt("")
    calls = _count_calls(pipe.encoder, pipe.adapter)
    _sample(pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg[0],
            negative_pooled_prompt_embeds=neg[1])
    assert calls == [0, 0]
    _sample(pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert calls == [1, 1]  # the empty prompt, once; then cached
    _sample(pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert calls == [1, 1]


# Each case: the call's arguments, from the encoding (embeds, pooled, mask) of "a dog".
EMBEDS_MISTAKES = {
    "prompt and prompt_embeds": (lambda e, p, m: dict(prompt="a dog", prompt_embeds=e, pooled_prompt_embeds=p),
                                 "either prompt or prompt_embeds"),
    "neither": (lambda e, p, m: dict(), "pass prompt or prompt_embeds"),
    "no pooled": (lambda e, p, m: dict(prompt_embeds=e), "pooled_prompt_embeds is required with prompt_embeds"),
    "pooled alone": (lambda e, p, m: dict(prompt="a dog", pooled_prompt_embeds=p),
                     "pooled_prompt_embeds given without prompt_embeds"),
    "negative twice": (lambda e, p, m: dict(prompt="a dog", negative_prompt="x", negative_prompt_embeds=e,
                                            negative_pooled_prompt_embeds=p), "either negative_prompt or"),
    "no negative pooled": (lambda e, p, m: dict(prompt="a dog", negative_prompt_embeds=e),
                           "negative_pooled_prompt_embeds is required"),
    "short mask": (lambda e, p, m: dict(prompt_embeds=e, pooled_prompt_embeds=p, prompt_attention_mask=m[:, :-1]),
                   "prompt_attention_mask must be"),
    "2-d embeds": (lambda e, p, m: dict(prompt_embeds=e[0], pooled_prompt_embeds=p), r"must be \[batch, tokens"),
    "negative rows": (lambda e, p, m: dict(prompt="a dog", negative_prompt_embeds=torch.cat([e, e]),
                                           negative_pooled_prompt_embeds=torch.cat([p, p])), "2 rows for 1 prompts"),
}


@pytest.mark.parametrize("case", list(EMBEDS_MISTAKES))
def test_embeds_arguments_are_checked(pipe, case):
    arguments, message = EMBEDS_MISTAKES[case]
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=1, output_type="latent", **arguments(*pipe.encode_prompt("a dog")))


# -- latents -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_given_latents_are_the_initial_noise(pipe, prompt, scheduler):
    if scheduler == "euler":  # init_noise_sigma != 1: given latents are scaled by it too
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = _latents(pipe)
    first, again = (_sample(pipe, prompt, latents=latents) for _ in range(2))
    assert torch.equal(first, again)
    assert torch.equal(first, _sample(pipe, prompt, generator=seeded(0)))  # the noise seed 0 draws
    assert not torch.allclose(first, _sample(pipe, prompt, latents=_latents(pipe, seed=1)))
    assert torch.equal(latents, _latents(pipe))  # the caller's tensor is left as it was


def test_latents_of_the_wrong_shape_are_refused(pipe):
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4"):
        pipe("a dog", num_images_per_prompt=2, latents=_latents(pipe), num_inference_steps=1)


# -- callback_on_step_end ---------------------------------------------------------------------------


def test_callback_is_called_once_per_step_with_the_requested_tensors(pipe, prompt):
    calls = []

    def callback(pipeline, i, t, tensors):
        calls.append((i, int(t), {name: tuple(value.shape) for name, value in tensors.items()}))
        assert pipeline is pipe and pipeline.num_timesteps == 4
        return {}

    requested = ["latents", "prompt_embeds", "add_time_ids"]
    _sample(pipe, prompt, steps=4, generator=seeded(0), callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=requested)
    length = pipe.encode_prompt(prompt)[0].shape[1]
    latent_shape = tuple(_latents(pipe).shape)
    assert [i for i, _, _ in calls] == [0, 1, 2, 3]
    assert [t for _, t, _ in calls] == pipe.scheduler.timesteps.tolist()
    for _, _, shapes in calls:  # both guidance branches, unconditional first, as in diffusers
        assert shapes == {"latents": latent_shape, "prompt_embeds": (2, length, pipe.unet.config.cross_attention_dim),
                          "add_time_ids": (2, 6)}


def test_callback_replacing_latents_and_prompt_embeds_matches_the_manual_loop(pipe, prompt, red_square):
    cond = pipe.encode_prompt(prompt)
    other = concat_conditioning(pipe.encode_prompt(""), pipe.encode_prompt(["a ", red_square, " square"]))[0]

    def change(i, latents, embeds):  # after step 1: halve the latents; after step 2: another prompt
        return (latents * 0.5 if i == 1 else latents), (other if i == 2 else embeds)

    def callback(pipeline, i, t, tensors):
        latents, embeds = change(i, tensors["latents"], tensors["prompt_embeds"])
        return {"latents": latents, "prompt_embeds": embeds}

    latents = _latents(pipe)
    given = _sample(pipe, prompt, steps=4, latents=latents, callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    expected = _reference(pipe, cond, latents, steps=4, on_step=change)
    torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(given, _sample(pipe, prompt, steps=4, latents=latents))


def test_callback_tensor_inputs_are_checked(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs must be in"):
        pipe("a dog", num_inference_steps=1, callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["noise_pred"])
    with pytest.raises(TypeError, match="must return a dict"):
        pipe("a dog", num_inference_steps=1, callback_on_step_end=lambda *a: None)


def test_diffusers_cfg_cutoff_callback(pipe, prompt):
    """diffusers' SDXLCFGCutoffCallback turns guidance off after its step, as in SDXL's loop."""
    latents = _latents(pipe)
    expected = _reference(pipe, pipe.encode_prompt(prompt), latents, steps=4, cutoff=2)
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)  # int(num_timesteps * 0.5): after step 2
    for callback in (cutoff, MultiPipelineCallbacks([cutoff])):
        given = _sample(pipe, prompt, steps=4, latents=latents, callback_on_step_end=callback)
        torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-6)
    assert pipe.guidance_scale == 0.0

    def off_after_step_2(pipeline, i, t, tensors):  # guidance off, conditioning left with both branches
        if i == 2:
            pipeline._guidance_scale = 0.0
        return {}

    given = _sample(pipe, prompt, steps=4, latents=latents, callback_on_step_end=off_after_step_2)
    torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(given, _sample(pipe, prompt, steps=4, latents=latents))


# -- guidance_rescale and guidance_scale -------------------------------------------------------------


def test_guidance_rescale_is_diffusers_rescale_noise_cfg(pipe, prompt):
    latents = _latents(pipe)
    default = _sample(pipe, prompt, steps=1, latents=latents)
    assert torch.equal(_sample(pipe, prompt, steps=1, latents=latents, guidance_rescale=0.0), default)
    rescaled = _sample(pipe, prompt, steps=1, latents=latents, guidance_rescale=0.7)
    expected = _reference(pipe, pipe.encode_prompt(prompt), latents, steps=1, rescale=0.7)
    torch.testing.assert_close(rescaled, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rescaled, default)
    # As in diffusers, it only acts on guided predictions.
    unguided = dict(steps=1, latents=latents, guidance_scale=1.0)
    assert torch.equal(_sample(pipe, prompt, guidance_rescale=0.7, **unguided), _sample(pipe, prompt, **unguided))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be >= 0"),
        (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    ],
)
def test_bad_guidance_is_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a dog", num_inference_steps=1, **kwargs)


# -- cross_attention_kwargs: the LoRA scale ----------------------------------------------------------


def test_lora_scale_zero_gives_the_base_unet(pipe, tiny_pipeline_dir, prompt):
    lora_pipe = MUMUPipeline.from_pretrained(tiny_pipeline_dir)
    lora_pipe.set_progress_bar_config(disable=True)
    add_unet_lora(lora_pipe.unet, rank=2)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained LoRA: B != 0 (peft starts it at 0)
        for name, param in lora_pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    latents = _latents(pipe)
    base = _sample(pipe, prompt, latents=latents)
    with_lora = _sample(lora_pipe, prompt, latents=latents)
    assert not torch.allclose(with_lora, base)
    torch.testing.assert_close(_sample(lora_pipe, prompt, latents=latents, cross_attention_kwargs={"scale": 0.0}),
                               base, rtol=1e-5, atol=1e-6)
    half = _sample(lora_pipe, prompt, latents=latents, cross_attention_kwargs={"scale": 0.5})
    assert not torch.allclose(half, base) and not torch.allclose(half, with_lora)
    # The scale holds for one call only (diffusers unscales the layers after the UNet's forward).
    assert torch.equal(_sample(lora_pipe, prompt, latents=latents), with_lora)
