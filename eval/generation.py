"""Generation for an evaluation: every suite entry, once per seed, by MUMU (and SDXL for text).

`generate_suites` loads each entry's images, generates it with MUMU (`batch_size` prompts with
all their seeds per call) and, with `text_only_ablation`, a second time with its images removed
("a <img:x.png> circle" -> "a circle"), same seeds and sampler. `generate_sdxl` draws the
text-only entries with the base SDXL and MUMU's sampler, for text adherence. Every image is
written under `out_dir` as it is made. An entry that cannot be loaded or generated becomes an
`EntryError`; the rest go on. The same seed gives the same image whatever else is in its batch.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mumu_model.pipeline import MUMUPipeline
from mumu_model.prompt import MultimodalPrompt

from .reporting import save_png
from .suites import EntryError, LoadedEntry, Suite, load_entry, prompt_words

logger = logging.getLogger("mumu.eval")


@dataclass
class Generated:
    """One entry's outputs: MUMU's (one per seed), and those to compare them with."""

    entry: LoadedEntry
    seeds: list[int]
    images: list[Image.Image]
    paths: list[str]  # relative to out_dir
    sdxl_images: list[Image.Image] = field(default_factory=list)
    ablation_images: list[Image.Image] = field(default_factory=list)  # text-only ablation, per seed
    ablation_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    seeds: list[int]
    steps: int
    guidance: float
    negative_prompt: str | None
    size: int  # output side in pixels


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on any device.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def generate_suites(pipe: MUMUPipeline, suites: Sequence[Suite], sampling: Sampling, *, out_dir: Path,
                    text_only_ablation: bool, batch_size: int, errors: list[EntryError]) -> list[Generated]:
    """Every loadable entry of `suites`, generated; the entries that fail are added to `errors`."""
    max_images = int(pipe.config.max_images)
    seeds = sampling.seeds
    generated: list[Generated] = []
    for suite in suites:
        entries: list[LoadedEntry] = []
        for entry in suite.entries:
            try:
                entries.append(load_entry(suite, entry, max_images))
            except EntryError as err:
                errors.append(err)
        images = generate_mumu(pipe, [e.prompt for e in entries], sampling, suite.image_root, batch_size)
        ablated = [i for i, e in enumerate(entries) if text_only_ablation and not e.text_only]
        words = [prompt_words(entries[i].prompt) for i in ablated]
        ablation = dict(zip(ablated, generate_mumu(pipe, words, sampling, suite.image_root, batch_size)))
        for index, loaded in enumerate(entries):
            failure = next((r for r in (images[index], ablation.get(index)) if isinstance(r, Exception)), None)
            if failure is not None:
                errors.append(EntryError(suite.name, loaded.id,
                                         f"generation failed: {type(failure).__name__}: {failure}"))
                continue
            paths = [save_png(out_dir, f"images/{suite.name}/{loaded.id}/seed{seed}.png", image)
                     for seed, image in zip(seeds, images[index])]
            ablation_images = ablation.get(index, [])
            ablation_paths = [save_png(out_dir, f"images_text_only/{suite.name}/{loaded.id}/seed{seed}.png", image)
                              for seed, image in zip(seeds, ablation_images)]
            generated.append(Generated(loaded, seeds, images[index], paths, ablation_images=ablation_images,
                                       ablation_paths=ablation_paths))
    return generated


def generate_mumu(pipe: MUMUPipeline, prompts: list[MultimodalPrompt | str], sampling: Sampling, image_root: Path,
                  batch_size: int) -> list[list[Image.Image] | Exception]:
    """Each prompt's images, one per seed, or the exception that generating it raised.

    `batch_size` prompts (times their seeds) go through the pipeline together. Every image has
    its own generator, so it is the same image whatever else is in its batch. A failing batch
    is generated again one prompt at a time, so that the failure is pinned on its entry.
    """
    seeds = sampling.seeds
    negative = None
    if sampling.negative_prompt is not None:
        negative = MultimodalPrompt.from_text(sampling.negative_prompt, image_root, max_images=pipe.config.max_images)

    def call(chunk: list[MultimodalPrompt | str]) -> list[list[Image.Image]]:
        images = pipe(
            list(chunk), height=sampling.size, width=sampling.size, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance, negative_prompt=negative, num_images_per_prompt=len(seeds),
            generator=[g for _ in chunk for g in _generators(seeds)],
        ).images
        return [images[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(chunk))]

    def generate(chunk: list[MultimodalPrompt | str]) -> list[list[Image.Image] | Exception]:
        try:
            return call(chunk)
        except Exception as err:  # noqa: BLE001 - one broken entry must not end the evaluation
            if len(chunk) > 1:  # one prompt at a time, to find the one that fails
                return [result for prompt in chunk for result in generate([prompt])]
            logger.exception("generating %r failed", chunk[0] if isinstance(chunk[0], str) else chunk[0].to_text())
            return [err]

    return [result for start in range(0, len(prompts), batch_size)
            for result in generate(prompts[start:start + batch_size])]


def generate_sdxl(source: str | Path, generated: list[Generated], sampling: Sampling, scheduler_class: type,
                  device: str, dtype: torch.dtype | None, out_dir: Path) -> None:
    """The base SDXL's images of every text-only entry, into `Generated.sdxl_images`."""
    from diffusers import StableDiffusionXLPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    sdxl = StableDiffusionXLPipeline.from_pretrained(str(source), use_safetensors=True, **kwargs).to(device)
    # The same sampler as MUMU's, so the comparison is of the conditioning, not the scheduler.
    sdxl.scheduler = scheduler_class.from_config(sdxl.scheduler.config)
    sdxl.set_progress_bar_config(disable=True)
    seeds = sampling.seeds
    for item in generated:
        if not item.entry.text_only:
            continue
        item.sdxl_images = sdxl(
            prompt=item.entry.text, negative_prompt=sampling.negative_prompt, height=sampling.size,
            width=sampling.size, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
            num_images_per_prompt=len(seeds), generator=_generators(seeds),
        ).images
        for seed, image in zip(seeds, item.sdxl_images):
            save_png(out_dir, f"images_sdxl/{item.entry.suite}/{item.entry.id}/seed{seed}.png", image)
    del sdxl
