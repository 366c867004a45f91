"""A saved pipeline's sampling defaults (model_index.json's `sampling_*`): calls, `mumu generate`
and the registered MLflow model use them when given none; folders saved without them keep the
paper's 50 steps and guidance 6 at the UNet's native size."""

import json
import shutil
from types import SimpleNamespace

import pytest

from mumu_model import MUMUPipeline, MultimodalPrompt
from mumu_model.cli import main
from mumu_model.loading import PipelineFolderError, write_sampling_defaults
from mumu_model.pipeline import PAPER_GUIDANCE, PAPER_STEPS, SamplingDefaults

from .conftest import seeded


def _load(folder) -> MUMUPipeline:
    pipe = MUMUPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def saved(tmp_path, tiny_pipeline_dir):
    """A copy of the tiny pipeline saved with its sampling defaults: 3 steps, guidance 2, 64 px."""
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    assert write_sampling_defaults(folder, 3, 2.0) == {
        "sampling_steps": 3, "sampling_guidance": 2.0, "sampling_resolution": 64}  # None: the native size
    return folder


def test_a_folder_without_them_keeps_the_paper_defaults(tmp_path, tiny_pipeline_dir):
    old = tmp_path / "old"
    shutil.copytree(tiny_pipeline_dir, old)
    index = json.loads((old / "model_index.json").read_text())
    for key in ("sampling_steps", "sampling_guidance", "sampling_resolution"):
        index.pop(key, None)  # as saved before they existed
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = _load(old)
    assert pipe.sampling_defaults == SamplingDefaults(PAPER_STEPS, PAPER_GUIDANCE, pipe.default_sample_size)
    assert pipe.trained_sizes == [pipe.default_sample_size]


def test_a_call_without_settings_takes_the_saved_ones(saved, red_square):
    pipe = _load(saved)
    assert pipe.sampling_defaults == SamplingDefaults(3, 2.0, 64)
    prompt = MultimodalPrompt(["a ", red_square, " circle"])
    image = pipe(prompt, generator=seeded()).images[0]
    assert (pipe.num_timesteps, pipe.guidance_scale, image.size) == (3, 2.0, (64, 64))
    # What the caller gives wins.
    image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, height=32, width=32, generator=seeded()).images[0]
    assert (pipe.num_timesteps, pipe.guidance_scale, image.size) == (1, 0.0, (32, 32))


def test_set_sampling_defaults_is_saved_and_checked(tmp_path, saved):
    pipe = _load(saved)
    pipe.set_sampling_defaults(num_inference_steps=7)  # the others stay
    pipe.save_pretrained(tmp_path / "again")
    assert _load(tmp_path / "again").sampling_defaults == SamplingDefaults(7, 2.0, 64)
    for kwargs, message in [({"num_inference_steps": 0}, "steps 0"), ({"guidance_scale": float("nan")}, "guidance"),
                            ({"resolution": 62}, "multiple of 4")]:
        with pytest.raises(ValueError, match=message):
            pipe.set_sampling_defaults(**kwargs)
    with pytest.raises(PipelineFolderError, match="resolution 62: must be a multiple of 4"):
        write_sampling_defaults(saved, 3, 2.0, 62)
    with pytest.raises(PipelineFolderError, match="no such folder"):
        write_sampling_defaults(tmp_path / "missing", 3, 2.0)


def test_generate_starts_from_them(saved, tmp_path, capsys):
    out = tmp_path / "sample.png"
    assert main(["generate", "--model", str(saved), "--image-root", str(tmp_path), "--prompt", "a circle",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "(64x64, 3 steps, guidance 2.0, seed 0" in capsys.readouterr().out and out.is_file()


def test_the_registered_model_starts_from_them(saved):
    from mumu_model import registry

    model = registry.MUMUPyfuncModel()
    model.load_context(SimpleNamespace(artifacts={registry.PIPELINE_ARTIFACT: str(saved)},
                                       model_config={"device": "cpu"}))
    assert (model.steps, model.guidance) == (3, 2.0)
    model.load_context(SimpleNamespace(artifacts={registry.PIPELINE_ARTIFACT: str(saved)},
                                       model_config={"device": "cpu", "steps": 5}))
    assert (model.steps, model.guidance) == (5, 2.0)
