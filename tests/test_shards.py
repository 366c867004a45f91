import tarfile

import pytest
from PIL import Image

from mumu_model.data.report import Skipped
from mumu_model.data.shards import (
    ShardError, encode_image, json_bytes, read_shard, sample_prompt, write_shard,
)


def _samples(n=3):
    crop = Image.new("RGB", (8, 8), (0, 200, 0))
    for i in range(n):
        yield f"k{i}", {
            "jpg": encode_image(Image.new("RGB", (16, 16), (i, 0, 0)), "jpg"),
            "crop0.png": encode_image(crop, "crop0.png"),
            "json": json_bytes({"prompt": f"a <img:crop0.png> thing {i} <<3"}),
        }


def test_round_trip_and_webdataset_layout(tmp_path):
    info = write_shard(tmp_path / "00000.tar", _samples())
    assert info.samples == 3
    read = list(read_shard(info.path))
    assert [key for key, _ in read] == ["k0", "k1", "k2"]
    assert set(read[0][1]) == {"jpg", "crop0.png", "json"}
    prompt = sample_prompt(read[1][1], "k1")
    assert prompt.num_images == 1 and prompt.parts[-1] == " thing 1 <3"
    with tarfile.open(info.path) as tar:
        names = tar.getnames()
    assert names[:3] == ["k0.crop0.png", "k0.jpg", "k0.json"]


def test_rewrite_is_byte_identical(tmp_path):
    first = write_shard(tmp_path / "a.tar", _samples()).path.read_bytes()
    second = write_shard(tmp_path / "a.tar", _samples()).path.read_bytes()
    assert first == second


def test_failed_write_leaves_old_shard_and_no_temp(tmp_path):
    write_shard(tmp_path / "a.tar", _samples())
    before = (tmp_path / "a.tar").read_bytes()

    def broken():
        yield from _samples(1)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "a.tar", broken())
    assert (tmp_path / "a.tar").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "_x"])
def test_bad_keys(tmp_path, key):
    with pytest.raises(ShardError, match="sample key"):
        write_shard(tmp_path / "a.tar", [(key, {"json": b"{}"})])


def test_duplicate_keys_refused(tmp_path):
    with pytest.raises(ShardError, match="duplicate"):
        write_shard(tmp_path / "a.tar", [("a", {"json": b"{}"}), ("a", {"json": b"{}"})])


def test_truncated_shard_yields_what_precedes_the_damage(tmp_path):
    path = write_shard(tmp_path / "a.tar", _samples(3)).path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    skipped = Skipped()
    keys = [key for key, _ in read_shard(path, skipped)]
    assert keys and keys == ["k0", "k1", "k2"][: len(keys)] and len(keys) < 3
    assert skipped.counts["damaged_shard"] == 1
    with pytest.raises(ShardError, match="damaged"):
        list(read_shard(path))


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset
    path = write_shard(tmp_path / "a.tar", _samples(2)).path
    samples = list(webdataset.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["k0", "k1"]
    assert "crop0.png" in samples[0] and "json" in samples[0]


def test_shard_cut_between_members_is_damage_not_a_quiet_end(tmp_path):
    path = write_shard(tmp_path / "a.tar", _samples(3)).path
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    boundary = members[3].offset  # the header of k1's first member: k0 is complete before it
    path.write_bytes(path.read_bytes()[:boundary])
    skipped = Skipped()
    assert [key for key, _ in read_shard(path, skipped)] == []  # k0 may be incomplete: dropped
    assert skipped.counts["damaged_shard"] == 1
