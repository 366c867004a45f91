"""The `toy` profile, the embedded default: the toy world (`mumu_model.toy`) plugged into the graph.

Nothing can be downloaded, so every model is small and made here: a procedural renderer stands
in for SDXL (`ToyRendererSynthesis`, which also knows its boxes and makes some images wrong on
purpose), those boxes stand in for GroundingDINO, and the `pretrained` group trains the VAE and
a CLIP (PickScore's role, and the evaluation's CLIP) on the renders, in about a minute each.
This is the only module of the graph that imports the toy world.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# live annotations.
from pathlib import Path

import dagster as dg

from mumu_model.data import steps
from mumu_model.data.report import Skipped

from ..data_assets import synthetic_images
from ..datasets import SCORER_MODEL, SYNTHETIC_IMAGES, VAE_MODEL
from ..eval_assets import EvalModelsResource
from ..metadata import dataset_metadata
from ..params import params
from ..resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, DetectorBackend, RealImageModels, ScorerBackend,
    SynthesisBackend,
)
from ..training_assets import TrainingCluster

SETTINGS = params(group="pretrained")


class ToyRendererSynthesis(SynthesisBackend):
    """The toy world's renderer: square images of coloured shapes drawn from the prompt's words,
    with their boxes; `defect_probability` of them drawn wrong on purpose (for the filter)."""

    defect_probability: float = 0.1

    def build_synthesizer(self, height: int, width: int, steps: int, guidance: float, batch_size: int):
        from mumu_model.toy.world import ToyRenderer

        if height != width:
            raise ValueError(f"the toy renderer draws square images; got {width}x{height}")
        return ToyRenderer(size=height, defect_probability=self.defect_probability)


class RendererBoxes(DetectorBackend):
    """The boxes the renderer drew, read from the synthesis manifests (`*.parquet`) in the
    `annotations` folder: what GroundingDINO finds in a real photograph, known exactly here."""

    annotations: str

    def build_detector(self, box_threshold: float, text_threshold: float):
        from mumu_model.data.detection import AnnotationsDetector

        return AnnotationsDetector(_boxes_by_key(Path(self.annotations)))


def _boxes_by_key(folder: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """`{pair_id: [(shape, box), ...]}` from the manifests the synthesis step writes beside its shards."""
    import json

    import pandas as pd

    manifests = sorted(folder.glob("*.parquet"))
    if not manifests:
        raise FileNotFoundError(f"no synthesis manifests (*.parquet) in {folder}: materialize synthetic_images first")
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    for manifest in manifests:
        table = pd.read_parquet(manifest, columns=["pair_id", "annotations"])
        for pair_id, drawn in zip(table["pair_id"], table["annotations"]):
            if drawn is None:
                continue
            objects = json.loads(drawn).get("objects", [])
            boxes[pair_id] = [(obj["shape"], obj["box"]) for obj in objects]
    return boxes


def _renders(storage: DatasetStorage, skipped: Skipped, keep_defective: bool):
    """(image, prompt text) of every synthetic image, shard by shard."""
    for shard in sorted(SYNTHETIC_IMAGES.path(storage).glob("*.tar")):
        for _key, image, meta in steps.iter_images(shard, skipped):
            annotations = meta.get("annotations") or {}
            if not keep_defective and annotations.get("defect"):
                skipped.add("deliberate_defect", _key)
                continue
            yield image, meta["text"]


def _training_metadata(out, metrics: dict, images: int, skipped: Skipped) -> dict:
    metadata = dataset_metadata(out, images + skipped.total, images, skipped)
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metadata[name] = dg.MetadataValue.float(float(value)) if isinstance(value, float) else dg.MetadataValue.int(value)
    return metadata


class ToyVaeConfig(dg.Config):
    steps: int = SETTINGS.get("vae", {}).get("steps", 400)
    batch_size: int = SETTINGS.get("vae", {}).get("batch_size", 32)
    lr: float = SETTINGS.get("vae", {}).get("lr", 1e-3)
    seed: int = 0


@dg.asset(group_name="pretrained", deps=[synthetic_images], kinds={"pytorch"})
def vae_model(context: dg.AssetExecutionContext, config: ToyVaeConfig, storage: DatasetStorage) -> dg.MaterializeResult:
    """A small AutoencoderKL trained on every render (32 px -> 16x16x4 latents)."""
    from mumu_model.toy.pretrained import train_toy_vae

    skipped = Skipped()
    images = [image for image, _ in _renders(storage, skipped, keep_defective=True)]
    if not images:
        raise dg.Failure("no synthetic images to train the VAE on: materialize synthetic_images first")
    out = VAE_MODEL.path(storage)
    metrics = train_toy_vae(images, out, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                            seed=config.seed, log=context.log.info)
    return dg.MaterializeResult(metadata=_training_metadata(out, metrics, len(images), skipped))


class ToyScorerConfig(dg.Config):
    steps: int = SETTINGS.get("scorer", {}).get("steps", 600)
    batch_size: int = SETTINGS.get("scorer", {}).get("batch_size", 64)
    lr: float = SETTINGS.get("scorer", {}).get("lr", 1e-3)
    seed: int = 0


@dg.asset(group_name="pretrained", deps=[synthetic_images], kinds={"pytorch"})
def scorer_model(
    context: dg.AssetExecutionContext, config: ToyScorerConfig, storage: DatasetStorage
) -> dg.MaterializeResult:
    """A small CLIP trained contrastively on the renders and their prompts, with colour-swapped
    and object-dropped captions as hard negatives. The renders made wrong on purpose are left
    out: a scorer is pretrained on other data than what it will judge (PickScore was)."""
    from mumu_model.toy.pretrained import train_toy_clip

    skipped = Skipped()
    pairs = list(_renders(storage, skipped, keep_defective=False))
    if not pairs:
        raise dg.Failure("no synthetic images to train the scorer on: materialize synthetic_images first")
    out = SCORER_MODEL.path(storage)
    images, texts = zip(*pairs)
    metrics = train_toy_clip(list(images), list(texts), out, steps=config.steps, batch_size=config.batch_size,
                             lr=config.lr, seed=config.seed, log=context.log.info)
    return dg.MaterializeResult(metadata=_training_metadata(out, metrics, len(pairs), skipped))


PRETRAINED = [vae_model, scorer_model]


def toy_resources(root: str | None = None, cache: str | None = None) -> dict:
    """The toy world: a renderer for SDXL, its known boxes for GroundingDINO, and a CLIP
    trained by the graph (under `root`/models, default the params' `data.root`) for PickScore
    and the evaluation's CLIP."""
    from mumu_model.data.storage import DatasetRoot

    root = root or params().get("root", "data")
    # The scorer and the renders' boxes are read as local files: with a URL root, from its mirror.
    local = str(DatasetRoot(root, cache).cache)
    scorer = str(SCORER_MODEL.under(local))
    return {
        "storage": DatasetStorage(root=root, cache=cache),
        "content_style_backend": ContentStyleBackend(backend="rules"),
        "synthesis_backend": ToyRendererSynthesis(defect_probability=0.1),
        "scorer_backend": ScorerBackend(model=scorer, device="cpu"),
        "detector_backend": RendererBoxes(annotations=str(SYNTHETIC_IMAGES.under(local))),
        "real_image_models": RealImageModels(),  # no photographs in this world
        "control_image_models": ControlImageModels(),  # canny only
        "training_cluster": TrainingCluster(nnodes=1, nproc_per_node=1),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "eval_models": EvalModelsResource(clip=scorer, pickscore=scorer, face=None),
    }
