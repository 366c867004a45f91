"""Evaluation of MUMU pipelines: DreamBench metrics, multimodal CLIP score, face consistency,
slot binding of multi-subject prompts, text adherence against SDXL, on versioned prompt suites,
logged to MLflow.

The package is named `eval`: use `import eval.run` or `from eval import evaluate`. A module
that does `import eval` hides the builtin `eval()` in that module (nothing else).

Names are imported lazily, so `eval.compare` and `eval.suites` do not pay for torch/diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalModels": "run",
    "EvalResult": "run",
    "PipelineFolderError": "run",
    "evaluate": "run",
    "EntryError": "suites",
    "Suite": "suites",
    "SuiteError": "suites",
    "builtin_suites": "suites",
    "load_suite": "suites",
    "resolve_suites": "suites",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
