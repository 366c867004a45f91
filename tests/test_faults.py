"""Faults in the data bootstrap: a killed writer never changes a dataset's version, and a shard
that fails for bad data fails alone, naming its failing rows."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mumu_assets.data_assets import pickscore_scores
from mumu_assets.partitions import SHARDS
from mumu_assets.resources import DatasetStorage, ScorerBackend
from mumu_model.atomic import (
    ORPHAN_AGE_S, TEMP_PATTERN, atomic_dir, atomic_file, is_temp_name, remove_orphans, write_bytes_atomic,
)
from mumu_model.data import steps
from mumu_model.data.shards import encode_image, json_bytes, read_shard, write_shard
from mumu_model.data.versioning import dvc_hash

REPO = Path(__file__).resolve().parent.parent

# The child writes one sample, says so, then blocks inside write_shard until it is killed.
KILLED_WRITER = r"""
import sys, time
from pathlib import Path
from mumu_model.data.shards import write_shard

target, ready = Path(sys.argv[1]), Path(sys.argv[2])

def samples():
    yield "a", {"bin": bytes(range(256)) * 4096}
    ready.touch()
    time.sleep(3600)
    yield "b", {"bin": b"b"}

write_shard(target, samples())
"""
SAMPLES = [("a", {"bin": bytes(range(256)) * 4096}), ("b", {"bin": b"b"})]


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_temp_name(p.name))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def killed_writer(tmp_path):
    """A folder where a write_shard was SIGKILLed mid-shard: the temp file and no shard."""
    folder = tmp_path / "images"
    folder.mkdir()
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder / "00000.tar"), str(ready)],
                             cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 300  # a bound on a stuck child, not a speed check
        while not ready.exists():
            assert child.poll() is None, f"the writer exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the writer never wrote its first sample"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return folder


def test_every_atomic_writer_stages_under_the_one_temp_pattern(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_shard(tmp_path / "00000.tar", [("a", {"bin": b"a"})])
    write_bytes_atomic(tmp_path / "table.parquet", b"x")
    with atomic_file(tmp_path / "table.parquet") as handle:
        handle.write(b"y")
    for _ in range(2):  # the second one swaps: the old folder is first moved aside
        with atomic_dir(tmp_path / "model") as folder:
            (folder / "weights").write_bytes(b"1")
    monkeypatch.undo()

    # Each rename moves a staged temp into place, or the old version aside into a temp.
    assert len(renames) == 6
    for src, dst in renames:
        assert is_temp_name(src.name) or is_temp_name(dst.parent.name), (src, dst)
    assert renames[0][0].name.startswith(".00000.tar.") and renames[1][0].name.startswith(".table.parquet.")
    assert _temps(tmp_path) == []  # writers that finished leave nothing behind
    # DVC is told to skip the same pattern, and readers glob the final names only.
    assert TEMP_PATTERN in (REPO / ".dvcignore").read_text().splitlines()
    (tmp_path / ".00001.tar.k1ll3d.tmp").write_bytes(b"half")
    assert [p.name for p in tmp_path.glob("*.tar")] == ["00000.tar"]


def test_a_killed_writer_leaves_a_temp_that_changes_no_version(killed_writer, tmp_path):
    folder = killed_writer
    [orphan] = _temps(folder)
    assert orphan.name.startswith(".00000.tar.") and orphan.stat().st_size > 0
    assert not (folder / "00000.tar").exists()  # killed before the rename: no half shard

    # The re-run writes the shard; the orphan is still there, yet the version is the clean one.
    write_shard(folder / "00000.tar", SAMPLES)
    clean = tmp_path / "clean"
    write_shard(clean / "00000.tar", SAMPLES)
    assert orphan.exists()
    assert dvc_hash(folder) == dvc_hash(clean)
    assert dvc_hash(tmp_path / "images" / "00000.tar") == dvc_hash(clean / "00000.tar")
    assert [key for key, _ in read_shard(folder / "00000.tar")] == ["a", "b"]

    # A temp folder (atomic_dir) below the dataset is skipped as well.
    (folder / ".sub.abc123.tmp").mkdir()
    (folder / ".sub.abc123.tmp" / "weights").write_bytes(b"half")
    assert dvc_hash(folder) == dvc_hash(clean)

    # Cleanup: a fresh temp (a concurrent writer's) survives the default bound; an old one goes.
    fresh = folder / ".00001.tar.fresh1.tmp"
    fresh.write_bytes(b"being written")
    assert remove_orphans(folder) == []
    _age(orphan, 2 * ORPHAN_AGE_S)
    _age(folder / ".sub.abc123.tmp", 2 * ORPHAN_AGE_S)  # an old folder whose file is still being written
    assert remove_orphans(folder) == [orphan]
    assert remove_orphans(folder, older_than_s=0) == [fresh, folder / ".sub.abc123.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == ["00000.tar"]
    assert remove_orphans(tmp_path / "missing") == []


def test_dvc_status_ignores_the_temp_of_a_killed_writer(killed_writer, tmp_path):
    """The real DVC, in a new git + DVC repository with the project's .dvcignore."""
    root = tmp_path / "project"
    data = root / "data" / "images"
    data.mkdir(parents=True)
    write_shard(data / "00000.tar", SAMPLES)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "add", "-q", "data/images")
    recorded = (root / "data" / "images.dvc").read_text()
    assert f"md5: {dvc_hash(data)}" in recorded

    [orphan] = _temps(killed_writer)
    shutil.copy(orphan, data / orphan.name)
    assert "modified" not in run(dvc, "status")
    assert f"md5: {dvc_hash(data)}" in recorded  # dvc_hash skips it too

    # Without the pattern DVC would see a changed dataset: the .dvcignore line is what matters.
    (root / ".dvcignore").write_text("")
    assert "modified" in run(dvc, "status")


# -- a row that raises costs only itself ---------------------------------------------------


class _Synthesizer:
    """Yields each row with a plain image; the step's own per-row work is what fails."""

    def generate(self, rows, *, skipped=None):
        for row in rows:
            yield row, row.pop("image", Image.new("RGB", (8, 8), (200, 30, 30)))


def _pairs(ids):
    return pd.DataFrame([{"pair_id": i, "content": "a dog", "style": "", "text": "a dog", "seed": n}
                         for n, i in enumerate(ids)])


def test_a_bad_row_is_dropped_and_named_and_too_many_fail_the_shard(tmp_path):
    out = tmp_path / "images" / "00000.tar"
    good = Image.new("RGB", (8, 8))
    pairs = _pairs(["p0", "p1", "p2", "bad.key", "p3", "p1"])
    pairs["image"] = [good, "not an image", good, good, good, good]
    result = steps.synthesize(pairs, _Synthesizer(), out, "png")
    assert [key for key, _ in read_shard(out)] == ["p0", "p2", "p3"]
    assert list(result.table["pair_id"]) == ["p0", "p2", "p3"] and result.rows == 3
    assert [key for key, _ in result.failed] == ["p1", "bad.key", "p1"]
    assert "AttributeError" in result.failed[0][1] and "duplicate" in result.failed[2][1]
    assert result.skipped.counts["row_error"] == 3

    # Half the rows raising is still bad data; all of them is a broken shard: it fails, listing
    # them, and the version written before stays.
    before = out.read_bytes()
    broken = _pairs(["x0", "x1", "x2"])
    broken["image"] = ["not an image"] * 3
    with pytest.raises(steps.ShardFailed, match="3 of 3 rows raised.*x0: AttributeError") as failure:
        steps.synthesize(broken, _Synthesizer(), out, "png")
    assert [key for key, _ in failure.value.failed] == ["x0", "x1", "x2"]
    assert out.read_bytes() == before and _temps(out.parent) == []  # the previous version stays


# -- two partitions through Dagster: one with bad rows, one clean ----------------------------


class _TextLengthScorer:
    """Scores a pair by its text's length; raises on any batch holding the text "explode"."""

    def score(self, texts, images, *, ids=None, skipped=None):
        if "explode" in texts:
            raise ValueError("the scorer cannot take this text")
        return np.array([float(len(text)) for text in texts], dtype=np.float32)


class _FakeScorerBackend(ScorerBackend):
    def _build(self):
        return _TextLengthScorer()


def _synthetic_shard(path: Path, rows: dict[str, str | None]) -> None:
    """A synthetic-images shard: key -> prompt text (None: the image bytes are corrupt)."""
    image = encode_image(Image.new("RGB", (16, 16), (20, 120, 220)), "png")
    write_shard(path, [
        (key, {"png": image if text is not None else b"\x89PNG not really", "json": json_bytes({"text": text or "x"})})
        for key, text in rows.items()
    ])


def _score_partition(data_root: Path, shard: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [pickscore_scores], partition_key=shard, raise_on_error=False,
        resources={"storage": DatasetStorage(root=str(data_root)), "scorer_backend": _FakeScorerBackend(model="none")},
    )


def _metadata(result) -> dict:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_a_partition_with_bad_rows_reports_them_and_a_failing_one_fails_alone(tmp_path):
    keys = SHARDS.get_partition_keys()
    if len(keys) < 2:
        pytest.skip("needs two shard partitions")
    clean, bad = keys[:2]
    data = tmp_path / "data"
    images = data / "synthetic" / "images"
    _synthetic_shard(images / f"{clean}.tar", {"c0": "a dog", "c1": "a cat", "c2": "a car"})
    _synthetic_shard(images / f"{bad}.tar", {"b0": "a dog", "b1": None, "b2": "explode", "b3": "a cat"})
    # A killed writer's temp, hours old, in the output folder.
    scores_dir = data / "synthetic" / "pickscore"
    scores_dir.mkdir(parents=True)
    orphan = scores_dir / f".{bad}.parquet.k1ll3d.tmp"
    orphan.write_bytes(b"half a parquet")
    _age(orphan, 2 * ORPHAN_AGE_S)

    first = _score_partition(data, clean)
    assert first.success and _metadata(first)["rows_out"] == 3 and _metadata(first)["failed_rows"] == 0
    # Any shard's step cleans its output folder of old temps, whichever shard they were for.
    assert _metadata(first)["orphans_removed"] == [orphan.name] and not orphan.exists()

    second = _score_partition(data, bad)
    assert second.success
    meta = _metadata(second)
    assert meta["rows_out"] == 2 and meta["failed_rows"] == 1
    assert meta["failed_row_list"] == ["b2: ValueError: the scorer cannot take this text"]
    assert meta["skipped_by_reason"]["by_reason"] == {"unreadable_sample": 1, "row_error": 1}
    assert meta["skipped_by_reason"]["examples"]["unreadable_sample"][0].startswith("b1: ")  # the corrupt image
    assert "orphans_removed" not in meta
    assert sorted(pd.read_parquet(scores_dir / f"{bad}.parquet")["key"]) == ["b0", "b3"]

    # Every row of the shard raising: that partition fails, naming them, and keeps its last
    # version; the other partition materializes as before.
    _synthetic_shard(images / f"{bad}.tar", {"b0": "explode", "b3": "explode"})
    failed = _score_partition(data, bad)
    assert not failed.success
    [failure] = failed.get_step_failure_events()
    user_failure = failure.step_failure_data.user_failure_data
    assert "2 of 2 rows raised" in user_failure.description
    assert user_failure.metadata["failed_row_list"].value == [
        "b0: ValueError: the scorer cannot take this text", "b3: ValueError: the scorer cannot take this text"]
    assert sorted(pd.read_parquet(scores_dir / f"{bad}.parquet")["key"]) == ["b0", "b3"]
    again = _score_partition(data, clean)
    assert again.success and _metadata(again)["rows_out"] == 3
