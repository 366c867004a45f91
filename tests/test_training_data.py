import json
import random
import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from mumu_model.data.report import Skipped
from mumu_model.data.shards import encode_image, json_bytes, read_shard, sample_prompt, write_shard
from mumu_model.prompt import MultimodalPrompt
from mumu_model.training.data import (
    CROP_KEEP,
    DataConfig,
    LatentCache,
    ShardStream,
    TrainingSample,
    augment_image,
    batches,
    collate,
    index_shard,
    target_tensor,
)

RES = 16


def _noise_image(seed, width, height):
    # Random pixels: every augmentation visibly changes them (no symmetric or grey images).
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _record(seed, target_size, prompt, images=()):
    fields = {"jpg": encode_image(_noise_image(seed, *target_size), "jpg"), "json": json_bytes({"prompt": prompt})}
    for index, name in enumerate(images):
        fields[name] = encode_image(_noise_image(seed * 10 + index, 30, 20), name)
    return fields


def _write_shards(root):
    shard_a = [
        ("a0", _record(1, (64, 32), "a <img:crop0.png> man", ["crop0.png"])),
        ("a1", _record(2, (24, 48), "a <img:crop0.png> man and his <img:crop1.png> dog", ["crop0.png", "crop1.png"])),
        ("a2", _record(3, (40, 40), "a red circle")),  # text only
        ("a3", _record(4, (50, 30), "<img:control.png> in this layout: a <img:crop0.png> cat", ["control.png", "crop0.png"])),
        ("a4", {**_record(5, (32, 32), "a <img:crop0.png> dog"), "crop0.png": b"\x89PNG not really"}),  # corrupt
    ]
    shard_b = [
        ("b0", _record(6, (32, 32), "a <img:crop0.png man", ["crop0.png"])),  # unparsable prompt
        ("b1", _record(7, (20, 60), "a <img:crop0.png> hat", ["crop0.png"])),
        ("b2", _record(8, (33, 17), "his <img:crop0.png> guitar", ["crop0.png"])),
        ("b3", _record(9, (32, 32), "a <img:crop0.png> scooter", ["crop0.png"])),
        ("b4", _record(10, (45, 44), "<img:crop0.png> in a cartoon style", ["crop0.png"])),
    ]
    write_shard(root / "00000.tar", shard_a)
    write_shard(root / "00001.tar", shard_b)
    return str(root / "*.tar")


GOOD = {"a0", "a1", "a2", "a3", "b1", "b2", "b3", "b4"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def originals(shards):
    """key -> (target image, prompt) as stored, read independently of the stream."""
    import glob

    from mumu_model.data.shards import decode_image

    records = {}
    for path in sorted(glob.glob(shards)):
        for key, sample in read_shard(path):
            if key in GOOD:
                records[key] = (decode_image(sample["jpg"], "jpg"), sample_prompt(sample, key))
    return records


@pytest.fixture(scope="module")
def pipe():
    from mumu_model.build import build_pipeline
    from mumu_model.config import load_model_config

    return build_pipeline(load_model_config("tiny"))


def _config(shards, **overrides):
    return DataConfig(shards=(shards,), **{"resolution": RES, **overrides})


def _same(a: TrainingSample, b: TrainingSample) -> bool:
    return (a.key, a.epoch, a.dropped) == (b.key, b.epoch, b.dropped) and torch.equal(a.target, b.target) and a.prompt == b.prompt


def _changed(image, original):
    return image.size != original.size or image.tobytes() != original.tobytes()


# -- samples -------------------------------------------------------------------------------


def test_targets_are_padded_black_resized_and_in_range(shards, originals):
    stream = ShardStream(_config(shards, conditioning_dropout=0.0))
    samples = list(islice(stream, 8))
    assert {s.key for s in samples} == GOOD
    for sample in samples:
        assert sample.target.shape == (3, RES, RES) and sample.target.dtype == torch.float32
        assert sample.target.min() >= -1 and sample.target.max() <= 1
        assert torch.equal(sample.target, target_tensor(originals[sample.key][0], RES))
    wide = next(s for s in samples if s.key == "a0").target  # 64x32: black bands above and below
    assert (wide[:, :3] == -1).all() and (wide[:, -3:] == -1).all() and (wide[:, 6:10] > -1).any()
    tall = next(s for s in samples if s.key == "b1").target  # 20x60: black bands left and right
    assert (tall[:, :, :3] == -1).all() and (tall[:, :, -3:] == -1).all()


def test_text_only_and_control_records(shards):
    samples = {s.key: s for s in islice(ShardStream(_config(shards, conditioning_dropout=0.0)), 8)}
    assert samples["a2"].prompt == MultimodalPrompt(["a red circle"])
    assert samples["a3"].prompt.num_images == 2 and samples["a1"].prompt.num_images == 2


def test_dropout_rate_and_dropped_prompt_is_the_unconditional_prompt(shards):
    stream = ShardStream(_config(shards, conditioning_dropout=0.1, augment_probability=0.0))
    samples = list(islice(stream, 1200))
    dropped = [s for s in samples if s.dropped]
    assert 0.07 < len(dropped) / len(samples) < 0.13
    assert all(s.prompt == MultimodalPrompt() and s.prompt.is_empty for s in dropped)
    assert all(not s.prompt.is_empty for s in samples if not s.dropped)
    assert len({s.key for s in dropped}) > 4  # drawn per sample and epoch, not per key


def test_augmentation_rate_conditioning_only(shards, originals):
    stream = ShardStream(_config(shards, conditioning_dropout=0.0, augment_probability=0.2))
    changed = total = 0
    for sample in islice(stream, 1200):
        target, prompt = originals[sample.key]
        assert torch.equal(sample.target, target_tensor(target, RES))  # targets never change
        assert sample.prompt.num_images == prompt.num_images
        assert sample.prompt.text_with_placeholders("|") == prompt.text_with_placeholders("|")
        for image, original, reference in zip(sample.prompt.images, prompt.images, prompt.image_paths):
            if reference == "control.png":  # derived from the target: never augmented
                assert not _changed(image, original)
                continue
            total += 1
            changed += _changed(image, original)
    assert total > 1000
    assert 0.16 < changed / total < 0.24


def test_each_augmentation(shards):
    image = _noise_image(0, 40, 30)
    seen = {}
    rng = random.Random(0)
    while len(seen) < 4:
        out, kind = augment_image(image, rng)
        seen.setdefault(kind, out)
    crop = seen["crop"]
    assert CROP_KEEP[0] * 40 - 1 <= crop.width <= 40 and CROP_KEEP[0] * 30 - 1 <= crop.height <= 30
    assert seen["flip"].tobytes() == image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    gray = np.asarray(seen["grayscale"])
    assert gray.shape == (30, 40, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    flat = Image.new("RGB", (100, 100), (128, 128, 128))
    rng = random.Random(1)
    while True:
        noisy, kind = augment_image(flat, rng)
        if kind == "noise":
            break
    deviation = np.asarray(noisy, dtype=np.float64) / 255 - 128 / 255
    assert 0.04 < deviation.std() < 0.06


def test_decisions_depend_only_on_seed_epoch_key(shards):
    config = _config(shards, conditioning_dropout=0.3, augment_probability=0.5, seed=5)
    single = {(s.epoch, s.key): s for s in islice(ShardStream(config), 24)}
    ranked = [s for rank in (0, 1) for s in islice(ShardStream(config, rank, 2), 12)]
    common = [s for s in ranked if (s.epoch, s.key) in single]
    assert len(common) > 8
    assert all(_same(s, single[(s.epoch, s.key)]) for s in common)
    other_seed = list(islice(ShardStream(_config(shards, conditioning_dropout=0.3, augment_probability=0.5, seed=6)), 24))
    assert [s.key for s in other_seed] != [single[k].key for k in single]


# -- order, ranks, resume ------------------------------------------------------------------


def _by_epoch(stream, epochs):
    seen: dict[int, list[str]] = {}
    for sample in stream:
        if sample.epoch >= epochs:
            return seen
        seen.setdefault(sample.epoch, []).append(sample.key)


def test_each_epoch_is_a_permutation_that_changes(shards):
    seen = _by_epoch(ShardStream(_config(shards)), 3)
    assert all(sorted(keys) == sorted(GOOD) for keys in seen.values())
    assert len({tuple(keys) for keys in seen.values()}) > 1


def test_two_ranks_partition_each_epoch(shards):
    config = _config(shards)
    rank0, rank1 = (_by_epoch(ShardStream(config, rank, 2), 3) for rank in (0, 1))
    for epoch in range(3):
        assert not set(rank0[epoch]) & set(rank1[epoch])
        assert set(rank0[epoch]) | set(rank1[epoch]) == GOOD
        assert len(rank0[epoch]) + len(rank1[epoch]) == len(GOOD)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_exact_resume(shards, rank, world_size):
    config = _config(shards, conditioning_dropout=0.3, augment_probability=0.5, seed=1)
    reference = list(islice(ShardStream(config, rank, world_size), 20))
    for consumed in (0, 3, 7, 8, 9, 13):
        first = ShardStream(config, rank, world_size)
        assert [s.key for s in islice(first, consumed)] == [s.key for s in reference[:consumed]]
        state = json.loads(json.dumps(first.state_dict()))
        assert {"epoch", "position"} <= set(state)
        resumed = ShardStream(config, rank, world_size)
        resumed.load_state_dict(state)
        following = list(islice(resumed, 5))
        assert all(_same(a, b) for a, b in zip(following, reference[consumed : consumed + 5], strict=True))
    assert len({s.epoch for s in reference[7:12]}) == 2  # consume 7, next 5 crosses an epoch boundary


def test_prefetch_changes_nothing(shards):
    config = _config(shards, conditioning_dropout=0.3, augment_probability=0.5)
    plain, threaded = ShardStream(config), ShardStream(config, prefetch=2)
    a, b = list(islice(plain, 13)), list(islice(threaded, 13))
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert plain.state_dict() == threaded.state_dict()
    assert plain.skipped.counts == threaded.skipped.counts


def test_foreign_state_is_refused(shards):
    stream = ShardStream(_config(shards), 0, 2)
    state = ShardStream(_config(shards), 1, 2).state_dict()
    with pytest.raises(ValueError, match="rank"):
        stream.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        stream.load_state_dict(ShardStream(_config(shards, seed=9), 0, 2).state_dict())


# -- bad data ------------------------------------------------------------------------------


def test_bad_samples_are_skipped_and_counted_once(shards):
    stream = ShardStream(_config(shards))
    keys = [s.key for s in islice(stream, 8 * 3)]
    assert set(keys) == GOOD
    assert dict(stream.skipped.counts) == {"bad_image": 1, "bad_prompt": 1}
    assert stream.num_samples == 10 and stream.samples_per_epoch == 10


def test_damaged_shard_keeps_what_precedes_the_damage(shards, tmp_path):
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(shards.replace("*.tar", name), tmp_path / name)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "00003.tar").write_bytes(b"not a tar at all")
    for cut in [*range(0, len(data), 509), 27306, 12288, 12800, 32256, 32257]:  # inside data, headers, at boundaries
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        skipped = Skipped()
        indexed = [k for k, _ in index_shard(tmp_path / "cut.bin", skipped)]
        read = [k for k, _ in read_shard(tmp_path / "cut.bin", Skipped())]
        assert indexed == read[: len(indexed)]  # what precedes the damage, as read_shard reads it
        if cut <= 32256:  # the last member's data ends there; after it only the zero blocks
            assert skipped.counts["damaged_shard"] == 1 and len(indexed) < 5
        else:
            assert not skipped.counts and indexed == read
    stream = ShardStream(_config(str(tmp_path / "*.tar")))
    assert stream.skipped.counts["damaged_shard"] == 2
    kept = index_shard(tmp_path / "00002.tar", Skipped())
    assert 0 < len(kept) < 5 and stream.num_samples == 10 + len(kept)
    assert sorted(_by_epoch(stream, 1)[0]) == sorted([*GOOD, *(k for k, _ in kept if k != "b0")])


def test_no_matching_shard_is_a_clear_error(tmp_path, shards):
    with pytest.raises(ValueError, match="nowhere/\\*.tar"):
        ShardStream(_config(str(tmp_path / "nowhere/*.tar")))
    with pytest.raises(ValueError, match="missing.tar"):
        ShardStream(DataConfig(shards=(shards, str(tmp_path / "missing.tar"))))


@pytest.mark.parametrize("world_size", [1, 2])
def test_all_bad_stream_raises_instead_of_looping(tmp_path, world_size):
    write_shard(
        tmp_path / "bad.tar",
        [
            ("x0", {"jpg": b"garbage", "json": json_bytes({"prompt": "a cat"})}),
            ("x1", {"json": json_bytes({"prompt": "no target"})}),
            ("x2", {"jpg": encode_image(_noise_image(0, 8, 8), "jpg"), "json": b"{not json"}),
            ("x3", {"jpg": encode_image(_noise_image(0, 8, 8), "jpg"), "json": json_bytes(["no", "prompt"])}),
        ],
    )
    stream = ShardStream(_config(str(tmp_path / "bad.tar")), 0, world_size)
    with pytest.raises(RuntimeError, match="none of the 4 samples"):
        next(iter(stream))
    assert dict(stream.skipped.counts) == {"bad_image": 1, "bad_record": 3}


# -- batches and the encoder ---------------------------------------------------------------


def test_collate_feeds_the_encoder_and_dropped_rows_are_the_guidance_branch(shards, pipe):
    from mumu_model.build import tiny_processor
    from mumu_model.pipeline import encode_inputs

    processor = tiny_processor(28)
    samples = {s.key: s for s in islice(ShardStream(_config(shards, conditioning_dropout=0.0)), 8)}
    chosen = [samples["a1"], samples["a2"], samples["a3"]]
    chosen.append(TrainingSample("b1", samples["b1"].target, MultimodalPrompt(), dropped=True))
    batch = collate(chosen, processor)
    assert batch["pixel_values"].shape == (4, 3, RES, RES)
    assert batch["keys"] == ["a1", "a2", "a3", "b1"]
    assert batch["dropped"].tolist() == [False, False, False, True]
    assert all(isinstance(v, torch.Tensor) for v in batch["encoder_inputs"].values())
    with torch.no_grad():
        embeds, pooled, mask = encode_inputs(pipe.encoder, pipe.adapter, batch["encoder_inputs"], "cpu")
        assert embeds.shape[0] == pooled.shape[0] == 4 and mask.shape == embeds.shape[:2]
        # Each row is what the pipeline computes for that prompt alone; the dropped row is the
        # unconditional branch `MUMUPipeline.__call__` uses for guidance.
        for row, sample in enumerate(chosen):
            alone, alone_pooled, alone_mask = pipe.encode_prompt([sample.prompt])
            length = int(alone_mask.sum())
            assert int(mask[row].sum()) == length
            torch.testing.assert_close(embeds[row, :length], alone[0, :length], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(pooled[row], alone_pooled[0], atol=1e-4, rtol=1e-4)
        unconditional = pipe.encode_prompt([MultimodalPrompt()])[0]
        torch.testing.assert_close(embeds[3, :1], unconditional[0, :1], atol=1e-4, rtol=1e-4)


def test_batches_and_resume_between_batches(shards, pipe, tmp_path):
    config = _config(shards, conditioning_dropout=0.3)
    stream = ShardStream(config)
    produced = batches(stream, pipe.processor, 3)
    first = [next(produced) for _ in range(3)]
    state = stream.state_dict()
    expected = next(produced)
    resumed = ShardStream(config)
    resumed.load_state_dict(state)
    again = next(batches(resumed, pipe.processor, 3))
    assert again["keys"] == expected["keys"] and torch.equal(again["pixel_values"], expected["pixel_values"])
    assert torch.equal(again["dropped"], expected["dropped"])
    assert all(b["pixel_values"].shape == (3, 3, RES, RES) and b["dropped"].dtype == torch.bool for b in first)

    # A literal reserved token in a prompt would fail the whole batch in encoder_inputs: skipped.
    write_shard(tmp_path / "r.tar", [("r0", _record(1, (8, 8), "an <<image> here")), ("r1", _record(2, (8, 8), "a cat"))])
    stream = ShardStream(_config(str(tmp_path / "r.tar"), conditioning_dropout=0.0))
    batch = next(batches(stream, pipe.processor, 2))
    assert batch["keys"] == ["r1", "r1"] and stream.skipped.counts["reserved_token"] == 1


# -- latent cache --------------------------------------------------------------------------


def test_latent_cache(shards, pipe, tmp_path, monkeypatch):
    samples = list(islice(ShardStream(_config(shards)), 3))
    cache = LatentCache(tmp_path / "latents", pipe.vae)
    first = cache.get(samples[0].key, samples[0].target)
    assert cache.misses == 1 and cache.path(samples[0].key, RES).is_file()
    assert first.shape[0] == pipe.vae.config.latent_channels and first.device.type == "cpu"
    assert torch.equal(cache.get(samples[0].key, samples[0].target), first) and cache.hits == 1

    # A fresh cache object (a restarted run) reads the file and never runs the VAE.
    fresh = LatentCache(tmp_path / "latents", pipe.vae)
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("cache miss"))
    assert torch.equal(fresh.get(samples[0].key, samples[0].target), first)
    monkeypatch.undo()

    pixels = torch.stack([s.target for s in samples])
    batch = fresh.get_batch([s.key for s in samples], pixels)
    assert fresh.hits == 2 and fresh.misses == 2 and torch.equal(batch[0], first)
    assert torch.equal(LatentCache(tmp_path / "latents", pipe.vae).get_batch([s.key for s in samples], pixels), batch)

    # Another resolution or another VAE is another entry, never a stale hit.
    small = torch.nn.functional.interpolate(samples[0].target[None], size=8)[0]
    assert cache.path(samples[0].key, 8) != cache.path(samples[0].key, RES)
    assert cache.get(samples[0].key, small).shape[-1] == first.shape[-1] // 2
    from mumu_model.build import tiny_vae

    torch.manual_seed(123)
    other = LatentCache(tmp_path / "latents", tiny_vae())
    assert other.directory != cache.directory
    assert not torch.equal(other.get(samples[0].key, samples[0].target), first) and other.misses == 1

    # A damaged file is recomputed, not trusted.
    cache.path(samples[0].key, RES).write_bytes(b"broken")
    assert torch.equal(LatentCache(tmp_path / "latents", pipe.vae).get(samples[0].key, samples[0].target), first)
