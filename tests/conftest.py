import pytest
import torch
from PIL import Image

from mumu_model.testing import tiny_pipeline


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread for the whole suite: tiny models gain nothing from threads, on a busy
    2-core machine two OpenMP threads wait on each other (tests ran 3-10x slower), and the
    trainer's subprocesses run with one thread too, so in-process results match theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
