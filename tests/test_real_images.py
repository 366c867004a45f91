import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mumu_model.data.real_images import (
    DetrPersonCounter,
    ImageClassifierFilter,
    LlavaNextCaptioner,
    MinResolution,
    centre_crop_on_person,
    clean_caption,
    ingest_real_images,
    iter_image_folder,
    iter_webdataset,
)
from mumu_model.data.report import Skipped
from mumu_model.testing import tiny_detr, tiny_image_classifier, tiny_llava_next


# ---------------------------------------------------------------------------------------------
# Test images


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def giant_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG whose header claims a 10 Gpx image: must be refused before decoding."""
    data = bytearray(encoded(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encoded(photo(64, 64), "JPEG")
    return data[: len(data) // 2]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    photo(80, 60).save(root / "a" / "rgb.jpg")
    Image.new("CMYK", (70, 50), (0, 120, 200, 10)).save(root / "a" / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)).save(root / "b" / "deep.png")
    Image.new("RGBA", (60, 60), (255, 0, 0, 100)).save(root / "b" / "alpha.png")
    photo(40, 40).save(root / "b" / "small.webp")
    (root / "giant.png").write_bytes(giant_png_header())
    (root / "truncated.jpg").write_bytes(truncated_jpeg())
    (root / "notes.txt").write_text("not an image")
    (root / "upper.JPG").write_bytes(encoded(photo(64, 64), "JPEG"))
    return root


# ---------------------------------------------------------------------------------------------
# Sources


def test_iter_image_folder_is_sorted_and_never_raises(image_folder):
    items = list(iter_image_folder(image_folder))
    ids = [image_id for image_id, _, _ in items]
    assert ids == [
        "giant.png", "truncated.jpg", "upper.JPG",
        "a/cmyk.jpg", "a/rgb.jpg",
        "b/alpha.png", "b/deep.png", "b/small.webp",
    ]
    errors = {image_id: error for image_id, image, error in items if error}
    assert errors["giant.png"].startswith("image_too_large: ")
    assert errors["truncated.jpg"].startswith("unreadable_image: corrupt or truncated")
    assert len(errors) == 2
    for image_id, image, error in items:
        if error is None:
            assert image.mode == "RGB", image_id
    assert [image_id for image_id, _, _ in iter_image_folder(image_folder)] == ids  # deterministic
    # The caller's pixel budget applies too, from the header, before decoding.
    small_budget = dict((i, e) for i, _, e in iter_image_folder(image_folder, max_pixels=64 * 64))
    assert small_budget["a/rgb.jpg"] == "image_too_large: image too large: 80x60 pixels, at most 4096"
    assert small_budget["upper.JPG"] is None


def test_iter_image_folder_rejects_symlink_leaving_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    photo().save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (_, image, error), = iter_image_folder(root)
    assert image is None and "outside the allowed image root" in error
    with pytest.raises(NotADirectoryError):
        list(iter_image_folder(tmp_path / "missing"))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def test_iter_webdataset_groups_members_and_reports_damage(tmp_path):
    shard = make_shard(tmp_path / "000.tar", [
        ("s/001.jpg", encoded(photo(seed=1), "JPEG")),
        ("s/001.txt", b"a  man\nwith a dog "),
        ("s/002.png", encoded(Image.new("RGBA", (32, 32), (0, 0, 255, 128)), "PNG")),
        ("s/002.json", json.dumps({"caption": "a blue square"}).encode()),
        ("s/003.json", b"{}"),  # no image
        ("s/004.jpg", truncated_jpeg()),
        ("s/001.jpg", encoded(photo(seed=2), "JPEG")),  # key seen before
        ("s/005.webp", encoded(photo(seed=3), "WEBP")),
        ("s/005.json", b"not json"),
        ("s/006.png", giant_png_header()),
    ])
    items = list(iter_webdataset(shard))
    by_key = [
        (key, image is not None, error.split(":")[0] if error else None, caption)
        for key, image, error, caption in items
    ]
    assert by_key == [
        ("s/001", True, None, "a man with a dog"),
        ("s/002", True, None, "a blue square"),
        ("s/003", False, "no_image", None),
        ("s/004", False, "unreadable_image", None),
        ("s/001", False, "duplicate_id", None),
        ("s/005", True, None, None),
        ("s/006", False, "image_too_large", None),
    ]
    assert items[1][1].mode == "RGB"

    # Compressed shards read the same way.
    with tarfile.open(tmp_path / "001.tar.gz", "w:gz") as tar:
        with tarfile.open(shard) as source:
            for member in source.getmembers():
                tar.addfile(member, source.extractfile(member))
    compressed = iter_webdataset([tmp_path / "001.tar.gz"])
    assert [(k, e) for k, _, e, _ in compressed] == [(k, e) for k, _, e, _ in items]


def test_iter_webdataset_survives_broken_shards(tmp_path):
    members = [(f"{i:03d}.jpg", encoded(photo(seed=i), "JPEG")) for i in range(4)]
    good = make_shard(tmp_path / "good.tar", members)
    data = good.read_bytes()

    # A truncated shard: the members before the cut are still read.
    cut = tmp_path / "cut.tar"
    with tarfile.open(good) as tar:
        third = tar.getmember("002.jpg")
    cut.write_bytes(data[: third.offset_data + 100])
    # A damaged header in the middle: reading resumes at the next member.
    damaged = bytearray(data)
    damaged[third.offset : third.offset + 100] = b"\xff" * 100
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 50)
    # A duplicate key in another shard of the same dataset.
    dup = make_shard(tmp_path / "dup.tar", members[:1])

    skipped = Skipped()
    paths = [cut, tmp_path / "damaged.tar", tmp_path / "garbage.tar", tmp_path / "missing.tar", dup]
    records = list(ingest_real_images(paths, skipped=skipped))
    # cut: 000, 001 read; damaged: 000..003 are duplicates of cut's keys except 002, 003.
    assert [r["image_id"] for r in records] == ["000", "001", "003"]
    assert skipped.counts == {
        "truncated_member": 1,  # cut.tar, 002.jpg
        "duplicate_id": 3,  # damaged.tar 000, 001; dup.tar 000
        "broken_tar": 3,  # damaged.tar's bad header, garbage.tar, missing.tar
    }


# ---------------------------------------------------------------------------------------------
# Tiny random models, saved and loaded by path like real checkpoints


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    # The head ignores the image and says "nsfw" with p = sigmoid(5).
    return tiny_image_classifier(tmp_path_factory.mktemp("tiny_vit"), ("normal", "nsfw"), reject_bias=5.0)


@pytest.fixture(scope="module")
def one_person_dir(tmp_path_factory):
    return tiny_detr(tmp_path_factory.mktemp("detr1"), num_queries=1)


@pytest.fixture(scope="module")
def three_people_dir(tmp_path_factory):
    return tiny_detr(tmp_path_factory.mktemp("detr3"), num_queries=3)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava_next(tmp_path_factory.mktemp("tiny_llava"))


# ---------------------------------------------------------------------------------------------
# Filters, person counting, crop


def test_min_resolution():
    check = MinResolution(min_side=48)
    assert check(photo(64, 48)) and not check(photo(64, 47)) and check.name == "low_resolution"
    assert MinResolution().min_side == 512


def test_image_classifier_filter(classifier_dir):
    nsfw = ImageClassifierFilter(str(classifier_dir), ["NSFW"], threshold=0.5)
    assert nsfw.name == "nsfw"
    assert nsfw.reject_probability(photo()) == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-4)
    assert nsfw(photo()) is False  # rejected
    assert ImageClassifierFilter(str(classifier_dir), ["nsfw"], threshold=0.999)(photo()) is True
    normal = ImageClassifierFilter(str(classifier_dir), ["normal"], name="not_nsfw")
    assert normal(Image.new("CMYK", (40, 40))) is True and normal.name == "not_nsfw"
    with pytest.raises(ValueError, match="must name labels"):
        ImageClassifierFilter(str(classifier_dir), ["watermark"])


def test_detr_person_counter(one_person_dir, three_people_dir):
    image = photo(120, 80)
    (box,) = DetrPersonCounter(str(one_person_dir), threshold=0.5)(image)
    x0, y0, x1, y1 = box
    assert 0 <= x0 <= x1 <= 120 and 0 <= y0 <= y1 <= 80
    assert len(DetrPersonCounter(str(three_people_dir), threshold=0.5)(image)) == 3
    assert DetrPersonCounter(str(three_people_dir), threshold=0.9999)(image) == []
    with pytest.raises(ValueError, match="no label 'cat'"):
        DetrPersonCounter(str(one_person_dir), label="cat")


def test_centre_crop_on_person():
    image = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1)))  # pixel value = x
    centred = centre_crop_on_person(image, None)
    assert centred.size == (100, 100) and np.asarray(centred)[0, 0] == 50
    on_person = centre_crop_on_person(image, (120, 10, 160, 90))  # centre x = 140
    assert np.asarray(on_person)[0, 0] == 90
    at_edge = centre_crop_on_person(image, (180, 0, 200, 50))  # clamped inside the image
    assert at_edge.size == (100, 100) and np.asarray(at_edge)[0, 0] == 100
    assert centre_crop_on_person(image, (0, 0, 10, 10), size=32).size == (32, 32)


# ---------------------------------------------------------------------------------------------
# Captions


def test_llava_captioner_plumbing(llava_dir):
    images = [photo(50, 40, seed=1), photo(30, 90, seed=2), Image.new("RGBA", (64, 64)), photo(64, 64, seed=4)]
    captioner = LlavaNextCaptioner(str(llava_dir), max_new_tokens=8, batch_size=3)
    assert captioner.prompt == "[INST] <image>\nDescribe this image in one sentence. [/INST]"
    captions = captioner.caption(images)
    assert len(captions) == 4 and all(isinstance(c, str) and "\n" not in c for c in captions)
    # Batch-size independent: greedy decoding of each image alone gives the same captions.
    alone = LlavaNextCaptioner(str(llava_dir), max_new_tokens=8, batch_size=1).caption(images)
    assert alone == captions
    assert captioner.caption([]) == []


def test_llava_captioner_counts_empty_output(llava_dir):
    captioner = LlavaNextCaptioner(str(llava_dir), max_new_tokens=4, batch_size=2)
    with torch.no_grad():  # every logit equal: greedy picks token 0, a special token -> ""
        captioner.model.get_output_embeddings().weight.zero_()
    skipped = Skipped()
    assert captioner.caption([photo(), photo(seed=1)], ids=["x", "y"], skipped=skipped) == ["", ""]
    assert skipped.counts == {"empty_caption": 2} and skipped.examples["empty_caption"] == ["x", "y"]


def test_clean_caption():
    assert clean_caption("  A man\n\twith a\x00dog.  ") == "A man with a dog."
    assert clean_caption("\n \x07") == ""


# ---------------------------------------------------------------------------------------------
# Everything together


def test_ingest_folder_end_to_end(image_folder, classifier_dir, one_person_dir, llava_dir):
    skipped = Skipped()
    records = list(ingest_real_images(
        image_folder,
        filters=[
            MinResolution(min_side=48),
            ImageClassifierFilter(str(classifier_dir), ["nsfw"], threshold=0.999),  # keeps all
        ],
        person_counter=DetrPersonCounter(str(one_person_dir), threshold=0.5),
        captioner=LlavaNextCaptioner(str(llava_dir), max_new_tokens=6, batch_size=2),
        crop_size=32,
        skipped=skipped,
    ))
    kept = ["upper.JPG", "a/cmyk.jpg", "a/rgb.jpg", "b/alpha.png", "b/deep.png"]  # CMYK/16-bit/alpha ok
    assert skipped.counts["image_too_large"] == 1 and skipped.counts["unreadable_image"] == 1
    assert skipped.counts["low_resolution"] == 1  # b/small.webp, 40 px
    # Random weights may caption an image with nothing; that is counted, never yielded.
    ids = [r["image_id"] for r in records]
    assert len(ids) + skipped.counts.get("empty_caption", 0) == len(kept)
    assert ids == [i for i in kept if i in ids]
    for record in records:
        assert set(record) == {"image_id", "image", "caption", "width", "height", "person_box"}
        assert record["image"].mode == "RGB" and record["image"].size == (32, 32)
        assert (record["width"], record["height"]) == (32, 32)
        assert isinstance(record["caption"], str) and record["caption"]
        x0, y0, x1, y1 = record["person_box"]
        assert 0 <= x0 <= x1 <= 32 and 0 <= y0 <= y1 <= 32


def test_ingest_counts_every_rejection(image_folder, classifier_dir, three_people_dir):
    skipped = Skipped()

    def broken_filter(image):
        if image.size == (70, 50):  # the CMYK one
            raise RuntimeError("model crashed")
        return True

    broken_filter.name = "broken"
    records = list(ingest_real_images(
        image_folder,
        filters=[broken_filter],
        person_counter=DetrPersonCounter(str(three_people_dir), threshold=0.5),
        skipped=skipped,
    ))
    assert records == []
    assert skipped.counts == {
        "image_too_large": 1, "unreadable_image": 1, "filter_error": 1, "too_many_people": 5,
    }
    assert skipped.examples["too_many_people"][0] == "upper.JPG: 3 people"

    # Without a person counter or captioner: centre crops, source captions (None for files).
    nsfw_everything = ImageClassifierFilter(str(classifier_dir), ["nsfw"])
    skipped = Skipped()
    assert list(ingest_real_images(image_folder, filters=[nsfw_everything], skipped=skipped)) == []
    assert skipped.counts["nsfw"] == 6
    records = list(ingest_real_images(image_folder))
    assert len(records) == 6 and all(r["person_box"] is None and r["caption"] is None for r in records)
    assert all(r["width"] == r["height"] == min(r["image"].size) for r in records)


def test_ingest_webdataset_keeps_source_captions(tmp_path):
    shard = make_shard(tmp_path / "000.tar", [
        ("001.jpg", encoded(photo(80, 60), "JPEG")),
        ("001.json", json.dumps({"caption": "a photo"}).encode()),
        ("002.png", encoded(photo(60, 60), "PNG")),
    ])
    records = list(ingest_real_images(str(shard)))
    summary = [(r["image_id"], r["caption"], r["width"]) for r in records]
    assert summary == [("001", "a photo", 60), ("002", None, 60)]
    with pytest.raises(FileNotFoundError):
        next(ingest_real_images(tmp_path / "missing.tar"))
