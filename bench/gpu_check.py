"""One GPU check at the paper's real widths: a call against SDXL, a training step, the bootstrap's models.

One command, on one H100 or H200 after the README's setup, with no model hub: every model is
built from its public config (Idefics2-8b and SDXL base ship with the package in
`mumu_model.paper_configs`; the few others are written below) with random weights, directly on
the GPU, in bf16 (PickScore and GroundingDINO in float32, as the paper profile runs them). It
measures, in at most `--budget-s` seconds (default 480), model builds included:

- `pipeline`: `MUMUPipeline` against diffusers' `StableDiffusionXLPipeline` given the same
  conditioning as `prompt_embeds` (no text encoders), sharing one UNet and VAE, at 1024 px, 50
  DDIM steps, guidance 6, batch 1, for a text-only prompt, 1 image and 4 images at 324 tokens
  each: median seconds per call, their ratio, and the share of a MUMU call spent in the encoder
  (and encoder + adapter), timed by hooks on the models inside the timed calls.
- `training`: one stage-1 step as the trainer runs it (Table-1 modes: LoRA r8 on connector, LM
  and UNet, adapter full, ViT frozen; activation checkpointing; bf16 autocast; frozen weights in
  bf16, trainable ones in fp32; AdamW; latents given, as with `cache_latents`) on one GPU at
  batch 1 and at the largest batch the trainer's `--dry-run` estimate lets fit (halved on an
  out-of-memory error): step time, samples/s, TFLOP/s and MFU against the card's dense bf16 peak,
  and peak memory beside the estimate for the same settings. FLOPs are counted by
  `torch.utils.flop_counter` (matmuls, convolutions, attention) on one extra step; model FLOPs
  leave out what checkpointing recomputes in backward (HFU counts it).
- `synthesis`, `pickscore`, `detection`: the bootstrap's own wrappers (`SDXLSynthesizer`,
  `PickScorer`, `GroundingDinoDetector`) with the paper profile's settings (SDXL at the paper
  params' steps, size, guidance and batch; PickScore as a CLIP ViT-H/14; GroundingDINO with a
  Swin-B backbone, all phrases of an image in one query): seconds and images per GPU-hour, then
  the paper bootstrap's GPU-hours recomputed from them (3M synthetic images, 2M real photos).

Results are rewritten atomically to bench/results/gpu_check.json after every part, with the
device, torch/CUDA versions and each part's time. A part that runs out of memory or time, or
fails, is recorded with status "oom", "timeout" or "error" and its message, and the next part
runs. The budget is shared out between the parts still to run; a part that would start after
the budget is spent is "skipped".

    python bench/gpu_check.py                            # one GPU, paper widths
    python bench/gpu_check.py --parts pipeline,training  # some parts only
    python bench/gpu_check.py --device cpu --tiny        # dry mode: every code path in seconds
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too
_RUNS = 0  # main() calls in this process: a later one counts from its own start

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from mumu_model.atomic import write_bytes_atomic  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check.json"
DEFAULT_TINY_OUT = REPO / "bench" / "results" / "gpu_check_tiny.json"
STAGE1_CONFIG = REPO / "configs" / "train_stage1_paper.yaml"
PAPER_PARAMS = REPO / "params.paper.yaml"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendor's data sheets; the first
# name found in the device name wins, so the PCIe variant comes before the SXM default.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

# Shares of the budget; what a part leaves unused goes to the parts after it.
SHARES = {"pipeline": 0.33, "synthesis": 0.13, "pickscore": 0.05, "detection": 0.07, "training": 0.35}
RESERVE_SHARE = 0.07  # kept back for writing, printing and a part that overruns
PARTS = tuple(SHARES)

GUIDANCE = 6.0  # the paper's sampling
PAPER_STEPS, PAPER_RESOLUTION, PAPER_IMAGE_SIZE = 50, 1024, 252
SYNTHETIC_IMAGES, REAL_PHOTOS = 3_000_000, 2_000_000  # the paper's bootstrap

# Public configs of the models the package does not bundle (values only, from their hub repos).
# SDXL base's two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers):
SDXL_TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
# PickScore_v1: a CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's architecture).
PICKSCORE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu")
PICKSCORE_PROJECTION = 1024
# IDEA-Research/grounding-dino-base: a Swin-B (384 px) backbone; the rest is transformers'
# GroundingDinoConfig default (BERT-base text, d_model 256, 6+6 layers, 900 queries).
GROUNDING_DINO_SWIN = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                           image_size=384, out_indices=[2, 3, 4])

CAPTIONS = [
    "a man and his dog hiking in the wilderness",
    "a red car parked on a city street at night",
    "a woman holding a guitar on a stage",
    "a cat sitting on a windowsill in the rain",
]
FILLER = ("with soft warm light in the style of an oil painting by a modern artist, a quiet street "
          "at dusk, trees and houses, a river and a bridge in the distance").split()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


# -- the run: budget, guards, the report ------------------------------------------------------------


class PartTimeout(Exception):
    """A part ran past its hard limit."""


class Incomplete(Exception):
    """A part ended without its measurement; `status` says why ("oom", "timeout", "error")."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def status_of(err: BaseException) -> str:
    if isinstance(err, PartTimeout):
        return "timeout"
    if isinstance(err, Incomplete):
        return err.status
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom"
    return "error"


def describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise PartTimeout in the main thread after `seconds` (best effort: a long C call finishes first)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"ran past its hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def clean(value):
    """JSON-safe: non-finite floats become null, tuples lists, numpy/torch scalars numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return clean(value.item())
    return str(value)


def summary(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "n": len(samples), "samples_s": samples} if samples else {"n": 0}


class Check:
    """What the parts share: the device, the mode, the clock, built models, the report."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and not args.tiny else torch.float32
        self.budget_s = args.budget_s
        self.out = args.out
        self.tmp = Path(tempfile.mkdtemp(prefix="mumu-gpu-check-"))
        self.shared: dict = {}  # models and images one part hands the next
        self.deadline = float("inf")  # the running part's soft deadline (perf_counter)
        params = yaml.safe_load(PAPER_PARAMS.read_text())["data"]
        synthesis = params["synthesis"]
        if self.tiny:
            self.resolution, self.steps, self.image_size = 64, 2, 28
            self.synthesis = dict(height=64, width=64, steps=2, guidance=synthesis["guidance"], batch_size=2)
        else:
            self.resolution, self.steps, self.image_size = PAPER_RESOLUTION, PAPER_STEPS, PAPER_IMAGE_SIZE
            self.synthesis = dict(synthesis)
        self.detection = params["detection"]
        self.max_rounds = 1 if self.tiny else 8
        self.report = {
            "benchmark": "gpu_check",
            "mode": "tiny" if self.tiny else "paper widths, random weights",
            "status": "running",
            "budget_s": self.budget_s,
            "environment": environment(self.device, self.dtype),
            "parts": {name: {"status": "pending"} for name in args.parts},
            "notes": [
                "random weights built from the public configs: the timings are the architecture's, the images noise",
                "Idefics2's and CLIP's tokenizers are not bundled: tiny byte-level ones stand in (ids within the "
                "real vocabularies); each image is 324 tokens as in the paper",
                "training: latents are given, as with cache_latents (no VAE encode in the step); one micro-batch "
                "per optimizer step",
            ],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - STARTED

    def left(self) -> float:
        """Seconds to the running part's soft deadline."""
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def write(self) -> None:
        self.report["wall_s"] = self.elapsed()
        write_bytes_atomic(self.out, (json.dumps(clean(self.report), indent=2) + "\n").encode())

    # -- models, built from config with random weights ------------------------------------------

    @contextlib.contextmanager
    def building(self, dtype: torch.dtype | None = None):
        """Construct modules directly on the device, in `dtype` (default: the check's)."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or self.dtype)
        try:
            with torch.device(self.device):
                yield
        finally:
            torch.set_default_dtype(previous)

    def unet_vae(self):
        """SDXL base's UNet and VAE (the tiny profile's on --tiny), built once and shared."""
        if "unet_vae" not in self.shared:
            self.shared["unet_vae"] = self._mumu_parts(with_encoder=False)[2:4]
        return self.shared["unet_vae"]

    def mumu_parts(self) -> dict:
        """Encoder, processor, adapter, UNet, VAE and DDIM scheduler of a MUMU pipeline: the paper
        architecture at its real widths (the tiny profile on --tiny), random weights."""
        encoder, processor, unet, vae, scheduler, adapter = self._mumu_parts(with_encoder=True)
        return dict(encoder=encoder, processor=processor, adapter=adapter, unet=unet, vae=vae, scheduler=scheduler)

    def _mumu_parts(self, with_encoder: bool):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import Idefics2Config

        from mumu_model import paper_configs
        from mumu_model.build import build_adapter, build_pipeline, build_processor
        from mumu_model.config import load_model_config
        from mumu_model.encoder import MUMUEncoder

        if self.tiny:
            with self.building():
                pipe = build_pipeline(load_model_config("tiny", {"resolution": self.resolution}))
            return pipe.encoder, pipe.processor, pipe.unet, pipe.vae, pipe.scheduler, pipe.adapter
        encoder = processor = adapter = None
        with self.building():
            unet = UNet2DConditionModel.from_config(paper_configs.sdxl_config("unet"))
            vae = AutoencoderKL.from_config(paper_configs.sdxl_config("vae"))
        scheduler = DDIMScheduler.from_config(paper_configs.sdxl_config("scheduler"))  # the paper samples with DDIM
        if with_encoder:
            # Idefics2-8b's tokenizer is not bundled: the tiny profile's stands in (its ids lie
            # within the real 32,003-token vocabulary), with the real image processor settings.
            processor = build_processor(self.image_size)
            values = paper_configs.idefics2_config()
            values.update(image_token_id=processor.image_token_id, use_cache=False)
            config = Idefics2Config(**values)
            model_config = load_model_config("paper")
            # As the paper profile builds it (an encoder option a profile may set, when it has one).
            config.image_token_norm = getattr(model_config, "image_token_norm", False)
            with self.building():
                encoder = MUMUEncoder(config)
                adapter = build_adapter(model_config, encoder, unet)
        return encoder, processor, unet, vae, scheduler, adapter


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import diffusers
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=props.total_memory / 2**30,
                    cudnn=torch.backends.cudnn.version(), driver_capability=f"{props.major}.{props.minor}",
                    peak_bf16_tflops=peak_tflops(props.name))
    else:
        info.update(device_name=platform.processor() or platform.machine(), peak_bf16_tflops=None)
    return info


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


@contextlib.contextmanager
def serving(cls, model):
    """`cls.from_pretrained(...)` returns `model`: the project's wrappers then load a model built
    here as they load a checkpoint, and run their own code unchanged."""
    with mock.patch.object(cls, "from_pretrained", lambda *args, **kwargs: model):
        yield


def square(colour: str, size: int = 512) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def test_images(check: Check, count: int) -> list[Image.Image]:
    """The synthesis part's images when it made some, else noise at its size."""
    images = check.shared.get("synthetic") or []
    if not images:
        side = check.synthesis["height"]
        generator = torch.Generator().manual_seed(0)
        noise = (torch.rand(2, side, side, 3, generator=generator) * 255).to(torch.uint8).numpy()
        images = [Image.fromarray(array) for array in noise]
    return [images[i % len(images)] for i in range(count)]


# -- pipeline: MUMU against SDXL ---------------------------------------------------------------------


def pipeline_prompts() -> dict[str, list]:
    text = " man and his dog on a sofa in the style of an oil painting, warm light"
    return {
        "text_only": ["a" + text],
        "1_image": ["a ", square("red"), text],
        "4_images": ["a ", square("red"), " man and his ", square("blue"), " dog on a ", square("green"),
                     " sofa in the ", square("yellow"), " style of an oil painting, warm light"],
    }


def pipeline_part(check: Check, result: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from mumu_model.pipeline import MUMUPipeline

    log("pipeline: building MUMU (encoder, adapter, UNet, VAE)")
    started = time.perf_counter()
    parts = check.mumu_parts()
    check.shared["unet_vae"] = (parts["unet"], parts["vae"])
    mumu = MUMUPipeline(**parts, max_images=4)
    mumu.set_progress_bar_config(disable=True)
    sdxl = StableDiffusionXLPipeline(
        vae=parts["vae"], unet=parts["unet"], scheduler=DDIMScheduler.from_config(mumu.scheduler.config),
        text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, add_watermarker=False,
    )
    sdxl.set_progress_bar_config(disable=True)
    result.update(resolution=check.resolution, steps=check.steps, guidance=GUIDANCE, batch=1,
                  tokens_per_image=int(mumu.tokens_per_image), build_s=time.perf_counter() - started)
    log(f"pipeline: built; {check.resolution} px, {check.steps} DDIM steps, guidance {GUIDANCE}")

    # The encoder's and the adapter's forward time inside each timed call, from hooks.
    spent = {"encoder": 0.0, "adapter": 0.0}
    starts: dict[str, float] = {}
    for name in spent:
        module = parts[name]

        def before(*_, name=name):
            check.sync()
            starts[name] = time.perf_counter()

        def after(*_, name=name):
            check.sync()
            spent[name] += time.perf_counter() - starts.pop(name)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    common = dict(height=check.resolution, width=check.resolution, num_inference_steps=check.steps,
                  guidance_scale=GUIDANCE, output_type="pil")
    runs = {}
    for label, prompt in pipeline_prompts().items():
        with torch.no_grad():
            embeds, pooled, _ = mumu.encode_prompt(prompt)
            empty, empty_pooled, _ = mumu.encode_prompt("")
        # SDXL gets what MUMU hands its UNet: the prompt, and the empty prompt zero-padded to its length.
        length = max(embeds.shape[1], empty.shape[1])
        embeds, empty = (F.pad(e, (0, 0, 0, length - e.shape[1])) for e in (embeds, empty))
        sdxl_inputs = dict(prompt_embeds=embeds, negative_prompt_embeds=empty, pooled_prompt_embeds=pooled,
                           negative_pooled_prompt_embeds=empty_pooled)
        runs[label] = {
            "mumu": lambda prompt=prompt: mumu(prompt, generator=torch.Generator().manual_seed(0), **common),
            "sdxl": lambda inputs=sdxl_inputs: sdxl(generator=torch.Generator().manual_seed(0), **inputs, **common),
            "tokens": int(length),
            "images": sum(isinstance(part, Image.Image) for part in prompt),
        }

    samples = {label: {"mumu": [], "sdxl": [], "encoder": [], "conditioning": []} for label in runs}

    def call(label: str, which: str) -> float:
        spent.update(encoder=0.0, adapter=0.0)
        seconds = check.timed(runs[label][which])
        if which == "mumu":
            samples[label]["encoder"].append(spent["encoder"] / seconds)
            samples[label]["conditioning"].append((spent["encoder"] + spent["adapter"]) / seconds)
        return seconds

    warmup = {}
    for label in runs:
        warmup[label] = {which: call(label, which) for which in ("mumu", "sdxl")}
        log(f"pipeline: warm-up {label}: MUMU {warmup[label]['mumu']:.2f} s, SDXL {warmup[label]['sdxl']:.2f} s")
    result["warmup_s"] = warmup
    for values in samples.values():
        values["encoder"].clear()
        values["conditioning"].clear()

    rounds = 0
    round_s = sum(sum(w.values()) for w in warmup.values())
    while rounds < check.max_rounds and (rounds == 0 or check.left() > 1.2 * round_s):
        started = time.perf_counter()
        for label in runs:  # alternate the order every round: drift hits both alike
            for which in ("mumu", "sdxl") if rounds % 2 == 0 else ("sdxl", "mumu"):
                samples[label][which].append(call(label, which))
        rounds += 1
        round_s = time.perf_counter() - started
        result["rounds"] = rounds
        result["prompts"] = {label: pipeline_figures(runs[label], samples[label]) for label in runs}
        log("pipeline: round " + str(rounds) + ": " + "; ".join(
            f"{label} {figures['ratio_median']:.3f}" for label, figures in result["prompts"].items()))


def pipeline_figures(run: dict, values: dict) -> dict:
    mumu, sdxl = summary(values["mumu"]), summary(values["sdxl"])
    return {
        "tokens": run["tokens"], "images": run["images"],
        "mumu": mumu, "sdxl": sdxl,
        "ratio_median": mumu["median_s"] / sdxl["median_s"],
        "ratio_paired_median": statistics.median(m / s for m, s in zip(values["mumu"], values["sdxl"])),
        "encoder_share": statistics.median(values["encoder"]),
        "encoder_adapter_share": statistics.median(values["conditioning"]),
    }


# -- the bootstrap's models --------------------------------------------------------------------------


def per_image(result: dict, batch_times: list[float], images_per_batch: int) -> None:
    seconds = statistics.median(batch_times) / images_per_batch
    result.update(batches=summary(batch_times), images_per_batch=images_per_batch, seconds_per_image=seconds,
                  images_per_gpu_hour=3600 / seconds)


def timed_batches(check: Check, run, images_per_batch: int, result: dict, max_batches: int = 4) -> None:
    """One warm-up batch, then as many timed ones as the part's time allows (at least one)."""
    result["warmup_s"] = check.timed(run)
    times: list[float] = []
    while len(times) < (1 if check.tiny else max_batches) and (not times or check.left() > 1.2 * times[-1]):
        times.append(check.timed(run))
        per_image(result, times, images_per_batch)


def synthesis_part(check: Check, result: dict) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mumu_model import paper_configs
    from mumu_model.data.synthesis import SDXL_BASE, SDXLSynthesizer
    from mumu_model.testing import tiny_clip_tokenizer, tiny_sdxl_pipeline

    settings = check.synthesis
    if check.tiny:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline(check.tmp / "sdxl")).to(check.device)
    else:
        log("synthesis: building SDXL's text encoders (the UNet and VAE are shared)")
        unet, vae = check.unet_vae()
        tokenizers = [tiny_clip_tokenizer(), tiny_clip_tokenizer()]  # CLIP's BPE is not bundled

        def text_config(values: dict, tokenizer) -> CLIPTextConfig:
            return CLIPTextConfig(**values, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)

        with check.building():
            encoders = [CLIPTextModel(text_config(SDXL_TEXT_ENCODER, tokenizers[0])),
                        CLIPTextModelWithProjection(text_config(SDXL_TEXT_ENCODER_2, tokenizers[1]))]
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, add_watermarker=False,
            scheduler=EulerDiscreteScheduler.from_config(paper_configs.sdxl_config("scheduler")),
        )
    with serving(StableDiffusionXLPipeline, pipe):
        synthesizer = SDXLSynthesizer(
            SDXL_BASE, height=settings["height"], width=settings["width"], num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance"], batch_size=settings["batch_size"], device=check.device,
            dtype=check.dtype,
        )
    batch = settings["batch_size"]
    result.update(settings=settings, dtype=str(check.dtype).removeprefix("torch."))
    rows = [{"pair_id": f"p{i}", "text": CAPTIONS[i % len(CAPTIONS)], "seed": i} for i in range(batch)]
    images: list[Image.Image] = []

    def run():
        images[:] = [image for _, image in synthesizer.generate(rows)]

    log(f"synthesis: {settings['height']} px, {settings['steps']} steps, batch {batch}")
    timed_batches(check, run, batch, result, max_batches=3)
    result["skipped"] = synthesizer.skipped.as_dict()  # random weights may decode to NaN: timed all the same
    check.shared["synthetic"] = images
    log(f"synthesis: {result['seconds_per_image']:.3f} s per image")


def pickscore_part(check: Check, result: dict) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mumu_model.data.scoring import PickScorer
    from mumu_model.testing import tiny_clip, tiny_clip_tokenizer

    folder = check.tmp / "pickscore"
    if check.tiny:
        model = CLIPModel.from_pretrained(tiny_clip(folder))
    else:
        tokenizer = tiny_clip_tokenizer()  # CLIP's BPE is not bundled; the image side is the real one
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        config = CLIPConfig(text_config={**PICKSCORE_TEXT, **ids}, vision_config=PICKSCORE_VISION,
                            projection_dim=PICKSCORE_PROJECTION)
        with check.building(torch.float32):  # the paper profile scores in float32
            model = CLIPModel(config)
    with serving(CLIPModel, model):
        scorer = PickScorer(str(folder), device=check.device)  # the profile's batch size and dtype
    count = 2 * scorer.batch_size
    images = test_images(check, count)
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    result.update(batch_size=scorer.batch_size, dtype="float32", image_side=images[0].width)
    log(f"pickscore: {count} images per timed call, batch {scorer.batch_size}")
    timed_batches(check, lambda: scorer.score(texts, images), count, result)
    log(f"pickscore: {result['seconds_per_image'] * 1000:.2f} ms per image")


def detection_part(check: Check, result: dict) -> None:
    from transformers import (AutoProcessor, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    from mumu_model.data.detection import GroundingDinoDetector, caption_phrases
    from mumu_model.testing import tiny_grounding_dino

    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    # The tiny builder's tokenizer puts BERT's special tokens at BERT's ids, which GroundingDINO
    # splits its query at; the real model reads its first 30,522 ids, these among them.
    folder = tiny_grounding_dino(check.tmp / "grounding-dino", words)
    if check.tiny:
        model = GroundingDinoForObjectDetection.from_pretrained(folder)
    else:
        tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
        processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer)
        processor.save_pretrained(folder)  # the real image side: 800 px short, 1,333 long
        config = GroundingDinoConfig(backbone_config=SwinConfig(**GROUNDING_DINO_SWIN), use_timm_backbone=False,
                                     use_pretrained_backbone=False)
        with check.building(torch.float32):  # the paper profile detects in float32
            model = GroundingDinoForObjectDetection(config)
    with serving(GroundingDinoForObjectDetection, model):
        detector = GroundingDinoDetector(str(folder), box_threshold=check.detection["box_threshold"],
                                         text_threshold=check.detection["text_threshold"], device=check.device)
    count = 2 * detector.batch_size
    images = test_images(check, count)
    phrases = [caption_phrases(CAPTIONS[i % len(CAPTIONS)]) for i in range(count)]
    result.update(batch_size=detector.batch_size, dtype="float32", image_side=images[0].width,
                  phrases_per_query=statistics.mean(len(p) for p in phrases),
                  image_processor_size=dict(detector.processor.image_processor.size))
    log(f"detection: {count} images per timed call, batch {detector.batch_size}, all phrases in one query")
    timed_batches(check, lambda: detector.detect(images, phrases), count, result)
    log(f"detection: {result['seconds_per_image'] * 1000:.1f} ms per image")


def bootstrap_hours(parts: dict) -> dict:
    """The paper bootstrap's GPU-hours from the measured images per GPU-hour."""
    work = {"synthesis": SYNTHETIC_IMAGES, "pickscore": SYNTHETIC_IMAGES, "detection": SYNTHETIC_IMAGES + REAL_PHOTOS}
    stages = {}
    for name, images in work.items():
        rate = parts.get(name, {}).get("images_per_gpu_hour")
        stages[name] = {"images": images, "images_per_gpu_hour": rate, "gpu_hours": images / rate if rate else None}
    measured = [s["gpu_hours"] for s in stages.values()]
    return {
        "what": ("3M synthetic images rendered and PickScored, GroundingDINO on those and on 2M real photos, "
                 "at this device's measured rates; LLaVA-NeXT captions of the photos are not measured here"),
        "stages": stages,
        "gpu_hours_measured_stages": sum(measured) if all(h is not None for h in measured) else None,
    }


# -- training: one stage-1 step ----------------------------------------------------------------------


def train_config(check: Check, batch: int):
    """configs/train_stage1_paper.yaml at `batch` (the tiny profile at 64 px on --tiny)."""
    from mumu_model.training.config import load_train_config

    # One optimizer step per batch: the step timed is one micro-batch, without accumulation.
    overrides: dict = {"batch_size": batch, "global_batch_size": None}
    if check.tiny:
        overrides.update(model_profile="tiny", model_overrides={}, image_size=check.image_size,
                         resolution=check.resolution)
    return load_train_config(STAGE1_CONFIG, overrides)


def dry_run_estimate(check: Check, batch: int):
    """What `mumu train configs/train_stage1_paper.yaml --dry-run --world-size 1` estimates at `batch`."""
    from mumu_model.training.sizing import estimate

    cache = check.shared.setdefault("estimates", {})
    if batch not in cache:
        cache[batch] = estimate(train_config(check, batch), world_size=1)
    return cache[batch]


def largest_estimated_batch(check: Check, gpu_bytes: int, cap: int) -> tuple[int, dict]:
    """The largest batch whose `--dry-run` estimate fits `gpu_bytes` (activations grow linearly)."""
    one, two = dry_run_estimate(check, 1), dry_run_estimate(check, 2)
    per_sample = two.peak_bytes - one.peak_bytes
    batch = 1 + int((gpu_bytes - one.peak_bytes) // per_sample) if per_sample > 0 else cap
    batch = max(1, min(batch, cap))
    while batch > 1 and dry_run_estimate(check, batch).peak_bytes > gpu_bytes:
        batch -= 1
    return batch, {"peak_gib_batch_1": one.peak_bytes / 2**30, "per_sample_gib": per_sample / 2**30,
                   "device_memory_gib": gpu_bytes / 2**30}


def training_part(check: Check, result: dict) -> None:
    from diffusers import DDPMScheduler
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    from mumu_model.encoder import encoder_inputs
    from mumu_model.pipeline import vae_scale_factor
    from mumu_model.prompt import MultimodalPrompt
    from mumu_model.training import parallel
    from mumu_model.training.sizing import TEXT_TOKENS
    from mumu_model.training.trainer import MUMUTrainModel, add_loras, build_optimizer, set_trainable

    config = train_config(check, 1)
    cuda = check.device.type == "cuda"
    gpu_bytes = torch.cuda.get_device_properties(check.device).total_memory if cuda else None
    cap = 64 if cuda and not check.tiny else 2  # on a CPU there is no device memory to fill
    if cuda:
        largest, linear = largest_estimated_batch(check, gpu_bytes, cap)
    else:
        largest, linear = cap, {}
    result.update(config=str(STAGE1_CONFIG.relative_to(REPO)), modes=dict(config.modes),
                  resolution=config.resolution, image_size=config.image_size, max_images=config.max_images,
                  mixed_precision=config.mixed_precision, activation_checkpointing=config.activation_checkpointing,
                  largest_batch_estimated=largest, estimate_linear=linear)
    log(f"training: the estimate lets batch {largest} fit; building the model")

    # The trainer's model: its assembly, LoRAs and trainable flags; frozen weights in the compute
    # dtype and fp32 masters of the trainable ones (as its sharded build makes them).
    started = time.perf_counter()
    parts = check.mumu_parts()
    parts["vae"].to(torch.float32)  # kept on the device in fp32 as the trainer keeps it (unused: latents given)
    model = MUMUTrainModel(parts["encoder"], parts["adapter"], parts["unet"])
    torch.manual_seed(config.seed)
    add_loras(model, config)
    set_trainable(model, config)
    model.to(check.device)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if config.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    optimizer = build_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result.update(parameters=sum(p.numel() for p in model.parameters()),
                  trainable_parameters=sum(p.numel() for p in trainable), build_s=time.perf_counter() - started)
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    latent_side = config.resolution // vae_scale_factor(parts["vae"])
    channels = parts["unet"].config.in_channels
    bf16 = cuda and config.mixed_precision == "bf16"  # as the trainer: bf16 autocast on GPU only
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    result["bf16_autocast"] = bf16

    # One prompt of max_images images and as many text tokens as the estimate assumes.
    tokenizer = parts["processor"].tokenizer
    words = 0
    while len(tokenizer(" ".join(FILLER[i % len(FILLER)] for i in range(words)))["input_ids"]) < TEXT_TOKENS:
        words += 1
    text = " ".join(FILLER[i % len(FILLER)] for i in range(words))
    colours = ("red", "blue", "green", "yellow")
    prompt_parts: list = []
    for index in range(config.max_images):
        prompt_parts += ["a " if index == 0 else " and a ", square(colours[index % 4], 256)]
    one = encoder_inputs(parts["processor"], [MultimodalPrompt(prompt_parts + [" " + text])])
    result["encoder_tokens"] = int(one["input_ids"].shape[1])

    state = {"backward": False}

    def step(batch: int) -> float:
        inputs = {k: v.repeat(batch, *([1] * (v.dim() - 1))) for k, v in one.items()}
        latents = torch.randn(batch, channels, latent_side, latent_side, device=check.device)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=check.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        res = config.resolution
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=check.device).repeat(batch, 1)
        model.train()
        with autocast:
            prediction = model(inputs, noisy, timesteps, time_ids)
        loss = F.mse_loss(prediction.float(), noise.float())
        state["backward"] = True
        try:
            loss.backward()
        finally:
            state["backward"] = False
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    runs: dict[str, dict] = {}
    result["batches"] = runs

    def measure(batch: int, warmup: int, max_steps: int) -> dict:
        record: dict = {"batch": batch}
        runs[str(batch)] = record
        try:
            estimated = dry_run_estimate(check, batch)
            record.update(estimate_peak_gib=estimated.peak_bytes / 2**30,
                          estimate=[(what, size / 2**30) for what, size in estimated.memory])
        except Exception as err:  # noqa: BLE001 - the estimate is beside the point of the step
            record["estimate_error"] = describe(err)
        if cuda:
            torch.cuda.reset_peak_memory_stats(check.device)
        try:
            record["warmup_s"] = [check.timed(lambda: step(batch)) for _ in range(warmup)]
            times: list[float] = []
            while len(times) < max_steps and (len(times) < 2 or check.left() > 1.2 * times[-1]):
                times.append(check.timed(lambda: step(batch)))
                median = statistics.median(times)
                record.update(steps=summary(times), step_s=median, samples_per_s=batch / median)
        except Exception as err:  # noqa: BLE001 - an OOM at a large batch is a result
            record.update(status=status_of(err), message=describe(err))
            if isinstance(err, PartTimeout):
                raise
        finally:
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            record.update(peak_allocated_gib=torch.cuda.max_memory_allocated(check.device) / 2**30,
                          peak_reserved_gib=torch.cuda.max_memory_reserved(check.device) / 2**30)
        free_memory()
        record.setdefault("status", "ok")
        log(f"training: batch {batch}: " + (f"{record['step_s']:.3f} s/step, {record['samples_per_s']:.2f} samples/s"
                                            if record["status"] == "ok" else record["status"]))
        return record

    first = measure(1, warmup=2, max_steps=1 if check.tiny else 6)
    if first["status"] != "ok":
        raise Incomplete(first["status"], f"batch 1: {first.get('message')}")

    # FLOPs of one step at batch 1 (they scale with the batch), and what checkpointing re-runs.
    try:
        counter = FlopCounterMode(display=False)
        recompute = {"flops": 0, "starts": []}
        hooks = []
        for parent, name in parallel.repeated_blocks(model):
            block = getattr(parent, name)
            block = getattr(block, "_checkpoint_wrapped_module", block)

            def before(*_):
                if state["backward"]:
                    recompute["starts"].append(counter.get_total_flops())

            def after(*_):
                if state["backward"] and recompute["starts"]:
                    recompute["flops"] += counter.get_total_flops() - recompute["starts"].pop()

            hooks += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
        try:
            # Early stop would end a block's recomputation before its forward hook fires.
            with counter, set_checkpoint_early_stop(False):
                step(1)
        finally:
            for hook in hooks:
                hook.remove()
        executed = counter.get_total_flops()
        result["flops_per_sample"] = {"executed": executed, "recomputed": recompute["flops"],
                                      "model": executed - recompute["flops"]}
    except Exception as err:  # noqa: BLE001 - the step times stand without the FLOP count
        result["flops_per_sample"] = {"status": status_of(err), "message": describe(err)}
        if isinstance(err, PartTimeout):
            raise
    free_memory()

    # The largest batch the estimate allows; halved on an out-of-memory error; once one up if it fits.
    batch = largest
    while batch > 1:
        record = measure(batch, warmup=1, max_steps=1 if check.tiny else 3)
        if record["status"] == "ok":
            result["largest_batch_measured"] = batch
            probe = batch + max(1, batch // 4)
            if not check.tiny and check.left() > 3 * record["step_s"] * probe / batch + 10:
                if measure(probe, warmup=1, max_steps=2)["status"] == "ok":
                    result["largest_batch_measured"] = probe
            break
        if record["status"] != "oom":
            break
        batch //= 2
    result.setdefault("largest_batch_measured", 1)
    training_figures(check, result)


def training_figures(check: Check, result: dict) -> None:
    """TFLOP/s, MFU and HFU of each measured batch, and the measured peak beside the estimate."""
    flops = result.get("flops_per_sample", {})
    peak = check.report["environment"].get("peak_bf16_tflops")
    for record in result["batches"].values():
        if record.get("status") != "ok" or "step_s" not in record:
            continue
        if "model" in flops:
            record["model_tflops_per_s"] = flops["model"] * record["batch"] / record["step_s"] / 1e12
            record["executed_tflops_per_s"] = flops["executed"] * record["batch"] / record["step_s"] / 1e12
            if peak:
                record["mfu"] = record["model_tflops_per_s"] / peak
                record["hfu"] = record["executed_tflops_per_s"] / peak
        if "peak_reserved_gib" in record and "estimate_peak_gib" in record:
            record["measured_over_estimate"] = record["peak_reserved_gib"] / record["estimate_peak_gib"]


# -- the run -------------------------------------------------------------------------------------


RUNNERS = {"pipeline": pipeline_part, "synthesis": synthesis_part, "pickscore": pickscore_part,
           "detection": detection_part, "training": training_part}
# What a part leaves for later ones, and which parts use it: released when none of them is left.
USERS = {"unet_vae": {"synthesis"}, "synthetic": {"pickscore", "detection"}, "estimates": {"training"}}


def run_parts(check: Check, parts: list[str]) -> None:
    for index, name in enumerate(parts):
        result = check.report["parts"][name]
        remaining = check.budget_s * (1 - RESERVE_SHARE) - check.elapsed()
        shares = [SHARES[p] for p in parts[index:]]
        allotted = remaining * SHARES[name] / sum(shares)
        if remaining <= 0 or allotted < (0.5 if check.tiny else 10):
            result.update(status="skipped", message=f"the budget of {check.budget_s:.0f} s was spent")
            log(f"{name}: skipped (budget spent)")
            check.write()
            continue
        result.update(status="running", allotted_s=allotted)
        started = time.perf_counter()
        check.deadline = started + allotted
        hard = allotted * 1.15 + (5 if check.tiny else 15)  # for a hang: the loops stop at `allotted`
        log(f"{name}: {allotted:.0f} s allotted (hard limit {hard:.0f} s)")
        try:
            with hard_limit(hard):
                RUNNERS[name](check, result)
            result["status"] = "ok"
        except BaseException as err:  # noqa: BLE001 - one part's failure never stops the others
            if isinstance(err, KeyboardInterrupt):
                raise
            result.update(status=status_of(err), message=describe(err),
                          traceback=traceback.format_exc(limit=-4).splitlines()[-8:])
            log(f"{name}: {result['status']}: {result['message']}")
        finally:
            result["seconds"] = time.perf_counter() - started
            for key, users in USERS.items():
                if not users & set(parts[index + 1:]):
                    check.shared.pop(key, None)
            free_memory()
            check.write()
        if check.device.type == "cuda":
            log(f"{name}: {result['status']} in {result['seconds']:.1f} s; "
                f"{torch.cuda.memory_allocated(check.device) / 2**30:.1f} GiB still allocated")
        else:
            log(f"{name}: {result['status']} in {result['seconds']:.1f} s")


def print_summary(report: dict) -> None:
    parts = report["parts"]
    env = report["environment"]
    print(f"\n{env['device_name']} ({env['device']}), torch {env['torch']}, CUDA {env['cuda']}, {report['mode']}, "
          f"{report['wall_s']:.0f} s of {report['budget_s']:.0f}")
    for name, result in parts.items():
        line = f"{name:10} {result['status']:8} {result.get('seconds', 0):6.1f} s  "
        if name == "pipeline" and "prompts" in result:
            line += "; ".join(f"{label} ({p['tokens']} tok): MUMU {p['mumu']['median_s']:.3f} s / SDXL "
                              f"{p['sdxl']['median_s']:.3f} s = {p['ratio_median']:.3f}, encoder "
                              f"{100 * p['encoder_share']:.1f}%" for label, p in result["prompts"].items())
        elif name == "training" and "batches" in result:
            items = []
            for record in result["batches"].values():
                if record.get("status") != "ok":
                    items.append(f"batch {record['batch']}: {record.get('status')}")
                    continue
                text = (f"batch {record['batch']}: {record['step_s']:.3f} s/step, "
                        f"{record['samples_per_s']:.2f} samples/s")
                if "model_tflops_per_s" in record:
                    text += f", {record['model_tflops_per_s']:.3g} TFLOP/s"
                if "mfu" in record:
                    text += f", MFU {100 * record['mfu']:.1f}%"
                if "peak_reserved_gib" in record:
                    text += f", peak {record['peak_reserved_gib']:.1f} GiB"
                if "estimate_peak_gib" in record:
                    text += f" (estimate {record['estimate_peak_gib']:.1f})"
                items.append(text)
            line += "; ".join(items)
        elif "seconds_per_image" in result:
            line += f"{result['seconds_per_image']:.4f} s/image, {result['images_per_gpu_hour']:,.0f} images/GPU-hour"
        elif result.get("message"):
            line += result["message"]
        print(line)
    hours = report.get("bootstrap_gpu_hours", {})
    for stage, figures in hours.get("stages", {}).items():
        if figures["gpu_hours"] is not None:
            print(f"bootstrap  {stage:10} {figures['images']:,} images: {figures['gpu_hours']:,.0f} GPU-hours")
    if hours.get("gpu_hours_measured_stages") is not None:
        print(f"bootstrap  measured stages in all: {hours['gpu_hours_measured_stages']:,.0f} GPU-hours")
    sys.stdout.flush()


@contextlib.contextmanager
def quiet_libraries():
    """One line per step of progress: no progress bars or notices from diffusers and transformers,
    no numpy warning on random weights' NaN images; the previous settings come back after."""
    import diffusers
    import transformers

    loggers = [library.utils.logging for library in (diffusers, transformers)]
    saved = [(log_, log_.get_verbosity(), log_.is_progress_bar_enabled()) for log_ in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="invalid value encountered in cast")
        for log_ in loggers:
            log_.disable_progress_bar()
            log_.set_verbosity_error()
        try:
            yield
        finally:
            for log_, verbosity, bars in saved:
                log_.set_verbosity(verbosity)
                if bars:
                    log_.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    global STARTED, _RUNS
    if _RUNS:
        STARTED = time.perf_counter()
    _RUNS += 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda (a GPU is needed unless --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny profile, 1-2 steps, 64 px: the dry mode")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run, imports included (default 480)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default {DEFAULT_OUT.relative_to(REPO)} ({DEFAULT_TINY_OUT.name} with --tiny)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in args.parts]  # the order that frees memory for training last
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no GPU is visible (run `--device cpu --tiny` for the dry mode)")
    if torch.device(args.device).type != "cuda" and not args.tiny:
        parser.error("paper widths need a GPU (about 40 GB for the training step); use --device cpu --tiny "
                     "for the dry mode")
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    args.out = args.out or (DEFAULT_TINY_OUT if args.tiny else DEFAULT_OUT)
    with quiet_libraries():
        check = Check(args)
        log(f"gpu_check: {check.report['environment']['device_name']}, {check.report['mode']}, parts "
            f"{', '.join(args.parts)}, budget {args.budget_s:.0f} s, writing {args.out}")
        check.write()
        try:
            run_parts(check, args.parts)
        finally:
            parts = check.report["parts"]
            check.report["bootstrap_gpu_hours"] = bootstrap_hours(parts)
            check.report["status"] = "ok" if all(p["status"] == "ok" for p in parts.values()) else "partial"
            check.write()
            shutil.rmtree(check.tmp, ignore_errors=True)
    print_summary(check.report)
    log(f"wrote {args.out}")
    return 0 if check.report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
