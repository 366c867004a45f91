"""Tiny MUMU pipelines for tests and for trying the API without any download."""

from __future__ import annotations

from pathlib import Path

from .build import build_pipeline
from .config import load_model_config


def tiny_pipeline(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Build the `tiny` profile (random weights), save it to `path`, and return `path`.

    Load it back with `MUMUPipeline.from_pretrained(path)`, the code real checkpoints use.
    """
    path = Path(path)
    pipeline = build_pipeline(load_model_config("tiny", {"seed": seed, **overrides}))
    pipeline.save_pretrained(path)
    return path
