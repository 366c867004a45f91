"""PickScore: how much people would like an image for a prompt (paper §2 Data; SPEC §3).

The paper kept only SDXL images above a minimum PickScore. PickScore_v1 is a CLIP ViT-H/14
fine-tuned on Pick-a-Pic preferences; its score is `logit_scale.exp() * cos(text, image)`, as in
the reference code (github.com/yuvalkirstain/PickScore): the processor comes from the base
LAION CLIP, text is truncated to 77 tokens, both embeddings are L2-normalised.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from ..images import to_rgb
from .report import Skipped

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# CLIP's text context. Padding every prompt to it (instead of to the batch's longest) keeps
# tensor shapes, hence the numbers, independent of which prompts share a batch; the score is
# the same either way, because CLIP pools at the EOS token under a causal mask.
MAX_TEXT_TOKENS = 77

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


class PickScorer:
    """Score (text_i, image_i) pairs with a CLIP model; `score` returns one float per pair."""

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        processor: str | None = None,
        *,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if processor is None:
            # PickScore_v1 ships no processor of its own; its reference code uses LAION's.
            processor = PICKSCORE_PROCESSOR if model == PICKSCORE_MODEL else model
        self.processor = AutoProcessor.from_pretrained(processor, trust_remote_code=False)
        self.model = CLIPModel.from_pretrained(model, dtype=dtype, use_safetensors=True).to(device)
        self.model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.skipped = Skipped()

    def score(
        self,
        texts: list[str],
        images: list[Image.Image],
        *,
        ids: list[str] | None = None,
        skipped: Skipped | None = None,
    ) -> np.ndarray:
        """PickScore of each (texts[i], images[i]) pair, float32, shape (len(texts),).

        A pair that cannot be scored (not a string, not a usable image) gets NaN and is counted
        under "unscorable"; `filter_by_score` drops NaN scores.
        """
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images")
        skipped = self.skipped if skipped is None else skipped
        ids = [str(i) for i in range(len(texts))] if ids is None else ids
        scores = np.full(len(texts), np.nan, dtype=np.float32)

        valid: list[tuple[int, str, Image.Image]] = []
        for index, (text, image) in enumerate(zip(texts, images)):
            if not isinstance(text, str):
                skipped.add("unscorable", ids[index], f"text is {type(text).__name__}")
                continue
            try:
                # Same RGB conversion as everywhere in MUMU (alpha over black).
                valid.append((index, text, to_rgb(image)))
            except Exception as err:  # noqa: BLE001 - bad input is counted, not raised
                skipped.add("unscorable", ids[index], f"image: {type(err).__name__}: {err}")

        for start in range(0, len(valid), self.batch_size):
            chunk = valid[start : start + self.batch_size]
            values = self._score_batch([text for _, text, _ in chunk], [image for _, _, image in chunk])
            scores[[index for index, _, _ in chunk]] = values
        return scores

    @torch.no_grad()
    def _score_batch(self, texts: list[str], images: list[Image.Image]) -> np.ndarray:
        text_inputs = self.processor.tokenizer(
            texts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        ).to(self.device)
        image_inputs = self.processor.image_processor(images=images, return_tensors="pt")
        pixel_values = image_inputs["pixel_values"].to(self.device, self.dtype)

        text_embeds = _embeddings(self.model.get_text_features(**text_inputs))
        image_embeds = _embeddings(self.model.get_image_features(pixel_values=pixel_values))
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        # The diagonal of the reference's `text_embs @ image_embs.T`: each text with its image.
        scores = self.model.logit_scale.exp() * (text_embeds * image_embeds).sum(dim=-1)
        return scores.float().cpu().numpy()


def _embeddings(output) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as `pooler_output`; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def filter_by_score(table: pd.DataFrame, min_score: float) -> tuple[pd.DataFrame, dict]:
    """Keep rows with `score >= min_score` (NaN scores are dropped) and describe the cut.

    Returns the kept rows (original index) and JSON-able stats for asset metadata: rows in and
    out, kept fraction, rows without a score, and score quantiles of the input, so the
    threshold can be judged against the distribution it cut.
    """
    if "score" not in table.columns:
        raise ValueError(f"table has no 'score' column (columns: {list(table.columns)})")
    if not np.isfinite(min_score):
        raise ValueError(f"min_score must be finite, got {min_score}")
    scores = pd.to_numeric(table["score"], errors="coerce")
    kept = table[scores >= min_score]
    present = scores.dropna()
    stats = {
        "min_score": float(min_score),
        "rows_in": int(len(table)),
        "rows_out": int(len(kept)),
        "rows_without_score": int(len(table) - len(present)),
        "kept_fraction": float(len(kept) / len(table)) if len(table) else 0.0,
        "score_quantiles": (
            {f"q{round(q * 100):02d}": float(present.quantile(q)) for q in QUANTILES} if len(present) else {}
        ),
    }
    return kept, stats
