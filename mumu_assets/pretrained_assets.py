"""The pretrained parts a profile starts from, as assets of the `pretrained` group.

Both profiles have the same two keys, so the graph is the same:
- `scorer_model`: the CLIP that scores synthetic images against their prompts (PickScore's role)
  and that the evaluation reads for CLIP-I/CLIP-T;
- `vae_model`: the autoencoder whose latents the UNet is trained in.

In the paper profile they are hub checkpoints, declared (not built) so lineage shows what the
data and the model depend on. Nothing can be downloaded for the toy profile, so there the graph
trains both on its own renders, in about a minute each.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# live annotations.
import dagster as dg

from mumu_model.data import steps
from mumu_model.data.report import Skipped

from .data_assets import synthetic_images
from .metadata import dataset_metadata
from .params import params
from .resources import DatasetStorage

PRETRAINED = params(group="pretrained")

PAPER_PRETRAINED = [
    dg.AssetSpec(
        "scorer_model", group_name="pretrained", kinds={"huggingface"},
        description="PickScore_v1 (yuvalkirstain/PickScore_v1 on the hub), a CLIP-H fine-tuned on human preferences",
    ),
    dg.AssetSpec(
        "vae_model", group_name="pretrained", kinds={"huggingface"},
        description="SDXL base's VAE (the vae/ of stabilityai/stable-diffusion-xl-base-1.0 on the hub)",
    ),
]


def _renders(storage: DatasetStorage, skipped: Skipped, keep_defective: bool):
    """(image, prompt text) of every synthetic image, shard by shard."""
    for shard in sorted(storage.path("synthetic", "images").glob("*.tar")):
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
    steps: int = PRETRAINED.get("vae", {}).get("steps", 400)
    batch_size: int = PRETRAINED.get("vae", {}).get("batch_size", 32)
    lr: float = PRETRAINED.get("vae", {}).get("lr", 1e-3)
    seed: int = 0


@dg.asset(group_name="pretrained", deps=[synthetic_images], kinds={"pytorch"})
def vae_model(context: dg.AssetExecutionContext, config: ToyVaeConfig, storage: DatasetStorage) -> dg.MaterializeResult:
    """A small AutoencoderKL trained on every render (32 px -> 16x16x4 latents)."""
    from mumu_model.toy.pretrained import train_toy_vae

    skipped = Skipped()
    images = [image for image, _ in _renders(storage, skipped, keep_defective=True)]
    if not images:
        raise dg.Failure("no synthetic images to train the VAE on: materialize synthetic_images first")
    out = storage.path("models", "vae")
    metrics = train_toy_vae(images, out, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                            seed=config.seed, log=context.log.info)
    return dg.MaterializeResult(metadata=_training_metadata(out, metrics, len(images), skipped))


class ToyScorerConfig(dg.Config):
    steps: int = PRETRAINED.get("scorer", {}).get("steps", 600)
    batch_size: int = PRETRAINED.get("scorer", {}).get("batch_size", 64)
    lr: float = PRETRAINED.get("scorer", {}).get("lr", 1e-3)
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
    out = storage.path("models", "scorer")
    images, texts = zip(*pairs)
    metrics = train_toy_clip(list(images), list(texts), out, steps=config.steps, batch_size=config.batch_size,
                             lr=config.lr, seed=config.seed, log=context.log.info)
    return dg.MaterializeResult(metadata=_training_metadata(out, metrics, len(pairs), skipped))


TOY_PRETRAINED = [vae_model, scorer_model]
