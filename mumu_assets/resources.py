"""Resources: where datasets live, and which model backs each data step.

Profiles swap the backends (mumu_assets.profiles); the assets never name a model. Backends an
asset calls once per run are built on demand (`build_*`); the others load on first use and are
kept for the rest of the run (`get()`).

Every backend's `device` is resolved per worker by `mumu_model.devices.worker_device`: "auto"
(the default) is this worker's own GPU (MUMU_DEVICE, LOCAL_RANK, CUDA_VISIBLE_DEVICES), else
the CPU, so workers sharing a multi-GPU host do not all load onto GPU 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr


def _device(resource: dg.ConfigurableResource) -> str:
    """The resource's `device` setting resolved for this worker ("auto": its own GPU, else cpu)."""
    from mumu_model.devices import worker_device

    return worker_device(resource.device, setting=f"{type(resource).__name__}.device")


class DatasetStorage(dg.ConfigurableResource):
    """Where every dataset is written: a folder (the DVC-tracked `data/`) or an fsspec URL
    (`s3://bucket/mumu`; `mumu_model.data.storage`). With a URL, a step works on a local cache
    and its complete outputs are uploaded when it ends; the root is checked when the step
    starts, failing within `timeout_s` with an error naming `data.root`."""

    root: str = "data"
    cache: str | None = None  # the local mirror of a URL root (default ~/.cache/mumu/<hash>)
    storage_options: dict = {}  # fsspec options: credentials, endpoint_url, timeouts
    timeout_s: float = 30.0
    _root: Any = PrivateAttr(default=None)
    _started: float = PrivateAttr(default=0.0)

    def _datasets(self):
        if self._root is None:
            from mumu_model.data.storage import DatasetRoot

            self._root = DatasetRoot(self.root, self.cache, self.storage_options, self.timeout_s)
        return self._root

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import time

        from mumu_model.data.storage import StorageError

        self._started = time.time()
        try:
            self._datasets().check()
        except StorageError as err:
            raise dg.Failure(str(err), allow_retries=False) from None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        uploaded = self._datasets().publish(self._started)
        if uploaded and context.log is not None:
            context.log.info(f"uploaded {len(uploaded)} file(s) to {self.root}")

    def path(self, *parts: str) -> Path:
        return self._datasets().local(*parts)


class _CachedBackend(dg.ConfigurableResource):
    _backend: Any = PrivateAttr(default=None)

    def get(self):
        if self._backend is None:
            self._backend = self._build()
        return self._backend

    def _build(self):
        raise NotImplementedError


class ContentStyleBackend(_CachedBackend):
    """Splits prompts into content and style: `rules`, `transformers` (a local causal LM, e.g.
    SmolLM2 as GGUF) or `openai` (an OpenAI-compatible endpoint such as vLLM)."""

    backend: str = "rules"
    model: str | None = None
    gguf_file: str | None = None
    base_url: str | None = None
    fallback_to_rules: bool = True
    device: str = "auto"

    def _build(self):
        from mumu_model.data.content_style import (
            FallbackSplitter, OpenAIChatSplitter, RuleBasedSplitter, TransformersChatSplitter,
        )

        if self.backend == "rules":
            return RuleBasedSplitter()
        if self.backend == "transformers":
            if not self.model:
                raise ValueError("content_style backend 'transformers' needs `model` (a path or hub id)")
            primary = TransformersChatSplitter(self.model, gguf_file=self.gguf_file, device=_device(self))
        elif self.backend == "openai":
            if not (self.base_url and self.model):
                raise ValueError("content_style backend 'openai' needs `base_url` and `model`")
            primary = OpenAIChatSplitter(self.base_url, self.model)
        else:
            raise ValueError(f"unknown content_style backend {self.backend!r}; use rules, transformers or openai")
        return FallbackSplitter(primary, RuleBasedSplitter()) if self.fallback_to_rules else primary


class SynthesisBackend(dg.ConfigurableResource):
    """Text-to-image for the synthetic half of the data. Profiles pick the implementation:
    `SDXLSynthesis` (paper), the toy world's renderer (`mumu_assets.profiles.toy`)."""

    def build_synthesizer(self, height: int, width: int, steps: int, guidance: float, batch_size: int):
        """A synthesizer (`generate(rows, skipped)`, see `mumu_model.data.steps.synthesize`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build_synthesizer")


class SDXLSynthesis(SynthesisBackend):
    """SDXL base (`model` a hub id or folder), as the paper renders its synthetic images."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"

    def build_synthesizer(self, height: int, width: int, steps: int, guidance: float, batch_size: int):
        if not self.model:
            raise ValueError(f"{type(self).__name__} needs `model` (a path or hub id)")
        from mumu_model.data.synthesis import SDXLSynthesizer
        from mumu_model.devices import resolve_device_dtype

        device = _device(self)
        try:
            device, dtype = resolve_device_dtype(device, self.dtype)
        except ValueError as err:  # "dtype 'int8': ..." -> "SDXLSynthesis.dtype 'int8': ..."
            raise ValueError(f"{type(self).__name__}.{err}") from None
        return SDXLSynthesizer(
            self.model, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
            batch_size=batch_size, device=device, dtype=dtype,
        )


class ScorerBackend(_CachedBackend):
    """PickScore: a CLIP model fine-tuned on human preferences (yuvalkirstain/PickScore_v1)."""

    model: str
    processor: str | None = None
    device: str = "auto"

    def _build(self):
        from mumu_model.data.scoring import PickScorer

        return PickScorer(self.model, self.processor, device=_device(self))


class DetectorBackend(dg.ConfigurableResource):
    """Boxes of caption phrases. Profiles pick the implementation: `GroundingDinoDetection`
    (paper), the boxes the toy world's renderer knows (`mumu_assets.profiles.toy`)."""

    def build_detector(self, box_threshold: float, text_threshold: float):
        """A `mumu_model.data.detection.Detector`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build_detector")


class GroundingDinoDetection(DetectorBackend):
    """Open-vocabulary detection with GroundingDINO through transformers (`model` a hub id or folder)."""

    model: str | None = None
    device: str = "auto"

    def build_detector(self, box_threshold: float, text_threshold: float):
        from mumu_model.data.detection import GroundingDinoDetector

        if not self.model:
            raise ValueError(f"{type(self).__name__} needs `model` (a path or hub id)")
        return GroundingDinoDetector(
            self.model, box_threshold=box_threshold, text_threshold=text_threshold, device=_device(self)
        )


class RealImageModels(dg.ConfigurableResource):
    """Models of the real-photo branch (paper: LLaVA 1.6 captions; SFW, watermark and person
    filters). A filter whose model is None is off, and the asset's metadata says so."""

    captioner: str | None = None
    person_detector: str | None = None
    sfw_classifier: str | None = None
    sfw_reject_labels: list[str] = ["nsfw"]
    watermark_classifier: str | None = None
    watermark_reject_labels: list[str] = ["watermark"]
    device: str = "auto"

    def describe(self) -> dict:
        return {
            "captioner": self.captioner or "off (the source's own captions)",
            "person_detector": self.person_detector or "off",
            "sfw_classifier": self.sfw_classifier or "off",
            "watermark_classifier": self.watermark_classifier or "off",
        }

    def ingest_kwargs(self, min_side: int, max_people: int) -> dict:
        from mumu_model.data.real_images import (
            DetrPersonCounter, ImageClassifierFilter, LlavaNextCaptioner, MinResolution,
        )

        device = _device(self)
        filters = [MinResolution(min_side)]
        if self.sfw_classifier:
            filters.append(ImageClassifierFilter(self.sfw_classifier, self.sfw_reject_labels, name="nsfw", device=device))
        if self.watermark_classifier:
            filters.append(ImageClassifierFilter(
                self.watermark_classifier, self.watermark_reject_labels, name="watermark", device=device
            ))
        return {
            "filters": filters,
            "person_counter": DetrPersonCounter(self.person_detector, device=device) if self.person_detector else None,
            "max_people": max_people,
            "captioner": LlavaNextCaptioner(self.captioner, device=device) if self.captioner else None,
        }


class ControlImageModels(_CachedBackend):
    """Whole-image control images for stage 1: canny is computed; depth and sketch are models
    (e.g. Depth Anything V2; PiDiNet) and are used only when configured."""

    depth: str | None = None
    sketch: str | None = None
    device: str = "auto"

    def _build(self) -> dict:
        from mumu_model.data.captions import (
            CannyBackend, PidiNetSketchBackend, TransformersDepthBackend,
        )

        backends = {"canny": CannyBackend()}
        if self.depth:
            backends["depth"] = TransformersDepthBackend(self.depth, device=_device(self))
        if self.sketch:
            backends["sketch"] = PidiNetSketchBackend(self.sketch)
        return backends
