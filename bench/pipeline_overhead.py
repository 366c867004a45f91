"""Benchmark: MUMUPipeline's cost per call, in two cases measured in one run.

1. MUMU vs a plain StableDiffusionXLPipeline given precomputed embeddings (tiny profile).
   Both pipelines share the same UNet and VAE objects and run the same DDIM schedule (same
   config), steps, guidance, resolution and seed, so what the ratio measures is MUMU's own cost
   per call: the multimodal encoder + adapter pass (once per call) and MUMU's denoising loop
   (which also hands the UNet an `encoder_attention_mask`). SDXL gets, computed once outside
   the timed region, exactly the conditioning MUMU hands its UNet: the prompt and the empty
   prompt, the latter encoded apart and zero-padded to the prompt's length L. SDXL takes no
   mask (it sees the zero padding unmasked), so both UNets cross-attend over the same L tokens.

2. Paper token counts: the tiny architecture (reduced widths, so it runs on a CPU) with the
   paper's 252 px crops, 324 tokens per image, and a prompt of 4 images + 41 other tokens (1,337
   tokens). It measures the encoder's share of a call (its forward time inside the timed calls
   / the call's time) and what encoding the unconditional branch apart saves: the pipeline as
   it is (the empty prompt encoded apart, at its 1 token, and cached between calls) against the
   same pipeline with the empty prompt encoded in one batch with the prompt, so padded to its
   1,337 tokens (how MUMU encoded it before).

Timings alternate within one run (the order swapped every other round) so that drift in the
machine's speed hits the compared variants alike. Results are rewritten atomically to
bench/results/pipeline_overhead.json.

    python bench/pipeline_overhead.py [--steps 50] [--rounds N | --budget-s 50] [--paper-rounds 6]
        [--threads N] [--height H --width W] [--out bench/results/pipeline_overhead.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from mumu_model.atomic import write_bytes_atomic
from mumu_model.encoder import encoder_inputs
from mumu_model.pipeline import MUMUPipeline
from mumu_model.prompt import MultimodalPrompt
from mumu_model.testing import tiny_pipeline

TARGET_RATIO = 1.05
GUIDANCE = 6.0  # paper
SEED = 0
MIN_ROUNDS, MAX_ROUNDS = 3, 50
PAPER_IMAGE_SIZE = 252  # paper stage 1: 324 tokens per image
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pipeline_overhead.json"


def square(colour: str, size: int = 96) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def benchmark_prompt() -> list:
    """A multimodal prompt with two images inline (coloured squares)."""
    return ["a ", square("red"), " square and a ", square("blue"), " circle in a cubist style"]


def paper_prompt() -> MultimodalPrompt:
    """Four images inline, as many as the paper allows, and 41 other tokens (BOS and the image
    wrapper tokens included) with the tiny tokenizer: 4 x 324 + 41 = 1,337 tokens at 252 px."""
    return MultimodalPrompt([
        "a ", square("red"), " man and his ", square("blue"), " dog on a ", square("green"), " sofa in the ",
        square("yellow"), " style of an oil painting, warm light",
    ])


def summarize(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "mean_s": statistics.fmean(samples),
        "samples_s": samples,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def joint_conditioning(pipe: MUMUPipeline, prompts: list[MultimodalPrompt], negatives=None):
    """How MUMU conditioned guidance before it encoded the unconditional branch apart: the
    empty prompt in ONE batch with the prompts, so padded to their length. Unconditional first."""
    batch = len(prompts)
    embeds, pooled, mask = pipe.encode_prompt(prompts + [MultimodalPrompt()] * batch)
    order = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return embeds[order], pooled[order], mask[order]


def overhead_vs_sdxl(args, mumu: MUMUPipeline) -> dict:
    """Case 1: MUMU vs SDXL with precomputed embeddings, tiny profile."""
    height = args.height or mumu.default_sample_size
    width = args.width or mumu.default_sample_size
    sdxl = StableDiffusionXLPipeline(
        vae=mumu.vae,
        unet=mumu.unet,
        scheduler=DDIMScheduler.from_config(mumu.scheduler.config),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        add_watermarker=False,
    )
    sdxl.set_progress_bar_config(disable=True)

    prompt = benchmark_prompt()
    prompts = mumu.to_prompts(prompt)
    # The embeddings SDXL gets: what MUMU's __call__ hands its UNet (unconditional first).
    with torch.no_grad():
        embeds, pooled, mask = mumu._guidance_conditioning(prompts, None)
    sdxl_kwargs = dict(
        prompt_embeds=embeds[1:],
        negative_prompt_embeds=embeds[:1],
        pooled_prompt_embeds=pooled[1:],
        negative_pooled_prompt_embeds=pooled[:1],
    )
    common = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                  output_type="pil")

    def run_mumu():
        return mumu(prompt, generator=torch.Generator().manual_seed(SEED), **common).images

    def run_sdxl():
        return sdxl(generator=torch.Generator().manual_seed(SEED), **sdxl_kwargs, **common).images

    def run_conditioning():  # as in a call: the prompt encoded, the empty prompt from the cache
        with torch.no_grad():
            return mumu._guidance_conditioning(mumu.to_prompts(prompt), None)

    warmup = {"mumu": timed(run_mumu), "sdxl": timed(run_sdxl), "conditioning": timed(run_conditioning)}
    rounds = args.rounds or max(MIN_ROUNDS, min(MAX_ROUNDS, int(args.budget_s / (warmup["mumu"] + warmup["sdxl"]))))

    samples: dict[str, list[float]] = {"mumu": [], "sdxl": []}
    runners = {"mumu": run_mumu, "sdxl": run_sdxl}
    for round_index in range(rounds):
        order = ("mumu", "sdxl") if round_index % 2 == 0 else ("sdxl", "mumu")
        for name in order:
            samples[name].append(timed(runners[name]))
    conditioning_samples = [timed(run_conditioning) for _ in range(max(5, rounds))]

    results = {name: summarize(values) for name, values in samples.items()}
    ratio_median = results["mumu"]["median_s"] / results["sdxl"]["median_s"]
    # Each round's two calls ran back to back, so their ratio cancels slow drift best.
    ratio_paired = statistics.median(m / s for m, s in zip(samples["mumu"], samples["sdxl"]))
    conditioning_median = statistics.median(conditioning_samples)
    return {
        "description": (
            "MUMUPipeline vs StableDiffusionXLPipeline with precomputed embeddings; shared UNet/VAE, "
            "same DDIM config, steps, guidance, resolution and seed; timed alternately in one run."
        ),
        "profile": "tiny",
        "prompt": "a <red square> square and a <blue square> circle in a cubist style",
        "embedding_tokens": int(embeds.shape[1]),
        "image_tokens_per_image": int(mumu.tokens_per_image),
        "mumu": results["mumu"],
        "sdxl": results["sdxl"],
        "ratio_median": ratio_median,
        "ratio_min": results["mumu"]["min_s"] / results["sdxl"]["min_s"],
        "ratio_paired_median": ratio_paired,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio_median <= TARGET_RATIO,
        "conditioning": {
            "what": "processor + encoder + adapter as in a call: the prompt encoded, the empty prompt cached",
            "median_s": conditioning_median,
            "samples_s": conditioning_samples,
            "share_of_mumu_median": conditioning_median / results["mumu"]["median_s"],
        },
        "height": height,
        "width": width,
        "rounds": rounds,
        "rounds_auto": args.rounds == 0,
        "warmup_s": warmup,
    }


def paper_token_counts(args, tmp: Path) -> dict:
    """Case 2: the paper's token counts on the tiny architecture; unconditional branch apart vs padded."""
    pipe = MUMUPipeline.from_pretrained(tiny_pipeline(tmp / "paper-tokens", image_size=PAPER_IMAGE_SIZE))
    pipe.set_progress_bar_config(disable=True)
    prompt = paper_prompt()
    prompts = [prompt]
    prompt_tokens = int(encoder_inputs(pipe.processor, prompts)["input_ids"].shape[1])
    empty_tokens = int(encoder_inputs(pipe.processor, [MultimodalPrompt()])["input_ids"].shape[1])

    # The encoder's forward time inside the timed calls, from hooks on the encoder itself.
    encoder_spent: list[float] = []
    started: list[float] = []
    pipe.encoder.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    pipe.encoder.register_forward_hook(lambda *_: encoder_spent.append(time.perf_counter() - started.pop()))

    separate = pipe._guidance_conditioning  # the pipeline as it is

    def padded(p, n):
        return joint_conditioning(pipe, p, n)

    def call(variant):
        if variant == "uncond_padded":
            pipe._guidance_conditioning = padded  # the call's own loop, the old conditioning
        else:
            vars(pipe).pop("_guidance_conditioning", None)
        encoder_spent.clear()
        seconds = timed(lambda: pipe(prompt, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                     generator=torch.Generator().manual_seed(SEED), output_type="pil"))
        return seconds, sum(encoder_spent)

    def conditioning(variant):
        def run():
            with torch.no_grad():
                if variant == "uncond_separate_uncached":
                    pipe.clear_prompt_cache()
                (padded if variant == "uncond_padded" else separate)(prompts, None)
        return timed(run)

    variants = ("uncond_separate", "uncond_padded")
    warmup = {variant: call(variant)[0] for variant in variants}
    calls = {variant: [] for variant in variants}
    encoder = {variant: [] for variant in variants}
    for round_index in range(args.paper_rounds):
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            seconds, encoder_seconds = call(variant)
            calls[variant].append(seconds)
            encoder[variant].append(encoder_seconds)

    encodings = ("uncond_separate_cached", "uncond_separate_uncached", "uncond_padded")
    for variant in encodings:
        conditioning(variant)  # warm-up
    encode = {variant: [] for variant in encodings}
    for round_index in range(max(10, 2 * args.paper_rounds)):
        for variant in encodings[round_index % 3:] + encodings[:round_index % 3]:
            encode[variant].append(conditioning(variant))

    median = statistics.median
    call_median = {variant: median(calls[variant]) for variant in variants}
    encode_median = {variant: median(encode[variant]) for variant in encodings}

    def encoder_share(variant: str) -> float:
        """Each call's encoder time over that call's time, median over the rounds."""
        return median(e / c for e, c in zip(encoder[variant], calls[variant]))

    return {
        "description": (
            "Tiny architecture at the paper's token counts (252 px crops, 4 x 324 image tokens + 41 other "
            "tokens). The pipeline as it is (empty prompt encoded apart, cached) vs the empty prompt padded "
            "to the prompt in one batch with it; calls and encodings timed alternately in one run."
        ),
        "profile": f"tiny, image_size={PAPER_IMAGE_SIZE}",
        "prompt": "a <img> man and his <img> dog on a <img> sofa in the <img> style of an oil painting, warm light",
        "prompt_tokens": prompt_tokens,
        "image_tokens_per_image": int(pipe.tokens_per_image),
        "other_tokens": prompt_tokens - 4 * int(pipe.tokens_per_image),
        "empty_prompt_tokens": empty_tokens,
        "encoder_widths": {
            "vision": pipe.encoder.config.vision_config.hidden_size,
            "text": pipe.encoder.config.text_config.hidden_size,
            "adapter": pipe.adapter.config.width,
        },
        "height": pipe.default_sample_size,
        "width": pipe.default_sample_size,
        "rounds": args.paper_rounds,
        "call": {variant: summarize(calls[variant]) for variant in variants},
        "encoder_forward_in_call": {variant: summarize(encoder[variant]) for variant in variants},
        "conditioning": {variant: summarize(encode[variant]) for variant in encodings},
        "ratios": {
            "encoder_share_of_call_separate": encoder_share("uncond_separate"),
            "encoder_share_of_call_padded": encoder_share("uncond_padded"),
            "conditioning_share_of_call_separate": (
                encode_median["uncond_separate_cached"] / call_median["uncond_separate"]),
            "conditioning_padded_over_separate_cached": (
                encode_median["uncond_padded"] / encode_median["uncond_separate_cached"]),
            "conditioning_padded_over_separate_uncached": (
                encode_median["uncond_padded"] / encode_median["uncond_separate_uncached"]),
            "call_padded_over_separate_paired_median": median(
                p / s for p, s in zip(calls["uncond_padded"], calls["uncond_separate"])),
            # The fastest call of each: the least disturbed by other load on a shared machine.
            "call_padded_over_separate_min": min(calls["uncond_padded"]) / min(calls["uncond_separate"]),
        },
        "warmup_s": warmup,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (paper: 50)")
    parser.add_argument(
        "--rounds", type=int, default=0,
        help="case 1 timed rounds (one MUMU + one SDXL call each); 0 (default): as many as fit in --budget-s",
    )
    parser.add_argument(
        "--budget-s", type=float, default=50.0,
        help="case 1 timing budget that --rounds 0 sizes the run to, from the warm-up calls (default 50)",
    )
    parser.add_argument(
        "--paper-rounds", type=int, default=6,
        help="case 2 timed rounds (one call of each variant each; default 6)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads (default: leave torch's default; pin to 1 on a busy machine)",
    )
    parser.add_argument("--height", type=int, default=None, help="case 1; default: the UNet's native size")
    parser.add_argument("--width", type=int, default=None, help="case 1; default: the UNet's native size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.rounds < 0 or args.steps < 1 or args.budget_s <= 0 or args.paper_rounds < 1:
        parser.error("--steps must be >= 1, --rounds >= 0, --budget-s > 0, --paper-rounds >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mumu-bench-") as tmp:
        mumu = MUMUPipeline.from_pretrained(tiny_pipeline(Path(tmp) / "tiny"))
        mumu.set_progress_bar_config(disable=True)
        overhead = overhead_vs_sdxl(args, mumu)
        paper = paper_token_counts(args, Path(tmp))
    wall = time.perf_counter() - started

    environment = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": "cpu",
        "dtype": str(mumu.unet.dtype).removeprefix("torch."),
        "steps": args.steps,
        "guidance_scale": GUIDANCE,
        "wall_s": wall,
    }
    report = {"benchmark": "pipeline_overhead", **overhead, "paper_tokens": paper, "environment": environment}
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())

    o = overhead
    print(f"1. MUMU vs SDXL, tiny profile, CPU x{os.cpu_count()}, {torch.get_num_threads()} threads, {args.steps} DDIM "
          f"steps, {o['width']}x{o['height']}, {o['rounds']} rounds, {o['embedding_tokens']} prompt tokens")
    print(f"{'':14}{'median s':>10}{'min s':>10}")
    print(f"{'MUMU':14}{o['mumu']['median_s']:10.4f}{o['mumu']['min_s']:10.4f}")
    print(f"{'SDXL (embeds)':14}{o['sdxl']['median_s']:10.4f}{o['sdxl']['min_s']:10.4f}")
    print(f"{'conditioning':14}{o['conditioning']['median_s']:10.4f}")
    verdict = "met" if o["target_met"] else "NOT met"
    print(f"ratio median {o['ratio_median']:.3f}, min/min {o['ratio_min']:.3f}, paired median "
          f"{o['ratio_paired_median']:.3f} (target <= {TARGET_RATIO}: {verdict})")

    p, r = paper, paper["ratios"]
    print(f"2. paper token counts: {p['prompt_tokens']} prompt tokens ({p['image_tokens_per_image']} per image x 4 + "
          f"{p['other_tokens']}), empty prompt {p['empty_prompt_tokens']}, {p['rounds']} rounds")
    print(f"{'':40}{'median s':>10}{'min s':>10}")
    for name, summary in [*(("call, " + k, v) for k, v in p["call"].items()),
                          *(("encoder in call, " + k, v) for k, v in p["encoder_forward_in_call"].items()),
                          *(("conditioning, " + k, v) for k, v in p["conditioning"].items())]:
        print(f"{name:40}{summary['median_s']:10.4f}{summary['min_s']:10.4f}")
    print(f"encoder share of a call: {r['encoder_share_of_call_separate']:.3f} (uncond apart), "
          f"{r['encoder_share_of_call_padded']:.3f} (uncond padded)")
    print(f"conditioning padded / apart: {r['conditioning_padded_over_separate_cached']:.2f}x (empty prompt cached), "
          f"{r['conditioning_padded_over_separate_uncached']:.2f}x (not cached)")
    print(f"call padded / apart: paired median {r['call_padded_over_separate_paired_median']:.3f}, "
          f"min/min {r['call_padded_over_separate_min']:.3f}")
    print(f"wrote {args.out} in {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
