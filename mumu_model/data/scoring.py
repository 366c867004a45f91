"""PickScore: how much people would like an image for a prompt (paper §2 Data).

The paper kept only SDXL images above a minimum PickScore. PickScore_v1 is a CLIP ViT-H/14
fine-tuned on Pick-a-Pic preferences; its score is `logit_scale.exp() * cos(text, image)`, as in
the reference code (github.com/yuvalkirstain/PickScore): the processor comes from the base
LAION CLIP, text is truncated to 77 tokens, both embeddings are L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pooled_features(output) -> torch.Tensor:
    """transformers 5 returns CLIP's projected embeddings as `pooler_output`; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ImageEmbedder:
    """A vision model that embeds images in batches: L2-normalised, float32 on the CPU, one row
    per image. A subclass loads the model and says how a batch becomes features (`features`)."""

    def __init__(self, model: torch.nn.Module, dim: int, *, batch_size: int, device: str | torch.device,
                 dtype: torch.dtype):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.dim = dim
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype

    def features(self, batch: list[Image.Image]) -> torch.Tensor:
        """[B, dim] features of RGB images (not normalised)."""
        raise NotImplementedError

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, dim]. Images are converted as everywhere in MUMU (alpha over black)."""
        chunks = [l2_normalize(self.features([to_rgb(image) for image in images[start:start + self.batch_size]])).cpu()
                  for start in range(0, len(images), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)


class ClipEmbedder(ImageEmbedder):
    """L2-normalised CLIP image and text embeddings (`CLIPModel`), in batches, float32 on the
    CPU. The one CLIP wrapper of the project: PickScore here, CLIP-I/CLIP-T in `eval`."""

    def __init__(
        self,
        model: str | Path,
        processor: str | Path | None = None,
        *,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.processor = AutoProcessor.from_pretrained(str(processor or model), trust_remote_code=False)
        clip = CLIPModel.from_pretrained(str(model), dtype=dtype, use_safetensors=True)
        super().__init__(clip, clip.config.projection_dim, batch_size=batch_size, device=device, dtype=dtype)

    def features(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
        return pooled_features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D]. Texts are padded to 77 tokens so a text's embedding never depends on its batch."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.processor.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt",
            ).to(self.device)
            chunks.append(l2_normalize(pooled_features(self.model.get_text_features(**inputs))).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


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
        if processor is None:
            # PickScore_v1 ships no processor of its own; its reference code uses LAION's.
            processor = PICKSCORE_PROCESSOR if model == PICKSCORE_MODEL else model
        self.clip = ClipEmbedder(model, processor, batch_size=batch_size, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.skipped = Skipped()

    def score(
        self,
        texts: list[str],
        images: list[Image.Image],
        *,
        ids: list[str] | None = None,
        skipped: Skipped | None = None,
    ) -> np.ndarray:
        """PickScore of each (texts[i], images[i]) pair, float32, shape (len(texts),):
        `logit_scale.exp() * cos(text_emb, image_emb)`, as PickScore's reference code.

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
                valid.append((index, text, to_rgb(image)))
            except Exception as err:  # noqa: BLE001 - bad input is counted, not raised
                skipped.add("unscorable", ids[index], f"image: {type(err).__name__}: {err}")
        if valid:
            text_embeds = self.clip.texts([text for _, text, _ in valid])
            image_embeds = self.clip.images([image for _, _, image in valid])
            # The diagonal of the reference's `text_embs @ image_embs.T`: each text with its image.
            values = self.clip.logit_scale * (text_embeds * image_embeds).sum(dim=-1)
            scores[[index for index, _, _ in valid]] = values.numpy()
        return scores


def filter_by_score(table: pd.DataFrame, min_score: float, min_quantile: float = 0.0) -> tuple[pd.DataFrame, dict]:
    """Keep rows with `score >= min_score` (NaN scores are dropped) and describe the cut.

    `min_quantile` > 0 also drops the rows below that quantile of the table's scores: the cut
    for a scorer whose scale is not calibrated (the toy CLIP) is "the worst 10%", not a number.

    Returns the kept rows (original index) and JSON-able stats for asset metadata: rows in and
    out, kept fraction, rows without a score, and score quantiles of the input, so the
    threshold can be judged against the distribution it cut. Where the table knows which
    images are defective (a `defect` column, from a renderer that made them so on purpose),
    also the filter's precision and recall at rejecting them.
    """
    if "score" not in table.columns:
        raise ValueError(f"table has no 'score' column (columns: {list(table.columns)})")
    if not np.isfinite(min_score):
        raise ValueError(f"min_score must be finite, got {min_score}")
    if not 0.0 <= min_quantile < 1.0:
        raise ValueError(f"min_quantile must be in [0, 1), got {min_quantile}")
    scores = pd.to_numeric(table["score"], errors="coerce")
    present = scores.dropna()
    threshold = float(min_score)
    if min_quantile > 0 and len(present):
        threshold = max(threshold, float(present.quantile(min_quantile)))
    keep = scores >= threshold
    kept = table[keep]
    stats = {
        "min_score": float(min_score),
        "threshold": threshold,
        "rows_in": int(len(table)),
        "rows_out": int(len(kept)),
        "rows_without_score": int(len(table) - len(present)),
        "kept_fraction": float(len(kept) / len(table)) if len(table) else 0.0,
        "score_quantiles": (
            {f"q{round(q * 100):02d}": float(present.quantile(q)) for q in QUANTILES} if len(present) else {}
        ),
    }
    if "defect" in table.columns and table["defect"].notna().any():
        stats["defects"] = defect_stats(table["defect"], ~keep)
    return kept, stats


def defect_stats(defect: pd.Series, rejected: pd.Series) -> dict:
    """How well a filter rejected the images made wrong on purpose: `defect` is the kind of
    each image's deliberate defect (None: a good image), `rejected` whether the filter dropped
    it. Precision is None when nothing was rejected."""
    defective = defect.notna()
    caught = int((defective & rejected).sum())
    return {
        "images": int(len(defect)),
        "defective": int(defective.sum()),
        "rejected": int(rejected.sum()),
        "caught": caught,
        "precision": caught / int(rejected.sum()) if rejected.any() else None,
        "recall": caught / int(defective.sum()) if defective.any() else None,
        "by_kind": {str(k): int(v) for k, v in defect[defective & rejected].value_counts().items()},
    }
