"""Face consistency: is the person in the output the person of the prompt's face image?

Two backends behind one interface (`FaceEmbedder.faces(image) -> [Face]`, best face first):
- `DlibFaceEmbedder` (the offline default): dlib's HOG face detector, 5-point landmarks and
  its ResNet 128-d face descriptor, using the .dat files shipped in the
  `face-recognition-models` package (`pip install face-recognition-models==0.3.0 --no-deps
  dlib-bin`). Same person ~0.2 L2 distance, different people ~0.7; dlib's threshold is 0.6.
  The `face_recognition` package is not needed, nor is `face_recognition_models` imported
  (its `__init__` needs pkg_resources, which new setuptools no longer ships): the files are
  found through the package's import spec.
- `ArcFaceEmbedder`: insightface's antelopev2 (512-d ArcFace), what InstantID and the paper
  use; an optional extra (`pip install insightface onnxruntime` plus the antelopev2 model
  folder), with a clear ImportError when absent.

`face_similarity` compares each reference face with the most similar face found in an output:
cosine similarity (the InstantID convention) and L2 distance (dlib's own). An output with no
face scores similarity 0 and is counted, like an object the detector does not find.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from mumu_model.images import to_rgb

INSIGHTFACE_HINT = (
    "the ArcFace face backend needs insightface and onnxruntime (pip install insightface onnxruntime) "
    "and the antelopev2 models in <root>/models/antelopev2; the offline default is face='dlib' "
    "(pip install face-recognition-models==0.3.0 --no-deps dlib-bin)"
)
DLIB_HINT = "the dlib face backend needs dlib-bin and face-recognition-models: pip install face-recognition-models==0.3.0 --no-deps dlib-bin"


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels
    score: float  # the detector's confidence
    embedding: np.ndarray  # float32, the backend's own (not normalised for dlib)


@runtime_checkable
class FaceEmbedder(Protocol):
    name: str

    def faces(self, image: Image.Image) -> list[Face]:
        """Every face found in the image, best first (the backend's notion of main face)."""
        ...


def face_recognition_models_dir() -> Path:
    """The `models/` folder of the installed face-recognition-models package, without importing it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(DLIB_HINT)
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaceEmbedder:
    """dlib's 128-d face descriptor (dlib_face_recognition_resnet_model_v1).

    Faces come best-scored first: dlib's HOG detector also fires on face-like things (the
    mission patch on the astronaut's suit), and its score puts the real face first where the
    boxes' sizes tie.
    """

    name = "dlib"

    def __init__(self, models_dir: str | Path | None = None, *, upsample: int = 1, jitters: int = 0):
        try:
            import dlib
        except ImportError as err:
            raise ImportError(DLIB_HINT) from err
        models = Path(models_dir) if models_dir is not None else face_recognition_models_dir()
        predictor = models / "shape_predictor_5_face_landmarks.dat"
        recognizer = models / "dlib_face_recognition_resnet_model_v1.dat"
        for path in (predictor, recognizer):
            if not path.is_file():
                raise FileNotFoundError(f"dlib face model {path} is missing; {DLIB_HINT}")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor))
        self._recognizer = dlib.face_recognition_model_v1(str(recognizer))
        self.upsample = upsample  # 1 finds faces down to ~40 px (dlib's face_recognition default)
        self.jitters = jitters

    def faces(self, image: Image.Image) -> list[Face]:
        pixels = np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8))
        rectangles, scores, _ = self._detector.run(pixels, self.upsample, 0.0)
        found = []
        for rectangle, score in zip(rectangles, scores):
            shape = self._predictor(pixels, rectangle)
            embedding = np.asarray(self._recognizer.compute_face_descriptor(pixels, shape, self.jitters), np.float32)
            box = (float(rectangle.left()), float(rectangle.top()), float(rectangle.right()), float(rectangle.bottom()))
            found.append(Face(box, float(score), embedding))
        return sorted(found, key=lambda face: -face.score)


class ArcFaceEmbedder:
    """insightface's antelopev2 ArcFace (512-d), set up as InstantID does; the largest face first."""

    name = "arcface"

    def __init__(
        self,
        root: str | Path = "~/.insightface",
        *,
        model: str = "antelopev2",
        det_size: int = 640,
        device: str = "cpu",
    ):
        try:
            from insightface.app import FaceAnalysis
        except ImportError as err:
            raise ImportError(INSIGHTFACE_HINT) from err
        gpu = int(device.partition(":")[2] or 0) if device.startswith("cuda") else None  # this worker's GPU, not GPU 0
        providers = ([("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"] if gpu is not None
                     else ["CPUExecutionProvider"])
        try:
            self._app = FaceAnalysis(name=model, root=str(Path(root).expanduser()), providers=providers)
        except (AssertionError, FileNotFoundError, OSError) as err:  # insightface asserts on missing files
            raise FileNotFoundError(f"cannot load insightface {model} from {root}: {err}; {INSIGHTFACE_HINT}") from err
        self._app.prepare(ctx_id=gpu if gpu is not None else -1, det_size=(det_size, det_size))

    def faces(self, image: Image.Image) -> list[Face]:
        bgr = np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8)[:, :, ::-1])
        found = [
            Face(tuple(float(v) for v in face.bbox), float(face.det_score), np.asarray(face.normed_embedding, np.float32))
            for face in self._app.get(bgr)
        ]
        return sorted(found, key=lambda face: -(face.box[2] - face.box[0]) * (face.box[3] - face.box[1]))


def load_face_embedder(spec: str | FaceEmbedder | None, device: str = "cpu") -> FaceEmbedder | None:
    """"dlib", "dlib:MODELS_DIR", "arcface", "arcface:ROOT", an embedder, or None (no face metric)."""
    if spec is None or isinstance(spec, FaceEmbedder):
        return spec
    backend, _, location = str(spec).partition(":")
    if backend == "dlib":
        return DlibFaceEmbedder(location or None)
    if backend == "arcface":
        return ArcFaceEmbedder(location or "~/.insightface", device=device)
    raise ValueError(f"face backend {spec!r}: use 'dlib', 'dlib:MODELS_DIR', 'arcface' or 'arcface:ROOT'")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


@dataclass(frozen=True)
class FaceScore:
    similarity: float  # mean over reference faces of the best cosine in the output; 0 for a face not found
    distance: float  # mean L2 distance over the reference faces that were found; NaN if none
    found: int  # reference faces matched by a face in the output
    total: int  # reference faces


def face_similarity(
    embedder: FaceEmbedder, outputs: Sequence[Image.Image], references: Sequence[np.ndarray]
) -> list[FaceScore]:
    """Per output, how well it keeps each reference face (embeddings of the references' main face).

    Each reference face is compared with every face in the output and keeps the most similar,
    so a group scene is judged on the right person. No face in the output: similarity 0.
    """
    results = []
    for output in outputs:
        found = embedder.faces(output)
        similarities, distances = [], []
        for reference in references:
            if not found:
                similarities.append(0.0)
                continue
            best = max(found, key=lambda face: cosine(reference, face.embedding))
            similarities.append(cosine(reference, best.embedding))
            distances.append(float(np.linalg.norm(reference - best.embedding)))
        results.append(
            FaceScore(
                similarity=float(np.mean(similarities)) if similarities else math.nan,
                distance=float(np.mean(distances)) if distances else math.nan,
                found=len(distances),
                total=len(references),
            )
        )
    return results
