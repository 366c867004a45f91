import json
import random
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from mumu_model.build import build_processor
from mumu_model.data.report import Skipped
from mumu_model.data.shards import encode_image, json_bytes, read_shard, sample_prompt, write_shard
from mumu_model.prompt import MultimodalPrompt
from mumu_model.training import data as data_module
from mumu_model.training.data import (
    CROP_KEEP,
    BadData,
    DataConfig,
    LatentCache,
    ShardStream,
    TrainingSample,
    augment_image,
    batches,
    collate,
    global_data_position,
    index_shard,
    make_loader,
    reshard_states,
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


def test_chosen_augmentations_margin_scale_jitter():
    image = Image.new("RGB", (20, 16), (210, 10, 10))
    rng = random.Random(2)
    seen: dict[str, list[Image.Image]] = {}
    for _ in range(60):
        out, kind = augment_image(image, rng, ("margin", "scale", "jitter"))
        seen.setdefault(kind, []).append(out)
    assert set(seen) == {"margin", "scale", "jitter"}  # only the kinds asked for
    for out in seen["margin"]:
        pixels = np.asarray(out)
        pad = (out.width - 20) // 2
        assert out.size == (20 + 2 * pad, 16 + 2 * pad) and pad >= 1
        assert (pixels[pad:pad + 16, pad:pad + 20] == (210, 10, 10)).all()  # the object, untouched
        corner = pixels[0, 0]
        assert corner[0] == corner[1] == corner[2]  # a plain grey background
    for out in seen["scale"]:
        assert 0.4 * 20 - 1 <= out.width <= 0.9 * 20 + 1 and out.width < 20
    for out in seen["jitter"]:
        shift = np.asarray(out, dtype=np.int16)[0, 0] - (210, 10, 10)
        assert np.abs(shift).max() <= 15 and (np.asarray(out) == np.asarray(out)[0, 0]).all()
    with pytest.raises(ValueError, match=r"unknown \['sepia'\]"):
        DataConfig(shards=("x.tar",), augmentations=("crop", "sepia"))


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
    with pytest.raises(BadData, match="none of the 4 samples"):
        next(iter(stream))
    assert dict(stream.skipped.counts) == {"bad_image": 1, "bad_record": 3}
    loader = make_loader(_config(str(tmp_path / "bad.tar")), build_processor(28), 2, 0, world_size)
    with pytest.raises(BadData, match="none of the 4 samples"):
        next(iter(loader))


# -- batches and the encoder ---------------------------------------------------------------


def test_collate_feeds_the_encoder_and_dropped_rows_are_the_guidance_branch(shards, pipe):
    from mumu_model.pipeline import encode_inputs

    processor = build_processor(28)
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



# -- the loader: worker processes -----------------------------------------------------------


def _same_batch(a: dict, b: dict) -> bool:
    inputs_a, inputs_b = a["encoder_inputs"], b["encoder_inputs"]
    return (
        a["keys"] == b["keys"]
        and torch.equal(a["pixel_values"], b["pixel_values"])
        and torch.equal(a["dropped"], b["dropped"])
        and list(inputs_a) == list(inputs_b)
        and all(inputs_a[k].dtype == inputs_b[k].dtype and torch.equal(inputs_a[k], inputs_b[k]) for k in inputs_a)
    )


def test_loader_gives_the_batches_of_batches_with_and_without_workers(shards, pipe):
    # Dropout, augmentation, bad samples, prompts with 0-2 images, and 8 batches of 3 from 8
    # usable samples per epoch: batches straddle epochs, and the text-only / dropped rows sit
    # beside rows with images (the encodings are padded together like the processor's batch).
    config = _config(shards, conditioning_dropout=0.3, augment_probability=0.5)
    reference = list(islice(batches(ShardStream(config), pipe.processor, 3), 8))
    assert any(len(set(b["encoder_inputs"]["attention_mask"].sum(1).tolist())) > 1 for b in reference)
    masks = [b["encoder_inputs"]["pixel_attention_mask"] for b in reference if "pixel_attention_mask" in b["encoder_inputs"]]
    assert any({0, 2} <= set(mask.flatten(2).any(2).sum(1).tolist()) for mask in masks)  # rows of 0 and 2 images
    assert len(masks) < len(reference)  # and a batch without any image
    for workers in (0, 2):
        loader = make_loader(config, pipe.processor, 3, num_workers=workers, prefetch_factor=2)
        produced = list(islice(loader, 8))
        loader.close()
        assert all(_same_batch(a, b) for a, b in zip(produced, reference, strict=True)), workers
        assert dict(loader.skipped.counts) == {"bad_image": 1, "bad_prompt": 1}


def test_loader_resumes_exactly_at_the_next_batch(shards, pipe):
    config = _config(shards, conditioning_dropout=0.3, augment_probability=0.5, seed=3)
    reference = list(islice(make_loader(config, pipe.processor, 3), 9))
    for consumed, workers in ((2, 2), (5, 0), (6, 2)):
        first = make_loader(config, pipe.processor, 3, num_workers=workers)
        assert [b["keys"] for b in islice(first, consumed)] == [b["keys"] for b in reference[:consumed]]
        # The workers decoded further ahead; none of that counts as consumed.
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = make_loader(config, pipe.processor, 3, num_workers=workers)
        resumed.load_state_dict(state)
        following = list(islice(resumed, 3))
        resumed.close()
        assert all(_same_batch(a, b) for a, b in zip(following, reference[consumed : consumed + 3], strict=True))


def test_loader_skips_reserved_tokens(pipe, tmp_path):
    write_shard(tmp_path / "r.tar", [("r0", _record(1, (8, 8), "an <<image> here")), ("r1", _record(2, (8, 8), "a cat"))])
    loader = make_loader(_config(str(tmp_path / "r.tar"), conditioning_dropout=0.0), pipe.processor, 2)
    assert next(iter(loader))["keys"] == ["r1", "r1"] and loader.skipped.counts["reserved_token"] == 1
    report = loader.data_report()
    assert report["by_reason"]["reserved_token"]["count"] == 1 and report["unreadable_fraction"] == 0.5


# -- indexing split between ranks ----------------------------------------------------------


class _Collective:
    """An all-gather between threads, standing in for `parallel.all_gather_bytes` between ranks."""

    def __init__(self, world_size: int):
        self.slots: list[bytes | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)

    def gather(self, rank: int):
        def gather(data: bytes) -> list[bytes]:
            self.slots[rank] = data
            self.barrier.wait()
            everyone = list(self.slots)
            self.barrier.wait()
            return everyone

        return gather


def _on_ranks(world_size: int, run):
    """run(rank, gather) on `world_size` threads at once; the results in rank order."""
    collective = _Collective(world_size)
    with ThreadPoolExecutor(world_size) as pool:
        return list(pool.map(lambda rank: run(rank, collective.gather(rank)), range(world_size)))


def test_ranks_index_disjoint_shards_and_get_the_same_index(shards, tmp_path, monkeypatch):
    for index in range(5):  # 00000-00004: copies of the two shards, the last one cut short
        source = shards.replace("*.tar", f"0000{index % 2}.tar")
        data = open(source, "rb").read()
        (tmp_path / f"0000{index}.tar").write_bytes(data if index < 4 else data[: len(data) // 2])
    config = _config(str(tmp_path / "*.tar"), conditioning_dropout=0.3, augment_probability=0.5)
    alone = ShardStream(config)

    scanned: list[tuple[str, str]] = []
    scan = data_module._scan_shard
    def recording_scan(path):
        scanned.append((threading.current_thread().name, path.name))
        return scan(path)

    monkeypatch.setattr(data_module, "_scan_shard", recording_scan)
    streams = _on_ranks(2, lambda rank, gather: ShardStream(config, rank, 2, gather=gather))
    by_thread: dict[str, set[str]] = {}
    for thread, name in scanned:
        by_thread.setdefault(thread, set()).add(name)
    assert sorted(map(sorted, by_thread.values())) == [["00000.tar", "00002.tar", "00004.tar"], ["00001.tar", "00003.tar"]]

    for stream in streams:
        assert stream.state_dict()["dataset"] == alone.state_dict()["dataset"]
        assert stream.num_samples == alone.num_samples and stream.index.shards == alone.index.shards
        assert np.array_equal(stream.index.start, alone.index.start) and np.array_equal(stream.index.span, alone.index.span)
        assert dict(stream.skipped.counts) == {"damaged_shard": 1}
    # The same samples as a stream that indexed everything, and the ranks partition them.
    single = {(s.epoch, s.key, s.index): s for s in islice(alone, 40)}
    for stream in streams:
        for sample in islice(stream, 15):
            assert _same(sample, single[(sample.epoch, sample.key, sample.index)])


def test_ranks_that_see_different_files_are_refused(shards, tmp_path):
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(shards.replace("*.tar", name), tmp_path / name)
    others = _config(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="rank 1 found other shard files"):
        _on_ranks(2, lambda rank, gather: ShardStream(_config(shards) if rank == 0 else others, rank, 2, gather=gather))


# -- another world size --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    """16 good samples in two shards: nothing is skipped, so the ranks stay in step."""
    root = tmp_path_factory.mktemp("clean")
    for shard in range(2):
        records = [(f"c{shard}{i}", _record(100 + 8 * shard + i, (20, 16), f"a <img:crop0.png> thing {i}", ["crop0.png"]))
                   for i in range(8)]
        write_shard(root / f"{shard:05d}.tar", records)
    return str(root / "*.tar")


def test_reshard_two_ranks_into_one_continues_with_their_samples(clean_shards, pipe):
    config = _config(clean_shards, conditioning_dropout=0.3, augment_probability=0.5)
    ranks = [make_loader(config, pipe.processor, 2, rank, 2) for rank in (0, 1)]
    iterators = [iter(loader) for loader in ranks]
    for _ in range(3):  # 3 steps of batch 2 on 2 ranks: 12 of the 16 slots of epoch 0
        for iterator in iterators:
            next(iterator)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in ranks]
    assert global_data_position(states) == (0, 12, True)
    # What the two ranks would have trained on next (the last step of epoch 0, the first of epoch 1).
    expected = [[next(iterator) for iterator in iterators] for _ in range(2)]

    merged = make_loader(config, pipe.processor, 4)
    merged.load_state_dict(reshard_states(states, 0, 1))
    for step, batch in zip(expected, islice(merged, 2)):
        by_key = {key: (b, row) for b in step for row, key in enumerate(b["keys"])}
        assert sorted(batch["keys"]) == sorted(by_key) and len(by_key) == 4
        for row, key in enumerate(batch["keys"]):
            source, source_row = by_key[key]
            assert torch.equal(batch["pixel_values"][row], source["pixel_values"][source_row])
            assert bool(batch["dropped"][row]) == bool(source["dropped"][source_row])

    # The other way: one rank's state split into two ranks of batch 1.
    single = make_loader(config, pipe.processor, 2)
    single_iter = iter(single)
    next(single_iter)
    state = single.state_dict()
    upcoming = next(single_iter)["keys"]
    halves = [make_loader(config, pipe.processor, 1, rank, 2) for rank in (0, 1)]
    for rank, half in enumerate(halves):
        half.load_state_dict(reshard_states([state], rank, 2))
    assert [next(iter(half))["keys"][0] for half in halves] == upcoming


def test_reshard_rules(clean_shards):
    base = ShardStream(_config(clean_shards), 0, 2).state_dict()
    states = [{**base, "rank": rank, "epoch": 0, "position": 4} for rank in (0, 1)]  # 8 slots consumed
    assert reshard_states(states, 1, 4)["position"] == 2 and reshard_states(states, 0, 1)["position"] == 8
    with pytest.raises(ValueError, match="not divisible by the new world size 3"):
        reshard_states(states, 0, 3)
    # Rank 0 skipped two bad samples and read two slots further (slots 0, 2, ..., 10; rank 1: 1,
    # 3, 5, 7): resume after the prefix both covered, so slot 10 is served again, nothing is lost.
    drifted = [{**states[0], "position": 6}, states[1]]
    assert global_data_position(drifted) == (0, 9, False)
    assert reshard_states(drifted, 0, 1)["position"] == 9 and reshard_states(drifted, 0, 3)["position"] == 3
    assert reshard_states(drifted, 1, 2)["position"] == 4  # 9 rounded down to 8: slot 8 again too
    # One slot apart is still a prefix (0, 2, 4, 6, 8 and 1, 3, 5, 7): exact.
    assert global_data_position([{**states[0], "position": 5}, states[1]]) == (0, 9, True)
    # The end of an epoch is the start of the next one (16 samples: 8 slots per rank).
    assert global_data_position([{**s, "position": 8} for s in states]) == (1, 0, True)
    ahead = [{**states[0], "epoch": 1, "position": 1}, {**states[1], "position": 7}]
    assert global_data_position(ahead) == (0, 15, False)
    with pytest.raises(ValueError, match="expected rank 1 of 2"):
        reshard_states([states[0], states[0]], 0, 1)
    with pytest.raises(ValueError, match="disagree on seed"):
        reshard_states([states[0], {**states[1], "seed": 7}], 0, 1)


# -- bad data report -----------------------------------------------------------------------


def test_bad_data_report_and_check(shards):
    stream = ShardStream(_config(shards))
    assert stream.check_bad_fraction(0.0)["unreadable_fraction"] == 0.0  # nothing read, nothing found yet
    list(islice(stream, 8))  # one epoch: the 8 usable samples and the 2 bad ones
    report = stream.data_report()
    assert report["samples_indexed"] == 10 and report["samples_read"] == 10 and report["unusable_samples"] == 2
    assert report["unreadable_fraction"] == pytest.approx(0.2)
    bad_image = report["by_reason"]["bad_image"]
    assert bad_image["count"] == 1 and bad_image["examples"][0].startswith("00000.tar:a4: ")
    assert json.loads(json.dumps(report)) == report
    with pytest.raises(BadData, match=r"20\.00% .*00000\.tar \(1 unusable sample\(s\): bad_image 1\).*00001\.tar"):
        stream.check_bad_fraction(0.1)
    assert stream.check_bad_fraction(0.2)["unusable_samples"] == 2


def test_a_truncated_shard_counts_what_it_lost(shards, tmp_path, pipe):
    shutil.copy(shards.replace("*.tar", "00000.tar"), tmp_path / "00000.tar")
    data = open(shards.replace("*.tar", "00001.tar"), "rb").read()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])
    kept = len(index_shard(tmp_path / "00001.tar", Skipped()))
    config = _config(str(tmp_path / "*.tar"))
    loader = make_loader(config, pipe.processor, 2)
    with pytest.raises(BadData, match=f"{tmp_path / '00001.tar'} \\(damaged after sample"):
        loader.check_bad_fraction(0.01)  # before anything is read
    report = make_loader(config, pipe.processor, 2).check_bad_fraction(1.0)
    # The intact shard holds 5 samples: the cut one is taken to have held 5 too.
    assert report["damaged_shards"] == 1 and report["estimated_lost"] == 5 - kept
    assert report["worst_shards"][0]["shard"] == str(tmp_path / "00001.tar")
    assert report["by_reason"]["damaged_shard"]["count"] == 1
    assert report["unreadable_fraction"] == pytest.approx((5 - kept) / 10)


def test_bad_data_report_adds_up_the_ranks(shards):
    def run(rank, gather):
        stream = ShardStream(_config(shards), rank, 2, gather=gather)
        list(islice(stream, 5))  # past this rank's share of epoch 0 (5 slots, bad ones included)
        return stream.data_report(), set(stream._unusable), stream._read

    (report0, found0, read0), (report1, found1, read1) = _on_ranks(2, run)
    assert report0 == report1  # every rank gets the same figures, so all decide alike
    assert len(found0 | found1) == report0["unusable_samples"] == 2 and report0["samples_read"] == read0 + read1
    assert report0["unreadable_fraction"] == pytest.approx(0.2)


# -- latent cache --------------------------------------------------------------------------


def test_latent_cache(shards, pipe, tmp_path, monkeypatch):
    samples = list(islice(ShardStream(_config(shards)), 3))
    cache = LatentCache(tmp_path / "latents", pipe.vae, shard_size=2)
    first = cache.get(samples[0].key, samples[0].target)
    assert cache.misses == 1 and first.shape[0] == pipe.vae.config.latent_channels and first.device.type == "cpu"
    assert torch.equal(cache.get(samples[0].key, samples[0].target), first) and cache.hits == 1  # pending, in memory
    assert not list(cache.folder(RES).glob("*.safetensors"))
    cache.flush()
    (written,) = cache.folder(RES).glob("*.safetensors")
    assert written.name.startswith("0-")

    # A fresh cache object (a restarted run) reads the file and never runs the VAE.
    fresh = LatentCache(tmp_path / "latents", pipe.vae, shard_size=2)
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("cache miss"))
    assert torch.equal(fresh.get(samples[0].key, samples[0].target), first)
    monkeypatch.undo()

    # Misses are computed together; a full shard (2 latents) is written at once.
    pixels = torch.stack([s.target for s in samples])
    batch = fresh.get_batch([s.key for s in samples], pixels)
    assert fresh.hits == 2 and fresh.misses == 2 and torch.equal(batch[0], first)
    assert len(list(cache.folder(RES).glob("*.safetensors"))) == 2
    assert torch.equal(LatentCache(tmp_path / "latents", pipe.vae).get_batch([s.key for s in samples], pixels), batch)

    # Another rank writes its own files; a cache that is already open finds them on a miss.
    other_rank = LatentCache(tmp_path / "latents", pipe.vae, writer="1")
    extra = list(islice(ShardStream(_config(shards)), 3, 5))
    expected = other_rank.get_batch([s.key for s in extra], torch.stack([s.target for s in extra]))
    other_rank.flush()
    assert len(list(cache.folder(RES).glob("1-*.safetensors"))) == 1
    fresh.rescan_s = 0.0
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("cache miss"))
    assert torch.equal(fresh.get_batch([s.key for s in extra], torch.stack([s.target for s in extra])), expected)
    monkeypatch.undo()

    # Another resolution or another VAE is another entry, never a stale hit.
    small = torch.nn.functional.interpolate(samples[0].target[None], size=8)[0]
    assert cache.get(samples[0].key, small).shape[-1] == first.shape[-1] // 2
    from mumu_model.build import build_vae

    torch.manual_seed(123)
    other = LatentCache(tmp_path / "latents", build_vae())
    assert other.directory != cache.directory
    assert not torch.equal(other.get(samples[0].key, samples[0].target), first) and other.misses == 1

    # A damaged file is ignored and its latents computed again: the same values.
    written.write_bytes(written.read_bytes()[:100])
    again = LatentCache(tmp_path / "latents", pipe.vae)
    assert torch.equal(again.get(samples[0].key, samples[0].target), first) and again.misses == 1
    # ... also when it is damaged after the cache read its header.
    again.flush()
    reader = LatentCache(tmp_path / "latents", pipe.vae)
    assert torch.equal(reader.get(samples[0].key, samples[0].target), first) and reader.hits == 1
    for path in cache.folder(RES).glob("*.safetensors"):
        path.write_bytes(b"")
    recomputed = reader.get_batch([s.key for s in samples], pixels)  # a batch of 3: not bitwise the 1 + 2 above
    torch.testing.assert_close(recomputed, batch, atol=1e-5, rtol=1e-4)
    assert reader.misses == 3 and torch.equal(reader.get_batch([s.key for s in samples], pixels), recomputed)


def test_shard_weights_mix_sources_per_epoch_and_resume(shards):
    from collections import Counter

    folder = shards.rsplit("/", 1)[0]
    # Shard 00000 twice per epoch, shard 00001 about half the time; a4 and b0 are bad (skipped).
    config = DataConfig(shards=(f"{folder}/00000.tar", f"{folder}/00001.tar"), shard_weights=(2, 0.5),
                        resolution=RES, conditioning_dropout=0.0, augment_probability=0.0)
    stream = ShardStream(config)
    epochs: dict[int, Counter] = {}
    for sample in islice(stream, 200):
        epochs.setdefault(sample.epoch, Counter())[sample.key] += 1
    full = [epochs[e] for e in sorted(epochs)[:-1]]  # the last epoch may be cut short
    assert len(full) >= 10
    for counts in full:
        assert all(counts[k] == 2 for k in ("a0", "a1", "a2", "a3"))
        assert all(counts[k] <= 1 for k in ("b1", "b2", "b3", "b4"))
    visits = sum(sum(counts[k] for k in ("b1", "b2", "b3", "b4")) for counts in full) / (4 * len(full))
    assert 0.3 < visits < 0.7  # about half of the epochs

    # The same stream again, and a fresh one resumed mid-epoch from a state, continue alike.
    again = ShardStream(config)
    first = list(islice(again, 13))
    state = again.state_dict()
    assert state["shard_weights"] == [2.0, 0.5]
    rest = list(islice(again, 20))
    resumed = ShardStream(config)
    resumed.load_state_dict(state)
    assert [s.key for s in islice(resumed, 20)] == [s.key for s in rest]
    assert [s.key for s in first] == [s.key for s in islice(ShardStream(config), 13)]

    # Another weighting names other samples: its state is refused, and so is resharding it.
    other = ShardStream(DataConfig(shards=config.shards, shard_weights=(1, 1), resolution=RES))
    with pytest.raises(ValueError, match="shard_weights"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"resume it with 1 process"):
        reshard_states([state], 0, 2)
    with pytest.raises(ValueError, match="2 weights for 1 shard patterns"):
        DataConfig(shards=(shards,), shard_weights=(1, 2))
    with pytest.raises(ValueError, match="not all 0"):
        DataConfig(shards=config.shards, shard_weights=(0, 0))
