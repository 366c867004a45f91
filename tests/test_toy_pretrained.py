"""The toy VAE and CLIP trainers (mumu_model/toy/pretrained.py): what they save loads through
the production loaders, they learn, they are deterministic, and they fail cleanly.

Trained on a few hundred images drawn here (one solid shape on grey), with small step counts
and models, so the file runs in well under a minute on one thread.
"""

import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

from mumu_model.data.scoring import ClipEmbedder, PickScorer
from mumu_model.toy.pretrained import (
    TOY_WORDS,
    caption_hard_negatives,
    toy_clip_tokenizer,
    toy_vae,
    train_toy_clip,
    train_toy_vae,
)
from mumu_model.toy.world import PALETTE

COLOURS = ("red", "yellow", "green", "blue")
SHAPES = ("square", "circle")
VAE_ARGS = dict(steps=200, batch_size=4, lr=3e-3, block_out_channels=(8, 8))


def _draw(index: int, rng: random.Random) -> tuple[Image.Image, str]:
    colour, shape = COLOURS[index % 4], SHAPES[index // 4 % 2]
    grey = rng.randint(90, 170)
    image = Image.new("RGB", (32, 32), (grey, grey, grey))
    side = rng.randint(10, 18)
    x0, y0 = rng.randint(0, 32 - side), rng.randint(0, 32 - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=PALETTE[colour])
    return image, f"a {colour} {shape}, plain style"


@pytest.fixture(scope="module")
def pairs():
    rng = random.Random(0)
    return [_draw(i, rng) for i in range(320)]


@pytest.fixture(scope="module")
def vae_run(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    metrics = train_toy_vae([image for image, _ in pairs], out, seed=0, **VAE_ARGS)
    return out, metrics


@pytest.fixture(scope="module")
def clip_run(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "clip"
    images, texts = zip(*pairs)
    metrics = train_toy_clip(list(images), list(texts), out, steps=100, batch_size=32, lr=2e-3, seed=0)
    return out, metrics


def _only_safetensors(folder):
    names = [path.name for path in folder.rglob("*") if path.is_file()]
    assert any(name.endswith(".safetensors") for name in names), names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))], names


def _pixels(images):
    array = np.stack([np.asarray(image) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def _recon_mse(vae, x):
    return float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).pow(2).mean())


# -- VAE ---------------------------------------------------------------------------------------


def test_vae_saves_a_loadable_autoencoder_that_learnt(vae_run, pairs):
    out, metrics = vae_run
    _only_safetensors(out)
    vae = AutoencoderKL.from_pretrained(out).eval()
    x = _pixels([image for image, _ in pairs[:64]])
    assert vae.encode(x[:2]).latent_dist.mean.shape == (2, 4, 16, 16)

    torch.manual_seed(0)  # the weights training starts from
    untrained = toy_vae(VAE_ARGS["block_out_channels"]).eval()
    before, after = _recon_mse(untrained, x), _recon_mse(vae, x)
    assert after < 0.4 * before, (before, after)

    scale = vae.config.scaling_factor
    assert np.isfinite(scale) and scale > 0
    assert scale == pytest.approx(metrics["scaling_factor"])
    with torch.no_grad():  # ~unit variance after scaling, as the factor promises
        std = float((vae.encode(x).latent_dist.mean * scale).std())
    assert 0.7 < std < 1.4
    assert metrics["steps"] == VAE_ARGS["steps"] and metrics["seconds"] > 0
    assert metrics["heldout_images"] > 0 and metrics["psnr_heldout"] > 18


def test_vae_and_clip_are_deterministic_and_convert_images(tmp_path):
    rng = random.Random(1)
    images = [_draw(i, rng)[0] for i in range(16)]
    # Non-RGB input is converted, not refused.
    images[0] = images[0].convert("L")
    images[1] = images[1].convert("RGBA")
    texts = [f"a {COLOURS[i % 4]} square" for i in range(16)]
    state = torch.random.get_rng_state()
    for name in ("a", "b"):
        train_toy_vae(images, tmp_path / f"vae_{name}", steps=3, batch_size=4, block_out_channels=(8, 8), seed=5)
        train_toy_clip(images, texts, tmp_path / f"clip_{name}", steps=3, batch_size=8, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    for kind in ("vae", "clip"):
        weights = sorted((tmp_path / f"{kind}_a").glob("*.safetensors"))
        assert weights
        for path in weights:
            assert path.read_bytes() == (tmp_path / f"{kind}_b" / path.name).read_bytes(), path.name
    # Another seed, other weights.
    train_toy_vae(images, tmp_path / "vae_c", steps=3, batch_size=4, block_out_channels=(8, 8), seed=6)
    name = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "vae_c" / name).read_bytes() != (tmp_path / "vae_a" / name).read_bytes()


# -- CLIP --------------------------------------------------------------------------------------


def test_clip_loads_through_the_scorers_and_prefers_the_right_colour(clip_run, pairs):
    out, metrics = clip_run
    _only_safetensors(out)
    embedder = ClipEmbedder(str(out), str(out))
    assert embedder.logit_scale <= 100.0 + 1e-3
    assert embedder.images([pairs[0][0]]).shape == (1, 64)

    scorer = PickScorer(str(out))
    images = [image for image, _ in pairs[-64:]]
    right = [text for _, text in pairs[-64:]]
    swapped = [text.replace(text.split()[1], COLOURS[(COLOURS.index(text.split()[1]) + 1) % 4]) for text in right]
    wins = scorer.score(right, images) > scorer.score(swapped, images)
    assert wins.mean() >= 0.8, wins.mean()
    for key in ("loss", "heldout_top1", "heldout_beats_colour_swap", "seconds"):
        assert np.isfinite(metrics[key]), key
    assert metrics["heldout_pairs"] > 0 and metrics["steps"] == 100


def test_saved_tokenizer_is_word_level_for_the_toy_vocabulary(clip_run):
    out, _ = clip_run
    for tokenizer in (toy_clip_tokenizer(), ClipEmbedder(str(out), str(out)).processor.tokenizer):
        for word in TOY_WORDS:
            assert len(tokenizer.tokenize(word)) == 1, (word, tokenizer.tokenize(word))
        tokens = tokenizer.tokenize("a small circle and an orange square, striped style")
        assert len(tokens) == 10
        # Anything else still encodes, byte by byte, and round-trips.
        ids = tokenizer("Zebra 7 ünïcode!")["input_ids"]
        assert tokenizer.unk_token_id not in ids[1:-1]
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "zebra7ünïcode!"


def test_hard_negatives_edit_colour_and_objects():
    rng = random.Random(0)
    text = "a red circle and an orange square, plain style"
    for _ in range(20):
        negatives = caption_hard_negatives(text, rng)
        assert set(negatives) == {"colour", "missing", "extra"}
        assert negatives["colour"] != text and len(negatives["colour"].split()) == len(text.split())
        assert " an " not in negatives["colour"].replace("an orange", "")  # articles stay right
        assert negatives["missing"] in ("a red circle, plain style", "an orange square, plain style")
        assert negatives["extra"].count(" and ") == 2 and negatives["extra"].endswith(", plain style")
    assert caption_hard_negatives("a circle, plain style", rng).keys() == {"extra"}
    assert caption_hard_negatives("no toy words here", rng) == {}


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda out, im: train_toy_vae([], out), "no images"),
        (lambda out, im: train_toy_vae([im, im.resize((16, 16))], out), "same size"),
        (lambda out, im: train_toy_vae([im, "x.png"], out), "not a PIL image"),
        (lambda out, im: train_toy_vae([im.resize((15, 15))], out), "even"),
        (lambda out, im: train_toy_vae([im], out, steps=0), "steps"),
        (lambda out, im: train_toy_clip([], [], out), "no images"),
        (lambda out, im: train_toy_clip([im, im], ["a red square"], out), "2 images but 1 texts"),
        (lambda out, im: train_toy_clip([im], [None], out), "texts\\[0\\]"),
        (lambda out, im: train_toy_clip([im], ["a red square"], out, batch_size=0), "batch_size"),
    ],
)
def test_bad_input_raises_value_error_and_writes_nothing(tmp_path, call, message):
    image = Image.new("RGB", (32, 32), (120, 120, 120))
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "out", image)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["vae", "clip"])
def test_out_dir_is_untouched_when_training_fails(tmp_path, pairs, kind):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous model")

    def crash(message):
        raise RuntimeError("killed mid-training")

    images, texts = zip(*pairs[:32])
    with pytest.raises(RuntimeError, match="killed"):
        if kind == "vae":
            train_toy_vae(list(images), out, steps=2, batch_size=4, block_out_channels=(8, 8), log=crash)
        else:
            train_toy_clip(list(images), list(texts), out, steps=2, batch_size=8, log=crash)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    # A run that succeeds replaces the old folder as a whole.
    if kind == "vae":
        train_toy_vae(list(images), out, steps=1, batch_size=4, block_out_channels=(8, 8))
    else:
        train_toy_clip(list(images), list(texts), out, steps=1, batch_size=8)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_trained_toy_clip_embeds_for_the_binding_judge(clip_run, pairs):
    """The open slot-binding judge with the toy world's own trained CLIP as its embedding: a
    red square and a blue circle pasted in their slots are bound, swapped they leak, and the
    square pasted twice leaves the circle's slot leaked and the square duplicated."""
    from eval.binding import BindingJudge
    from mumu_model.data.detection import AnnotationsDetector

    out, _ = clip_run
    square, circle = pairs[0][0], pairs[7][0]  # renders of "a red square" and "a blue circle"
    assert "red square" in pairs[0][1] and "blue circle" in pairs[7][1]
    left, right = (0, 0, 32, 32), (40, 0, 72, 32)

    def canvas(*pastes):
        image = Image.new("RGB", (72, 32), (128, 128, 128))
        for picture, box in pastes:
            image.paste(picture, box[:2])
        return image

    cases = {
        "placed": (canvas((square, left), (circle, right)), [("square", left), ("circle", right)]),
        "swapped": (canvas((circle, left), (square, right)), [("square", left), ("circle", right)]),
        "twice": (canvas((square, left), (square, right)), [("square", left), ("circle", right)]),
    }
    judge = BindingJudge(AnnotationsDetector({k: boxes for k, (_, boxes) in cases.items()}),
                         [ClipEmbedder(str(out), str(out))])
    judged = judge.judge([image for image, _ in cases.values()], [(square, "square"), (circle, "circle")],
                         keys=list(cases))
    outcomes = {key: [s.outcome.split("+")[0] for s in j.slots] for key, j in zip(cases, judged)}
    assert outcomes == {"placed": ["bound", "bound"], "swapped": ["leaked", "leaked"], "twice": ["bound", "leaked"]}
    assert judged[2].row()["slot_duplicated"] == 0.5
