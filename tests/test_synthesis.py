import copy

import numpy as np
import pytest
import torch

from mumu_model.data.report import Skipped
from mumu_model.data.synthesis import SDXLSynthesizer
from mumu_model.testing import tiny_sdxl_pipeline


SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16x16 latents


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def loaded(sdxl_dir):
    """Loaded once by path, as a real checkpoint is; tests take copies with their own settings."""
    return SDXLSynthesizer(str(sdxl_dir), height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0)


def synthesizer(loaded: SDXLSynthesizer, batch_size: int) -> SDXLSynthesizer:
    synth = copy.copy(loaded)  # shares the pipeline, not the batch size or the counts
    synth.batch_size = batch_size
    synth.skipped = Skipped()
    return synth


ROWS = [
    {"pair_id": "p0", "text": "a man and a dog hiking", "seed": 0},
    {"pair_id": "p1", "text": "a cat, abstract geometric style", "seed": 1},
    {"pair_id": "p2", "text": "a red car at night", "seed": 2},
]


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_generates_one_image_per_row_in_order(loaded):
    synth = synthesizer(loaded, batch_size=2)
    out = list(synth.generate(ROWS))
    assert [row["pair_id"] for row, _ in out] == ["p0", "p1", "p2"]
    for _, image in out:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    assert synth.skipped.total == 0
    # Different seeds and texts give different images.
    assert np.abs(as_array(out[0][1]) - as_array(out[1][1])).max() > 0


def test_image_depends_only_on_its_own_row(loaded):
    (_, image_alone), = synthesizer(loaded, batch_size=1).generate([ROWS[1]])
    batched = {row["pair_id"]: image for row, image in synthesizer(loaded, batch_size=3).generate(ROWS)}
    # Same row, same seed: identical pixels whether rendered alone or beside two other rows
    # (at most one 8-bit level of float noise from the different batch shapes).
    assert np.abs(as_array(image_alone) - as_array(batched["p1"])).max() <= 1
    # And the same row with another seed differs, so the check above is not vacuous.
    other = next(synthesizer(loaded, batch_size=1).generate([{**ROWS[1], "seed": 99}]))[1]
    assert np.abs(as_array(image_alone) - as_array(other)).max() > 1


def test_bad_rows_are_skipped_and_counted(loaded):
    rows = [
        ROWS[0],
        {"pair_id": "no-seed", "text": "a dog"},
        {"pair_id": "bad-seed", "text": "a dog", "seed": "7"},
        {"pair_id": "empty", "text": "  ", "seed": 3},
        "not a row",
        {"pair_id": "numpy-seed", "text": "a dog", "seed": np.int64(5)},
    ]
    skipped = Skipped()
    out = list(synthesizer(loaded, batch_size=4).generate(rows, skipped=skipped))
    assert [row["pair_id"] for row, _ in out] == ["p0", "numpy-seed"]
    assert skipped.counts == {"bad_row": 4}


def test_failed_generation_is_skipped_not_raised(loaded, monkeypatch):
    synth = synthesizer(loaded, batch_size=3)
    real_render = synth._render

    def flaky_render(batch):
        # Fails for any batch holding the poisoned row, like an OOM or a crash on one prompt.
        if any(row["pair_id"] == "p1" for row in batch):
            raise RuntimeError("boom")
        return real_render(batch)

    monkeypatch.setattr(synth, "_render", flaky_render)
    out = list(synth.generate(ROWS))
    assert [row["pair_id"] for row, _ in out] == ["p0", "p2"]
    assert synth.skipped.counts == {"generation_error": 1}
    assert synth.skipped.examples["generation_error"] == ["p1: RuntimeError: boom"]


def test_nan_and_black_outputs_are_skipped(loaded, monkeypatch):
    synth = synthesizer(loaded, batch_size=3)
    real_render = synth._render

    def broken_render(batch):
        arrays = real_render(batch)
        arrays[0] = np.nan  # an fp16 VAE overflow
        arrays[1] = 0.0
        return arrays

    monkeypatch.setattr(synth, "_render", broken_render)
    out = list(synth.generate(ROWS))
    assert [row["pair_id"] for row, _ in out] == ["p2"]
    assert synth.skipped.counts == {"nonfinite_output": 1, "black_image": 1}


def test_loads_only_safetensors(tmp_path):
    path = tiny_sdxl_pipeline(tmp_path / "sdxl")
    for weights in path.glob("*/*.safetensors"):
        torch.save({}, weights.with_suffix(".bin"))
        weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        SDXLSynthesizer(str(path))
