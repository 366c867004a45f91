"""Datasets under an fsspec URL: the same bytes as under a folder, complete files only, and a
root that cannot be used fails naming `data.root`."""

import time
from pathlib import Path

import dagster as dg
import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from mumu_assets.definitions import build_definitions
from mumu_assets.materialize import materialize
from mumu_assets.profiles.toy import toy_resources
from mumu_model.atomic import is_temp_name
from mumu_model.data.storage import DatasetRoot, StorageError

STEPS = ["raw_prompts", "content_style", "real_images", "synthetic_images"]
CONFIG = {"raw_prompts": {"limit": 24}, "content_style": {"styles_per_content": 1}}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(resources: dict) -> tuple[bool, list[str]]:
    defs = build_definitions("toy", resources=resources)
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        ok = materialize(defs, STEPS, instance=instance, run_config={k: v for k, v in CONFIG.items()}, log=lines.append)
    return ok, lines


def test_a_url_root_holds_the_bytes_a_folder_root_holds(tmp_path):
    ok, lines = _run(toy_resources(root=str(tmp_path / "folder")))
    assert ok, lines
    remote = tmp_path / "remote"
    ok, lines = _run(toy_resources(root=f"file://{remote}", cache=str(tmp_path / "cache")))
    assert ok, lines
    folder, uploaded = _files(tmp_path / "folder"), _files(remote)
    assert sorted(uploaded) == sorted(folder) and all(uploaded[k] == folder[k] for k in folder)
    assert not any(is_temp_name(Path(name).name) for name in uploaded)

    # Another host, an empty cache: inputs come from the URL.
    reader = DatasetRoot(f"file://{remote}", cache=str(tmp_path / "cache2"))
    shard = reader.local("synthetic", "images", "00000.tar")
    assert shard.read_bytes() == folder["synthetic/images/00000.tar"]
    images = reader.local("synthetic", "images")
    assert sorted(p.name for p in images.iterdir()) == sorted(
        Path(k).name for k in folder if k.startswith("synthetic/images/"))
    assert reader.publish(since=0) == []  # fetched files are not uploaded back


def test_a_root_whose_package_is_missing_fails_naming_the_setting(tmp_path):
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    with pytest.raises(StorageError, match=r"data.root=s3://bucket/mumu: Install s3fs"):
        DatasetRoot("s3://bucket/mumu")
    with pytest.raises(StorageError, match=r"data.root=nope://x: Protocol not known"):
        DatasetRoot("nope://x")


class _SilentFileSystem(LocalFileSystem):
    """A file system whose server never answers."""

    protocol = "mumu-silent"

    def info(self, path, **kwargs):
        time.sleep(60)


def test_a_root_that_never_answers_fails_in_bounded_time(tmp_path):
    fsspec.register_implementation("mumu-silent", _SilentFileSystem, clobber=True)
    root = DatasetRoot("mumu-silent://bucket/data", cache=str(tmp_path), timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"data.root=mumu-silent://bucket/data: no answer within 2 s"):
        root.check()
    assert time.monotonic() - started < 10
