"""MUMU: image generation from multimodal prompts.

Exports are resolved lazily so that light users (the data assets, the prompt format) do not
pay for importing torch, transformers and diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "MultimodalPrompt": "mumu_model.prompt",
    "PromptError": "mumu_model.prompt",
    "ModelConfig": "mumu_model.config",
    "PROFILES": "mumu_model.config",
    "load_model_config": "mumu_model.config",
    "build_pipeline": "mumu_model.build",
    "MUMUEncoder": "mumu_model.encoder",
    "MUMUAdapter": "mumu_model.adapter",
    "MUMUPipeline": "mumu_model.pipeline",
    "MUMUPipelineOutput": "mumu_model.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mumu_model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
