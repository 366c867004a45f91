import os

import pytest
import torch

# MLflow's usage telemetry would try to reach its servers from every test that logs a run.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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


# CI installs the system packages some tests need (PostgreSQL, Chromium) and sets this, so a
# test that would skip for want of one fails instead.
REQUIRE_SYSTEM_PACKAGES = bool(os.environ.get("MUMU_REQUIRE_SYSTEM_PACKAGES"))


def skip_without(what: str, reason: str) -> None:
    """Skip (on a laptop without `what`) or fail (in CI, where it must be installed)."""
    if REQUIRE_SYSTEM_PACKAGES:
        pytest.fail(f"{what} is required (MUMU_REQUIRE_SYSTEM_PACKAGES is set): {reason}")
    pytest.skip(f"needs {what}: {reason}")


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1, started by the project's script for this session."""
    import shutil
    import socket
    import tempfile

    from mumu_assets import postgres

    if not postgres.available():
        skip_without("PostgreSQL", postgres.PACKAGE_HINT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Not under pytest's tmp folder: as root the server runs as `postgres`, which cannot enter it.
    folder = tempfile.mkdtemp(prefix="mumu-postgres-")
    server = postgres.LocalPostgres(folder, port=port)
    url = server.start()
    yield url
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
