"""The toy world's "pretrained" parts, trained from its own renders.

No pretrained weights exist offline, so in the toy profile the data graph trains the parts a
real run downloads: a VAE (SDXL's role) and a CLIP scorer (PickScore's role). Both are the real
architectures (diffusers `AutoencoderKL`, transformers `CLIPModel`), small, trained on CPU in
a minute or two each, and saved with `save_pretrained` so that the production loaders open them
unchanged: `AutoencoderKL.from_pretrained(path)`, `ClipEmbedder(path, path)`, `PickScorer(path)`.

    train_toy_vae(images, out_dir)          -> metrics  (32x32 RGB -> 16x16x4 latents)
    train_toy_clip(images, texts, out_dir)  -> metrics  (a word-level tokenizer, hard negatives)

Both are deterministic given `seed` (and the number of torch threads, which changes the float
summation order), leave the caller's global torch RNG as it was, use the
torch threads the caller set, and write atomically: `out_dir` holds the old model or the whole
new one, never half of one, and is untouched when training fails.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from ..atomic import atomic_dir
from ..data.scoring import l2_normalize, pooled_features
from ..images import to_rgb
from .world import BACKGROUNDS, PALETTE, SHAPES, SIZES

__all__ = [
    "TOY_WORDS",
    "caption_hard_negatives",
    "toy_clip",
    "toy_clip_processor",
    "toy_clip_tokenizer",
    "toy_vae",
    "train_toy_clip",
    "train_toy_vae",
]

Log = Callable[[str], None] | None

LOG_EVERY = 50  # steps between progress lines


# -- shared helpers --------------------------------------------------------------------------


def _check_run(steps: int, batch_size: int, lr: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")


def _rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
        raise ValueError(f"images must be a sequence of PIL images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("no images to train on")
    bad = [i for i, image in enumerate(images) if not isinstance(image, Image.Image)]
    if bad:
        raise ValueError(f"images[{bad[0]}] is a {type(images[bad[0]]).__name__}, not a PIL image")
    # The project's one conversion (alpha over black), so training sees what inference sees.
    return [to_rgb(image) for image in images]


def _split(n: int, generator: torch.Generator, fraction: float = 0.05, most: int = 512) -> tuple[list, list]:
    """Shuffled train and held-out indices; with too few images to spare any, the held-out
    metrics are measured on the training images (and say so)."""
    order = torch.randperm(n, generator=generator).tolist()
    held = min(most, int(n * fraction))
    return (order[held:], order[:held]) if held else (order, order)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%: Adam's first steps are noisy, and a decayed
    rate settles the weights in the last steps of a short run."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


# -- the VAE ---------------------------------------------------------------------------------


def _norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups of >= 4 channels each (SD's VAE: 128 channels in 32 groups).

    Fewer channels per group hurts a small VAE badly: with one channel per group GroupNorm is
    InstanceNorm, which removes each channel's mean over the image, and the decoder's last norm
    then cannot carry an absolute colour. (Measured: 16 groups of 1 channel reached 22.7 dB in
    400 steps where 4 groups of 4 reached 23.9 dB.)
    """
    common = math.gcd(*channels)
    return max([g for g in range(1, common + 1) if common % g == 0 and common // g >= 4], default=1)


def toy_vae(block_out_channels: Sequence[int] = (32, 32), sample_size: int = 32) -> AutoencoderKL:
    """An untrained `AutoencoderKL` with two blocks: it downsamples by 2, so 32x32 RGB images
    become 16x16x4 latents (SDXL's VAE: 8x, 1024 px -> 128x128x4)."""
    channels = tuple(int(c) for c in block_out_channels)
    if len(channels) != 2 or min(channels) < 1:
        raise ValueError(f"block_out_channels must be two positive ints, got {block_out_channels!r}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_norm_groups(channels),
        sample_size=sample_size,
        # Self-attention over 16x16 positions doubled the step time and 32 px images of flat
        # shapes need no global context to be reconstructed.
        mid_block_add_attention=False,
    )


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] float in [-1, 1], the range diffusers' VAEs work in."""
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"all images must have the same size, got {sorted(sizes)[:4]}")
    (width, height), = sizes
    if width % 2 or height % 2:
        raise ValueError(f"image sides must be even (the VAE halves them), got {width}x{height}")
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def _psnr(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 128) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of reconstructions from the posterior mean, which is
    what the diffusion model is trained on (`training.data.vae_latents`)."""
    values = []
    for start in range(0, len(pixels), batch):
        x = pixels[start:start + batch]
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        values.append(10 * torch.log10(1 / mse))
    return float(torch.cat(values).mean())


def train_toy_vae(
    images: Sequence[Image.Image],
    out_dir: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    block_out_channels: Sequence[int] = (32, 32),
    kl_weight: float = 1e-6,
    log: Log = None,
) -> dict:
    """Train a small `AutoencoderKL` on `images` and save it to `out_dir` (safetensors).

    The loss is LDM's autoencoder loss without its GAN and perceptual terms: reconstruction
    (MSE in [-1, 1] pixels) plus `kl_weight` x KL, with both summed per image as in LDM (so
    1e-6 means what it means there). Afterwards `scaling_factor` is set to 1 / std of the
    latents of up to 512 training images, so the diffusion model sees ~unit-variance latents
    (SD and SDXL chose theirs the same way). No `shift_factor`, as in SD and SDXL; training
    (`vae_latents`) and decoding (`MUMUPipeline._decode`) would both honour one.

    The defaults, measured on 5,000 toy renders: 28.9 dB PSNR on held-out renders (object
    interiors off by 8 RGB units on average, none by more than 60), in 162 s on one CPU thread
    (0.10 s a step); two idle cores take 0.052 s a step, so ~80 s. 1,000 steps: 26.8 dB in
    113 s on one thread. Small batches win on CPU: for the same compute, batches of 8 learnt
    far faster than batches of 32 (26.0 dB vs 23.9 dB), and (32, 32) channels beat (32, 64),
    which cost 3x as much a step.

    Returns `{"recon_loss", "psnr_heldout", "heldout_images", "scaling_factor",
    "posterior_std", "steps", "seconds"}`; `recon_loss` is the MSE of the last 50 steps.
    """
    _check_run(steps, batch_size, lr)
    if not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    pixels = _pixels(_rgb_images(images))
    started = time.perf_counter()

    # fork_rng: the run depends only on `seed`, and the caller's RNG stream is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        train_ids, held_ids = _split(len(pixels), generator)
        train, held = pixels[train_ids], pixels[held_ids]

        vae = toy_vae(block_out_channels, sample_size=pixels.shape[-1]).train()
        optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        values_per_image = train[0].numel()
        recent: list[float] = []
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
            x = train[torch.randint(len(train), (batch_size,), generator=generator)]
            # Horizontal flips: the world has no left or right, so this is free extra data.
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)

            posterior = vae.encode(x).latent_dist
            y = vae.decode(posterior.sample()).sample
            recon = F.mse_loss(y, x)
            # diffusers' kl() is summed over the latent; per pixel value, as `recon` is.
            loss = recon + kl_weight * posterior.kl().mean() / values_per_image

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent = (recent + [recon.item()])[-50:]
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                _say(log, f"vae step {step + 1}/{steps} recon {np.mean(recent):.5f} "
                          f"({time.perf_counter() - started:.0f} s)")

        vae.eval()
        with torch.no_grad():
            sample = train[:512]
            posterior = vae.encode(sample).latent_dist
            latents = posterior.mean
            scaling_factor = 1.0 / float(latents.std())
            posterior_std = float(posterior.std.mean())
        if not math.isfinite(scaling_factor) or scaling_factor <= 0:
            raise ValueError(f"training diverged: latent std gives scaling factor {scaling_factor}")
        vae.register_to_config(scaling_factor=scaling_factor)
        psnr = _psnr(vae, held)

    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    metrics = {
        "recon_loss": float(np.mean(recent)),
        "psnr_heldout": psnr,
        "heldout_images": len(held_ids) if held_ids is not train_ids else 0,
        "scaling_factor": scaling_factor,
        "posterior_std": posterior_std,
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }
    _say(log, f"vae done: psnr {psnr:.2f} dB, scaling factor {scaling_factor:.4f}, {metrics['seconds']:.0f} s")
    return metrics


# -- the CLIP scorer -------------------------------------------------------------------------

# Every word of the toy prompt grammar (`world.format_prompt`), each one token of the tokenizer.
TOY_WORDS: tuple[str, ...] = (*SHAPES, *PALETTE, *SIZES, *BACKGROUNDS, "a", "an", "and", "style", ",")

CLIP_IMAGE_SIZE = 32


def toy_clip_tokenizer(words: Sequence[str] = TOY_WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which each of `words` is a single token; any other text still
    encodes, byte by byte (every byte is in the vocabulary, with and without "</w>").

    One token per word keeps the text tower's sequences short (a toy prompt is ~10-20 tokens)
    and makes each word one embedding to learn. The merges build each word right to left:
    "e" + "d</w>" -> "ed</w>", then "r" + "ed</w>" -> "red</w>". Every merge's right part ends
    in "</w>", so a merge can only apply at the end of a word, to the suffix that word has
    built so far; merges of different words therefore never compete, and shared suffixes
    ("red" in "checkered") reuse the same merges.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if not word.isascii() or not word.strip() or word != word.strip():
            raise ValueError(f"toy words must be ASCII without spaces, got {word!r}")
        built = word[-1] + "</w>"
        for char in reversed(word[:-1]):
            merged = char + built
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((char, built))
            built = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def toy_clip_processor(tokenizer: CLIPTokenizer | None = None) -> CLIPProcessor:
    # 32 px in, 32 px to the model: the resize and the centre crop keep every pixel.
    side = CLIP_IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer or toy_clip_tokenizer())


def toy_clip(tokenizer: CLIPTokenizer, width: int = 64, layers: int = 2, projection_dim: int = 64) -> CLIPModel:
    """An untrained `CLIPModel`: 32 px images in 4 px patches (64 tokens), two `layers`-deep
    towers of `width`, a `projection_dim` joint space."""
    heads = max(1, width // 32)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection_dim,
        # CLIP pools the text at the first EOS token, which must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=CLIP_IMAGE_SIZE, patch_size=4, projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    return CLIPModel(config)


_COLOUR_WORD = re.compile(r"\b(" + "|".join(PALETTE) + r")\b")
_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_ARTICLE_BEFORE = re.compile(r"\ban? $")  # "a " or "an " right before a colour word


def caption_hard_negatives(text: str, rng: random.Random) -> dict[str, str]:
    """Edits of `text` that make it wrong for its image in the ways the scorer must catch
    (the renderer's deliberate defects are an object in the wrong colour, or one left out):

    - "colour": one named colour swapped for another ("a red circle" -> "a blue circle");
    - "missing": one object's phrase dropped, so the caption misses an object of the image;
    - "extra": a phrase for a shape the caption does not name inserted, so the caption names
      an object the image lacks: the same mismatch as a render with an object left out, seen
      from the text side.

    A kind that does not apply is left out: no colour swap without a colour word (adding one
    could name the right colour), no drop of a single object, no extra object in a caption
    that names no shape or all of them. Toy captions name every object drawn, with distinct
    shapes, so each edit is certainly wrong.
    """
    negatives = {}
    colours = list(_COLOUR_WORD.finditer(text))
    if colours:
        match = rng.choice(colours)
        other = rng.choice([c for c in PALETTE if c != match.group()])
        # Keep the article right ("an orange" -> "a green"), or the article would give away
        # which caption is the edited one.
        before = _ARTICLE_BEFORE.sub(lambda m: "an " if other[0] in "aeiou" else "a ", text[:match.start()])
        negatives["colour"] = before + other + text[match.end():]
    content, comma, style = text.partition(",")
    phrases = content.split(" and ")
    if len(phrases) > 1:
        kept = phrases[:]
        del kept[rng.randrange(len(kept))]
        negatives["missing"] = " and ".join(kept) + comma + style
    named = set(_SHAPE_WORD.findall(content))
    unnamed = [shape for shape in SHAPES if shape not in named]
    if named and unnamed:
        # Size and colour words as often as the toy prompts have them, so that a bare phrase
        # does not give the edit away.
        words = [rng.choice(SIZES)] if rng.random() < 0.5 else []
        words += [rng.choice(list(PALETTE))] if rng.random() < 0.2 else []
        words.append(rng.choice(unnamed))
        extra = phrases[:]
        extra.insert(rng.randrange(len(extra) + 1), ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
        negatives["extra"] = " and ".join(part.strip() for part in extra) + comma + style
    return negatives


def _clip_features(model: CLIPModel, pixel_values=None, tokens=None) -> torch.Tensor:
    """L2-normalised projected embeddings, read as `ClipEmbedder` reads them."""
    if pixel_values is not None:
        features = model.get_image_features(pixel_values=pixel_values)
    else:
        features = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return l2_normalize(pooled_features(features))


def _contrastive_loss(model, image_features, text_features, caption_ids, candidate_ids) -> torch.Tensor:
    """Symmetric InfoNCE. Image i's candidates are all texts (the batch's B captions, then the
    hard negatives), its target is text i; text i's candidates are the B images. A candidate
    that is the same string as the target caption is no negative (two images with the same
    caption, or a dropped-object negative that happens to equal another image's caption), so
    it is masked out rather than pushed away."""
    batch = len(image_features)
    logits = model.logit_scale.exp() * image_features @ text_features.T  # [B, B + hard negatives]
    target = torch.arange(batch)
    same = caption_ids[:, None] == candidate_ids[None, :]
    same[target, target] = False
    logits = logits.masked_fill(same, float("-inf"))
    image_to_text = F.cross_entropy(logits, target)
    text_to_image = F.cross_entropy(logits[:, :batch].T, target)
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def _clip_eval(model, pixels, texts, tokenizer, batch_size, rng) -> dict:
    """Held-out accuracies: image -> caption top-1 among the captions of its batch (a caption
    identical to the right one counts as right), and per kind of hard negative how often the
    right caption outscores it."""
    model.eval()
    top1 = []
    wins: dict[str, list[bool]] = {"colour": [], "missing": [], "extra": []}
    for start in range(0, len(texts), batch_size):
        captions = texts[start:start + batch_size]
        images = _clip_features(model, pixel_values=pixels[start:start + batch_size])
        tokens = tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_features = _clip_features(model, tokens=tokens)
        best = (images @ text_features.T).argmax(dim=1).tolist()
        top1 += [captions[j] == captions[i] for i, j in enumerate(best)]
        for i, caption in enumerate(captions):
            negatives = caption_hard_negatives(caption, rng)
            if not negatives:
                continue
            tokens = tokenizer([caption, *negatives.values()], padding=True, truncation=True, max_length=77,
                               return_tensors="pt")
            scores = images[i] @ _clip_features(model, tokens=tokens).T
            for kind, score in zip(negatives, scores[1:]):
                wins[kind].append(bool(scores[0] > score))
    model.train()
    rate = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
    return {
        "heldout_top1": rate(top1),
        "heldout_beats_colour_swap": rate(wins["colour"]),
        "heldout_beats_missing_object": rate(wins["missing"]),
        "heldout_beats_extra_object": rate(wins["extra"]),
    }


def train_toy_clip(
    images: Sequence[Image.Image],
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log: Log = None,
) -> dict:
    """Train a small `CLIPModel` contrastively on (image, text) pairs and save it with its
    `CLIPProcessor` in `out_dir`, loadable by `ClipEmbedder(out_dir, out_dir)` and
    `PickScorer(out_dir)`.

    Random in-batch captions are too easy to tell apart to teach what the scorer is for
    (catching an object in the wrong colour, or a missing one), so each caption's hard
    negatives (`caption_hard_negatives`) join the batch as extra text candidates. The
    logit scale is learnt and clamped to <= 100, as in CLIP.

    Images are preprocessed once by the saved processor, so training sees exactly the
    tensors the scorer will; horizontal flips are the augmentation (captions say nothing
    about left and right).

    How well the defaults score: docs/toy_learning.md.

    Returns `{"loss", "heldout_top1", "heldout_beats_colour_swap", "heldout_beats_missing_object",
    "heldout_beats_extra_object", "heldout_pairs", "logit_scale", "steps", "seconds"}`: `loss`
    is the mean of the last 50 steps; `heldout_beats_*` the share of held-out images whose
    caption outscores that kind of hard negative (NaN if no held-out caption allows it).
    """
    _check_run(steps, batch_size, lr)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} texts")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ValueError(f"texts[{bad[0]}] is not a non-empty string: {texts[bad[0]]!r}")
    rgb = _rgb_images(images)
    texts = list(texts)
    started = time.perf_counter()

    processor = toy_clip_processor()
    tokenizer = processor.tokenizer
    pixels = torch.cat([
        processor.image_processor(images=rgb[start:start + 256], return_tensors="pt")["pixel_values"]
        for start in range(0, len(rgb), 256)
    ])
    # Each distinct caption string gets an id, to recognise the same text as a candidate.
    text_id: dict[str, int] = {}

    def ids_of(strings: Sequence[str]) -> torch.Tensor:
        return torch.tensor([text_id.setdefault(s, len(text_id)) for s in strings])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        train_ids, held_ids = _split(len(texts), generator)
        model = toy_clip(tokenizer).train()
        # CLIP's weight decay; unlike CLIP also on gains, biases and the scale, which a run this
        # short barely feels (0.1 x 2e-3 x 600 steps shrinks a weight by ~10%).
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        batch_size = min(batch_size, len(train_ids))
        recent: list[float] = []
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
            # Without replacement within a batch: a repeated pair would be its own false negative.
            picked = [train_ids[i] for i in torch.randperm(len(train_ids), generator=generator)[:batch_size]]
            x = pixels[picked]
            flip = torch.rand(len(picked), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            captions = [texts[i] for i in picked]
            candidates = captions + [
                negative for caption in captions for negative in caption_hard_negatives(caption, rng).values()
            ]

            tokens = tokenizer(candidates, padding=True, truncation=True, max_length=77, return_tensors="pt")
            loss = _contrastive_loss(
                model, _clip_features(model, pixel_values=x), _clip_features(model, tokens=tokens),
                ids_of(captions), ids_of(candidates),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # as CLIP: a temperature below 1/100 makes training unstable
                model.logit_scale.clamp_(max=math.log(100.0))
            recent = (recent + [loss.item()])[-50:]
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                _say(log, f"clip step {step + 1}/{steps} loss {np.mean(recent):.4f} "
                          f"scale {model.logit_scale.exp().item():.1f} ({time.perf_counter() - started:.0f} s)")

        model.eval()
        held_texts = [texts[i] for i in held_ids]
        metrics = _clip_eval(model, pixels[held_ids], held_texts, tokenizer, batch_size, random.Random(seed + 1))

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    metrics = {
        "loss": float(np.mean(recent)),
        **metrics,
        "heldout_pairs": len(held_ids) if held_ids is not train_ids else 0,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }
    _say(log, f"clip done: top-1 {metrics['heldout_top1']:.3f}, colour swaps caught "
              f"{metrics['heldout_beats_colour_swap']:.3f}, missing objects caught "
              f"{metrics['heldout_beats_missing_object']:.3f}, {metrics['seconds']:.0f} s")
    return metrics
