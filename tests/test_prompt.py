"""The multimodal prompt: text form parsing and errors, Python form validation, round trips."""

import hashlib
import io
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mumu_model.prompt import MultimodalPrompt, PromptError

TAG = "<img:good.png>"


def _noise_image(size=(8, 6), seed=0, mode="RGB") -> Image.Image:
    width, height = size
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "dir").mkdir(parents=True)
    (root / "sub").mkdir()
    _noise_image(seed=0).save(root / "good.png")
    _noise_image(seed=1).save(root / "sub" / "second.png")
    (root / "notes.txt").write_text("not an image")

    buffer = io.BytesIO()
    _noise_image(size=(64, 64), seed=2).save(buffer, format="PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[:200])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    # A PNG whose header claims 9000x9000 pixels: rejected before any decoding.
    data = bytearray(buffer.getvalue())
    data[16:24] = (9000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (root / "bomb.png").write_bytes(bytes(data))

    _noise_image(seed=3).save(tmp_path / "outside.png")
    (root / "link_out.png").symlink_to(tmp_path / "outside.png")
    return root


# (text, from_text keyword arguments, position, key phrase of the message)
MALFORMED = [
    # syntax
    ("<img:good.png", {}, 0, "unclosed image tag"),
    ("see <img:good.png\n> here", {}, 4, "expected '>' before '\\n'"),
    ("<img:good.png<img:sub/second.png>", {}, 0, "unclosed image tag"),
    ("ab<img:", {}, 2, "before the end of the text"),
    ("<foo>", {}, 0, "unknown tag '<foo>'"),
    ("x <IMG:good.png>", {}, 2, "unknown tag"),
    ("<image>", {}, 0, "unknown tag '<image>'"),
    ("a man <", {}, 6, "write '<<' for a literal '<'"),
    ("< img:good.png>", {}, 0, "unknown tag"),
    ("1 < 2", {}, 2, "'<<'"),
    ("<<<", {}, 2, "unknown tag '<'"),
    ("<img", {}, 0, "unknown tag"),
    ("<img:>", {}, 0, "empty image path"),
    ("<img: good.png>", {}, 0, "whitespace around the image path"),
    ("<img:good.png >", {}, 0, "whitespace around the image path"),
    ("<img:\tgood.png>", {}, 0, "whitespace around the image path"),
    # syntax errors are found before any file is opened, wherever they are
    ("<img:missing.png> <foo>", {}, 18, "unknown tag"),
    # image count and root
    (TAG * 5, {}, 4 * len(TAG), "5 images, at most 4 allowed"),
    ("x" + TAG * 2, {"max_images": 1}, 1 + len(TAG), "2 images, at most 1 allowed"),
    ("x" + TAG, {"max_images": 0}, 1, "1 images, at most 0 allowed"),
    ("a " + TAG, {"image_root": None}, 2, "needs an image_root"),
    # files
    ("<img:missing.png>", {}, 0, "no such file"),
    (TAG + " and <img:missing.png>", {}, len(TAG) + 5, "no such file"),
    ("<img:dir>", {}, 0, "is a directory"),
    ("<img:../outside.png>", {}, 0, "outside the allowed image root"),
    ("<img:sub/../../outside.png>", {}, 0, "outside the allowed image root"),
    ("<img:{outside}>", {}, 0, "outside the allowed image root"),
    ("<img:link_out.png>", {}, 0, "outside the allowed image root"),
    ("<img:a\x00b.png>", {}, 0, "invalid image path"),
    ("<img:notes.txt>", {}, 0, "not a recognised image file"),
    ("<img:corrupt.png>", {}, 0, "not a recognised image file"),
    ("<img:truncated.png>", {}, 0, "corrupt or truncated"),
    ("<img:bomb.png>", {}, 0, "too large"),
    (TAG, {"max_pixels": 47}, 0, "too large: 8x6 pixels, at most 47"),
]


@pytest.mark.parametrize("text, kwargs, position, phrase", MALFORMED)
def test_malformed_text(root, text, kwargs, position, phrase):
    text = text.replace("{outside}", str(root.parent / "outside.png"))
    kwargs = {"image_root": root, **kwargs}
    with pytest.raises(PromptError) as info:
        MultimodalPrompt.from_text(text, **kwargs)
    err = info.value
    assert err.position == position
    assert phrase in err.problem
    assert str(err) == f"position {position}: {err.problem}"
    assert "\n" not in str(err)


def test_malformed_table_is_large_enough():
    assert len(MALFORMED) >= 25


def test_image_load_errors_are_chained(root):
    with pytest.raises(PromptError) as info:
        MultimodalPrompt.from_text("<img:missing.png>", root)
    assert type(info.value.__cause__).__name__ == "ImageLoadError"
    assert "'missing.png'" in info.value.problem  # names the reference as written


# -- text form ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a photo of a dog",
        "a <img:good.png> man and his <img:sub/second.png> dog",
        "<img:good.png><img:good.png>",
        "literal << and > and >> and <<img:x.png>",
        "  spaces\n\nand newlines \t" + TAG + "\t",
        "<img:./good.png>",
    ],
)
def test_text_round_trip(root, text):
    prompt = MultimodalPrompt.from_text(text, root)
    assert prompt.to_text() == text
    assert MultimodalPrompt.from_text(prompt.to_text(), root) == prompt


def test_from_text_parts_and_paths(root):
    prompt = MultimodalPrompt.from_text("a <img:good.png> man << <img:sub/second.png>", root)
    assert [type(p).__name__ for p in prompt.parts] == ["str", "Image", "str", "Image"]
    assert prompt.parts[0] == "a " and prompt.parts[2] == " man < "
    assert prompt.image_paths == ("good.png", "sub/second.png")
    assert prompt.num_images == 2 and all(image.mode == "RGB" for image in prompt.images)
    assert prompt.images[0].tobytes() == _noise_image(seed=0).tobytes()
    assert prompt.text_with_placeholders("<image>") == "a <image> man < <image>"


def test_literal_angle_brackets_round_trip(root):
    prompt = MultimodalPrompt(["a < b <<c > d"])
    assert prompt.to_text() == "a << b <<<<c > d"
    assert MultimodalPrompt.from_text(prompt.to_text()) == prompt


def test_non_rgb_files_load_in_prompts(root):
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(root / "rgba.png")
    Image.new("LA", (4, 4), (90, 255)).save(root / "la.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(root / "cmyk.tif")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(root / "gray16.png")
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 255])
    palette.save(root / "p.png")
    text = "<img:rgba.png><img:la.png><img:cmyk.tif><img:gray16.png><img:p.png>"
    prompt = MultimodalPrompt.from_text(text, root, max_images=None)
    pixels = [image.getpixel((0, 0)) for image in prompt.images]
    assert pixels == [(128, 0, 0), (90, 90, 90), (255, 0, 0), (255, 255, 255), (0, 0, 255)]


def test_in_memory_images_round_trip(root):
    prompt = MultimodalPrompt(["a ", _noise_image(seed=5), " man and ", _noise_image(seed=6)])
    text = prompt.to_text(root)
    back = MultimodalPrompt.from_text(text, root)
    assert back == prompt
    assert all(path is not None for path in back.image_paths)
    assert back.to_text() == text


def test_mixed_references_keep_their_paths(root):
    from_file = MultimodalPrompt.from_text("a " + TAG, root)
    # A new prompt built from parts is a Python-form prompt: its images have no reference.
    rebuilt = MultimodalPrompt([*from_file.parts, " and ", _noise_image(seed=7)])
    assert rebuilt.image_paths == (None, None)
    text = rebuilt.to_text(root)
    assert text.startswith("a <img:") and " and <img:" in text
    assert MultimodalPrompt.from_text(text, root) == rebuilt
    assert from_file.to_text(root) == "a " + TAG  # a known reference is kept, nothing written


def test_content_addressed_write_is_idempotent(tmp_path):
    out = tmp_path / "written"  # created on demand
    prompt = MultimodalPrompt([_noise_image(seed=8), "x"])
    first, second = prompt.to_text(out), prompt.to_text(out)
    same_pixels = MultimodalPrompt([_noise_image(seed=8).convert("RGBA"), "x"])
    assert first == second == same_pixels.to_text(out)
    files = list(out.iterdir())
    assert len(files) == 1  # no temp files left either
    name = files[0].name
    assert first == f"<img:{name}>x"
    assert name == hashlib.sha256(files[0].read_bytes()).hexdigest()[:16] + ".png"


def test_to_text_without_root_needs_a_file():
    prompt = MultimodalPrompt(["a ", _noise_image(), " man"])
    with pytest.raises(PromptError) as info:
        prompt.to_text()
    message = "part 1: image has no file to refer to; pass an image_root to save it in"
    assert str(info.value) == message


# -- empty prompt -------------------------------------------------------------------------


def test_empty_prompt_is_valid():
    for prompt in (
        MultimodalPrompt(),
        MultimodalPrompt([]),
        MultimodalPrompt(["", ""]),
        MultimodalPrompt.from_text(""),
        MultimodalPrompt.coerce(""),
        MultimodalPrompt.coerce([]),
    ):
        assert prompt.is_empty and prompt.parts == () and prompt.num_images == 0
        assert prompt == MultimodalPrompt()
        assert prompt.to_text() == "" and prompt.text_with_placeholders("<image>") == ""
    assert not MultimodalPrompt([" "]).is_empty  # whitespace is content


# -- Python form --------------------------------------------------------------------------


def test_python_form_normalises():
    image = _noise_image()
    prompt = MultimodalPrompt(["a", "", "b", image, "", "c", "d"])
    assert len(prompt.parts) == 3
    assert prompt.parts[0] == "ab" and prompt.parts[2] == "cd"
    assert prompt.image_paths == (None,)
    assert repr(prompt) == "MultimodalPrompt('ab', <image 8x6>, 'cd')"
    assert prompt == MultimodalPrompt(("a", "b", image.copy(), "cd"))


@pytest.mark.parametrize(
    "parts, position, phrase",
    [
        (["a", 1], 1, "got int"),
        ([None], 0, "got NoneType"),
        (["a", "b", b"bytes"], 2, "got bytes"),
        ([np.zeros((2, 2, 3), np.uint8)], 0, "got ndarray"),
        ([["nested"]], 0, "got list"),
    ],
)
def test_python_form_rejects_bad_parts(parts, position, phrase):
    with pytest.raises(PromptError) as info:
        MultimodalPrompt(parts)
    assert info.value.position == position and info.value.unit == "part"
    assert str(info.value).startswith(f"part {position}: ") and phrase in str(info.value)


@pytest.mark.parametrize("parts", ["a <img:x.png>", _noise_image(), 42])
def test_python_form_rejects_non_lists(parts):
    with pytest.raises(PromptError, match="parts must be a list"):
        MultimodalPrompt(parts)


def test_python_form_image_limit():
    parts = ["x"] + [_noise_image(seed=i) for i in range(5)]
    with pytest.raises(PromptError) as info:
        MultimodalPrompt(parts)
    assert str(info.value) == "part 5: 5 images, at most 4 allowed"
    assert MultimodalPrompt(parts, max_images=None).num_images == 5
    assert MultimodalPrompt(parts, max_images=5).num_images == 5
    with pytest.raises(ValueError, match="max_images"):
        MultimodalPrompt(parts, max_images=-1)


def test_caller_image_is_not_mutated():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    before = image.tobytes()
    prompt = MultimodalPrompt(["a ", image])
    assert image.mode == "RGBA" and image.tobytes() == before
    assert prompt.images[0] is not image and prompt.images[0].getpixel((0, 0)) == (128, 0, 0)
    image.putpixel((0, 0), (0, 0, 0, 0))  # later edits by the caller do not leak in
    assert prompt.images[0].getpixel((0, 0)) == (128, 0, 0)


def test_equality():
    a = MultimodalPrompt(["x", _noise_image(seed=1)])
    assert a == MultimodalPrompt(["x", _noise_image(seed=1)])
    assert a != MultimodalPrompt(["x", _noise_image(seed=2)])
    assert a != MultimodalPrompt(["y", _noise_image(seed=1)])
    assert a != MultimodalPrompt(["x", _noise_image(size=(6, 8), seed=1)])
    assert a != MultimodalPrompt(["x"])
    assert a != "x"


# -- coerce -------------------------------------------------------------------------------


def test_coerce_accepts_three_forms(root):
    from_text = MultimodalPrompt.coerce("a " + TAG, root)
    from_list = MultimodalPrompt.coerce(["a ", _noise_image(seed=0)])
    from_tuple = MultimodalPrompt.coerce(("a ", _noise_image(seed=0)))
    assert from_text == from_list == from_tuple
    assert MultimodalPrompt.coerce(from_text) is from_text


def test_coerce_rechecks_image_limit():
    prompt = MultimodalPrompt(["a", _noise_image(), "b", _noise_image()])
    assert MultimodalPrompt.coerce(prompt, max_images=2) is prompt
    with pytest.raises(PromptError) as info:
        MultimodalPrompt.coerce(prompt, max_images=1)
    assert str(info.value) == "part 3: 2 images, at most 1 allowed"


@pytest.mark.parametrize("bad", [42, None, _noise_image(), {"text": "a"}])
def test_coerce_rejects_other_types(bad):
    with pytest.raises(PromptError, match="expected a MultimodalPrompt, a str or a list"):
        MultimodalPrompt.coerce(bad)


# -- PromptError --------------------------------------------------------------------------


def test_prompt_error_format_and_pickle():
    assert str(PromptError("bad")) == "bad"
    assert str(PromptError("bad", 3)) == "position 3: bad"
    err = PromptError("bad", 3, unit="part")
    assert str(err) == "part 3: bad" and isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.problem, copy.position, copy.unit, str(copy)) == ("bad", 3, "part", "part 3: bad")


def test_from_text_resolves_references_in_a_record_without_disk():
    crop = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    prompt = MultimodalPrompt.from_text("a <img:crop0.png> man", images={"crop0.png": crop})
    assert prompt.num_images == 1 and prompt.images[0].mode == "RGB"
    assert prompt.to_text() == "a <img:crop0.png> man"
    with pytest.raises(PromptError, match="position 2: image 'crop1.png' is not among"):
        MultimodalPrompt.from_text("a <img:crop1.png> man", images={"crop0.png": crop})
