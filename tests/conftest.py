import pytest
import torch
from PIL import Image

from mumu_model.testing import tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny pipeline saved once per session; tests load it with `from_pretrained(path)`."""
    return tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture
def pipe(tiny_pipeline_dir):
    from mumu_model import MUMUPipeline

    pipeline = MUMUPipeline.from_pretrained(tiny_pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def red_square():
    return Image.new("RGB", (40, 24), (220, 20, 20))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
