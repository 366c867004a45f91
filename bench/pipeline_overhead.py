"""Benchmark: MUMUPipeline vs a plain StableDiffusionXLPipeline given precomputed embeddings.

Both pipelines share the same UNet and VAE objects and run the same DDIM schedule (same
config), steps, guidance, resolution and seed, so what the ratio measures is MUMU's own cost
per call: the multimodal encoder + adapter pass (once per call) and MUMU's denoising loop
(which also hands the UNet an `encoder_attention_mask`). SDXL gets embeddings computed once,
outside the timed region, by `MUMUPipeline.encode_prompt` on the same prompt.

Embedding length: MUMU encodes the prompt and the unconditional (empty) prompt in one batch,
right-padded to the longer one, and masks the padding in the UNet. SDXL takes no mask, so it
is given exactly that batch (same length L for cond and uncond; padding unmasked). The UNet
therefore cross-attends over the same L tokens in both pipelines.

Timings alternate within one run (MUMU then SDXL, order swapped every other round) so that
drift in the machine's speed hits both alike. Results are rewritten atomically to
bench/results/pipeline_overhead.json.

    python bench/pipeline_overhead.py [--steps 50] [--rounds N | --budget-s 60] [--threads N]
        [--height H --width W] [--out bench/results/pipeline_overhead.json]
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
from mumu_model.pipeline import MUMUPipeline
from mumu_model.prompt import MultimodalPrompt
from mumu_model.testing import tiny_pipeline

TARGET_RATIO = 1.05
GUIDANCE = 6.0  # paper
SEED = 0
MIN_ROUNDS, MAX_ROUNDS = 3, 50
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pipeline_overhead.json"


def square(colour: str, size: int = 96) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def benchmark_prompt() -> list:
    """A multimodal prompt with two images inline (coloured squares)."""
    return ["a ", square("red"), " square and a ", square("blue"), " circle in a cubist style"]


def summarize(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "mean_s": statistics.fmean(samples),
        "samples_s": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (paper: 50)")
    parser.add_argument(
        "--rounds", type=int, default=0,
        help="timed rounds (one MUMU + one SDXL call each); 0 (default): as many as fit in --budget-s",
    )
    parser.add_argument(
        "--budget-s", type=float, default=60.0,
        help="timing budget that --rounds 0 sizes the run to, from the warm-up calls (default 60)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads (default: leave torch's default; pin to 1 on a busy machine)",
    )
    parser.add_argument("--height", type=int, default=None, help="default: the UNet's native size")
    parser.add_argument("--width", type=int, default=None, help="default: the UNet's native size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.rounds < 0 or args.steps < 1 or args.budget_s <= 0:
        parser.error("--steps must be >= 1, --rounds >= 0, --budget-s > 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mumu-bench-") as tmp:
        mumu = MUMUPipeline.from_pretrained(tiny_pipeline(Path(tmp) / "tiny"))
    mumu.set_progress_bar_config(disable=True)
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
    # The embeddings SDXL gets: MUMU's own encoding of [prompt, ""] (one batch, as in __call__).
    encode_batch = mumu.to_prompts(prompt) + [MultimodalPrompt()]
    with torch.no_grad():
        embeds, pooled, mask = mumu.encode_prompt(encode_batch)
    sdxl_kwargs = dict(
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        pooled_prompt_embeds=pooled[:1],
        negative_pooled_prompt_embeds=pooled[1:],
    )
    common = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=GUIDANCE, output_type="pil")

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def run_mumu():
        return mumu(prompt, generator=torch.Generator().manual_seed(SEED), **common).images

    def run_sdxl():
        return sdxl(generator=torch.Generator().manual_seed(SEED), **sdxl_kwargs, **common).images

    def run_encode():
        with torch.no_grad():
            return mumu.encode_prompt(mumu.to_prompts(prompt) + [MultimodalPrompt()])

    warmup = {"mumu": timed(run_mumu), "sdxl": timed(run_sdxl), "encode": timed(run_encode)}  # not reported as samples
    rounds = args.rounds or max(MIN_ROUNDS, min(MAX_ROUNDS, int(args.budget_s / (warmup["mumu"] + warmup["sdxl"]))))

    samples: dict[str, list[float]] = {"mumu": [], "sdxl": []}
    runners = {"mumu": run_mumu, "sdxl": run_sdxl}
    for round_index in range(rounds):
        order = ("mumu", "sdxl") if round_index % 2 == 0 else ("sdxl", "mumu")
        for name in order:
            samples[name].append(timed(runners[name]))
    encode_samples = [timed(run_encode) for _ in range(max(5, rounds))]

    results = {name: summarize(values) for name, values in samples.items()}
    ratio_median = results["mumu"]["median_s"] / results["sdxl"]["median_s"]
    ratio_min = results["mumu"]["min_s"] / results["sdxl"]["min_s"]
    # Each round's two calls ran back to back, so their ratio cancels slow drift best.
    ratio_paired = statistics.median(m / s for m, s in zip(samples["mumu"], samples["sdxl"]))
    encode_median = statistics.median(encode_samples)
    wall = time.perf_counter() - started

    report = {
        "benchmark": "pipeline_overhead",
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
        "ratio_min": ratio_min,
        "ratio_paired_median": ratio_paired,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio_median <= TARGET_RATIO,
        "encode_prompt": {
            "median_s": encode_median,
            "samples_s": encode_samples,
            "share_of_mumu_median": encode_median / results["mumu"]["median_s"],
        },
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "dtype": str(mumu.unet.dtype).removeprefix("torch."),
            "steps": args.steps,
            "guidance_scale": GUIDANCE,
            "height": height,
            "width": width,
            "rounds": rounds,
            "rounds_auto": args.rounds == 0,
            "warmup_s": warmup,
            "wall_s": wall,
        },
    }
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())

    print(f"pipeline overhead, tiny profile, CPU x{os.cpu_count()}, {args.steps} DDIM steps, "
          f"{width}x{height}, {rounds} rounds, {int(embeds.shape[1])} prompt tokens")
    print(f"{'':14}{'median s':>10}{'min s':>10}")
    print(f"{'MUMU':14}{results['mumu']['median_s']:10.4f}{results['mumu']['min_s']:10.4f}")
    print(f"{'SDXL (embeds)':14}{results['sdxl']['median_s']:10.4f}{results['sdxl']['min_s']:10.4f}")
    print(f"{'encode_prompt':14}{encode_median:10.4f}")
    verdict = "met" if report["target_met"] else "NOT met"
    print(f"ratio median {ratio_median:.3f}, min/min {ratio_min:.3f}, paired median {ratio_paired:.3f} (target <= {TARGET_RATIO}: {verdict})")
    print(f"wrote {args.out} in {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
