"""Synthetic training images: SDXL renders each content+style prompt (paper §2 Data).

The paper generated ~3M SDXL images from content+style prompts and kept those above a minimum
PickScore (`scoring.py`). This module only renders; scoring and filtering are separate steps so
a threshold can change without re-rendering.

Reproducibility: every row carries its own seed and gets its own `torch.Generator`, so an image
depends only on (model, settings, text, seed), never on which rows shared its batch or on the
batch size. A re-run, a resumed run or a run with another batch size gives the same images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from .report import Skipped
from .rows import row_id, row_problem

# SDXL base 1.0, the model the paper rendered with.
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


class SDXLSynthesizer:
    """Render rows `{"pair_id", "text", "seed"}` with a diffusers `StableDiffusionXLPipeline`.

    `model` is a hub id or a local folder saved with `save_pretrained`; only safetensors weights
    are loaded. Rows that cannot be rendered are skipped and counted in `self.skipped` (or in the
    `skipped` passed to `generate`), never raised.
    """

    def __init__(
        self,
        model: str = SDXL_BASE,
        *,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.0,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            model, dtype=dtype, use_safetensors=True, variant=variant
        )
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.height = height
        self.width = width
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.skipped = Skipped()

    def generate(
        self, rows: Iterable[dict], *, skipped: Skipped | None = None
    ) -> Iterator[tuple[dict, Image.Image]]:
        """Yield `(row, image)` for each row that rendered, in input order.

        Rows are rendered `batch_size` at a time. A batch that fails is retried row by row, so
        one bad row costs only itself.
        """
        skipped = self.skipped if skipped is None else skipped
        batch: list[dict] = []
        for row in rows:
            problem = row_problem(row)
            if problem:
                skipped.add("bad_row", row_id(row), problem)
                continue
            batch.append(row)
            if len(batch) == self.batch_size:
                yield from self._render_batch(batch, skipped)
                batch = []
        if batch:
            yield from self._render_batch(batch, skipped)

    def _render_batch(self, batch: list[dict], skipped: Skipped) -> Iterator[tuple[dict, Image.Image]]:
        try:
            arrays = self._render(batch)
        except Exception as err:  # noqa: BLE001 - any failure is retried per row, then counted
            if len(batch) == 1:
                skipped.add("generation_error", row_id(batch[0]), f"{type(err).__name__}: {err}")
                return
            for row in batch:
                yield from self._render_batch([row], skipped)
            return
        for row, array in zip(batch, arrays):
            # fp16 VAEs overflow into NaN; a NaN decodes to a black PIL image that would pass
            # for a real one, so check before converting.
            if not np.isfinite(array).all():
                skipped.add("nonfinite_output", row_id(row))
                continue
            if array.max() <= 0.0:
                skipped.add("black_image", row_id(row))
                continue
            yield row, self.pipe.numpy_to_pil(array[None])[0]

    @torch.no_grad()
    def _render(self, batch: list[dict]) -> np.ndarray:
        # One generator per row: the pipeline draws each row's initial latents (and any
        # scheduler noise) from its own generator, so rows do not affect each other.
        generators = [torch.Generator().manual_seed(int(row["seed"])) for row in batch]
        output = self.pipe(
            prompt=[row["text"] for row in batch],
            height=self.height,
            width=self.width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            output_type="np",  # float pixels in [0, 1], NaN kept visible
        )
        return output.images
