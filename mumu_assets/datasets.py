"""The layout of the data root: every dataset the graph reads or writes, named once.

A dataset is a folder or a file under `DatasetStorage.root`. A sharded one holds one file per
shard, `<shard><suffix>`. dvc.yaml tracks the same folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class _Storage(Protocol):
    def path(self, *parts: str) -> Path: ...


@dataclass(frozen=True)
class Dataset:
    parts: tuple[str, ...]
    suffix: str = ""  # a sharded dataset's file suffix (".tar", ".parquet")

    def path(self, storage: _Storage, shard: str | None = None) -> Path:
        """The dataset in `storage` (its local path), or one shard's file of it. With a URL root,
        the whole dataset is fetched to the local mirror: ask for a shard, or a `member`, when
        one is all a step reads or writes."""
        return storage.path(*self.parts) if shard is None else storage.path(*self.parts, f"{shard}{self.suffix}")

    def member(self, storage: _Storage, name: str) -> Path:
        """One file or folder `name` of the dataset in `storage` (only it is fetched)."""
        return storage.path(*self.parts, name)

    def under(self, root: str | Path) -> Path:
        """The dataset under a local data folder."""
        return Path(root, *self.parts)


RAW_PROMPTS = Dataset(("prompts", "raw_prompts.parquet"))
PROMPT_PAIRS = Dataset(("prompts", "pairs.parquet"))  # content x style pairs for synthesis
SYNTHETIC_IMAGES = Dataset(("synthetic", "images"), ".tar")  # with the renderer's manifests
PICKSCORES = Dataset(("synthetic", "pickscore"), ".parquet")
FILTERED = Dataset(("synthetic", "filtered"), ".parquet")  # the keys PickScore kept
REAL_IMAGES = Dataset(("real", "images"), ".tar")
DETECTIONS = Dataset(("detections",), ".parquet")
CAPTIONS = {1: Dataset(("captions", "stage1"), ".tar"), 2: Dataset(("captions", "stage2"), ".tar")}
PREVIEWS = Dataset(("previews",))
VAE_MODEL = Dataset(("models", "vae"))  # models the graph trains (toy profile)
SCORER_MODEL = Dataset(("models", "scorer"))
EVALUATIONS = Dataset(("evaluation",))  # one folder per evaluation run
EVALUATION_SUMMARY = Dataset(("evaluation.json",))  # the latest evaluation's summary
