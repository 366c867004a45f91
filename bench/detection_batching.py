"""Benchmark: GroundingDINO with all phrases of an image in one query vs one query per phrase.

Tools such as autodistill run GroundingDINO once per class ("man.", then "dog.", ...), so an
image with P phrases costs P forwards. `GroundingDinoDetector` puts every phrase of an image
into one query ("man. dog. wilderness.") and batches images, which is how GroundingDINO was
trained and what its authors' demo does. Three ways over the same 8 real photos x 4 phrases
on the tiny random-weight detector (`mumu_model.testing.tiny_grounding_dino`):

- per_phrase: batch 1, one forward per (image, phrase): 32 forwards;
- per_image:  batch 1, one forward per image with all its phrases: 8 forwards;
- batched:    batch 8, one forward for all images: 1 forward.

Rounds alternate the order of the methods so that drift in the machine's speed hits all
alike; medians are reported. torch runs on one thread by default (--threads): on a shared
2-core machine, two threads on tiny ops spent most of their time waiting for each other (a
per-image run took ~4 s instead of ~0.25 s, and varied 3x between rounds). Thresholds are 0
so that the random weights return every query's box, which also makes the post-processing
cost the same for all methods.

Agreement: the per-phrase and the all-phrases queries are different inputs. GroundingDINO
masks text self-attention between phrases, but its encoder fuses the image with all the text
tokens at once and its decoder picks its queries by their best score over all phrases, so a
phrase's boxes depend on the other phrases of the query. The agreement is therefore measured,
not assumed: per (image, phrase) the top-scoring box of each method, and the fraction whose
IoU is >= 0.5. With random weights that number says nothing about a trained model; it shows
the two methods are not interchangeable bit for bit.

    python bench/detection_batching.py [--rounds 30] [--threads 1] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageOps
from skimage import data as photos

from mumu_model.atomic import write_bytes_atomic
from mumu_model.data.detection import (
    Detection,
    GroundingDinoDetector,
    Phrase,
    caption_phrases,
)
from mumu_model.testing import tiny_grounding_dino

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "detection_batching.json"

# scikit-image's sample photos (CC0) and captions with 4 phrases each; the mirrored photos
# make 8 images.
CAPTIONS = {
    "astronaut": "a woman in an orange spacesuit with a helmet and a flag",
    "coffee": "a cup of coffee with a spoon on a red saucer",
    "chelsea": "a tabby cat with green eyes, pink nose and long whiskers",
    "rocket": "a rocket on a launch pad under a blue sky near a tower",
}


def workload() -> tuple[list[Image.Image], list[list[Phrase]]]:
    images, phrases = [], []
    for mirror in (False, True):
        for name, caption in CAPTIONS.items():
            image = Image.fromarray(getattr(photos, name)())
            images.append(ImageOps.mirror(image) if mirror else image)
            found = caption_phrases(caption)
            assert len(found) == 4, (caption, found)
            phrases.append(found)
    return images, phrases


def vocabulary(phrases: list[list[Phrase]]) -> list[str]:
    return sorted({word.lower() for image in phrases for p in image for word in p.text.split()})


def run_per_phrase(detector, images, phrases) -> list[list[Detection]]:
    results = []
    for image, image_phrases in zip(images, phrases):
        found: list[Detection] = []
        for phrase in image_phrases:
            found += detector.detect([image], [[phrase]])[0]
        results.append(found)
    return results


def top_boxes(results: list[list[Detection]]) -> dict[tuple[int, str], Detection]:
    best: dict[tuple[int, str], Detection] = {}
    for index, detections in enumerate(results):
        for d in detections:
            key = (index, d.phrase.text)
            if key not in best or d.score > best[key].score:
                best[key] = d
    return best


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(reference: list[list[Detection]], other: list[list[Detection]], pairs: list) -> dict:
    ref, oth = top_boxes(reference), top_boxes(other)
    ious = [iou(ref[k].box, oth[k].box) if k in ref and k in oth else 0.0 for k in pairs]
    return {
        "pairs": len(pairs),
        "found_in_both": sum(k in ref and k in oth for k in pairs),
        "top_box_iou_at_least_0.5": sum(v >= 0.5 for v in ious) / len(pairs),
        "mean_top_box_iou": statistics.fmean(ious),
    }


def max_box_difference(a: list[list[Detection]], b: list[list[Detection]]) -> float | None:
    """Largest coordinate difference between two runs with the same queries, box by box;
    None if their detections do not line up one to one."""
    if [[d.phrase for d in x] for x in a] != [[d.phrase for d in x] for x in b]:
        return None
    pairs = [(da.box, db.box) for xa, xb in zip(a, b) for da, db in zip(xa, xb)]
    diffs = [abs(u - v) for box_a, box_b in pairs for u, v in zip(box_a, box_b)]
    return max(diffs, default=0.0)


def summarize(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    images, phrases = workload()
    pairs = [(i, p.text) for i, image_phrases in enumerate(phrases) for p in image_phrases]
    with tempfile.TemporaryDirectory(prefix="mumu-bench-") as tmp:
        path = tiny_grounding_dino(tmp, vocabulary(phrases))
        detector = GroundingDinoDetector(str(path), box_threshold=0.0, text_threshold=0.0)
    forwards = [0]
    detector.model.register_forward_hook(lambda *args: forwards.__setitem__(0, forwards[0] + 1))

    def batched():
        detector.batch_size = len(images)
        return detector.detect(images, phrases)

    def per_image():
        detector.batch_size = 1
        return detector.detect(images, phrases)

    def per_phrase():
        detector.batch_size = 1
        return run_per_phrase(detector, images, phrases)

    methods = {"per_phrase": per_phrase, "per_image": per_image, "batched": batched}
    outputs, forward_counts = {}, {}
    for name, method in methods.items():  # warm-up, and the outputs compared below
        forwards[0] = 0
        outputs[name] = method()
        forward_counts[name] = forwards[0]

    samples: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            begin = time.perf_counter()
            methods[name]()
            samples[name].append(time.perf_counter() - begin)

    # Batched and per-image runs send the same queries; what differs is the padding of images
    # of different sizes to the batch's size. With images of one size they must agree.
    same_size = [image.resize((96, 64)) for image in images]
    detector.batch_size = 1
    single = detector.detect(same_size, phrases)
    detector.batch_size = len(images)
    same_size_difference = max_box_difference(single, detector.detect(same_size, phrases))

    medians = {name: statistics.median(s) for name, s in samples.items()}
    result = {
        "benchmark": "GroundingDINO: all phrases of an image in one query vs one query per phrase",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "workload": {
            "images": len(images),
            "phrases_per_image": 4,
            "image_sizes": sorted({f"{im.width}x{im.height}" for im in images}),
            "model": "tiny random-weight GroundingDINO (tiny_grounding_dino): Swin 16-dim, "
            "d_model 32, 1 encoder + 2 decoder layers, 30 queries, images resized to 64 px",
            "thresholds": {"box": 0.0, "text": 0.0},
            "rounds": args.rounds,
        },
        "forwards_per_run": forward_counts,
        "methods": {name: summarize(s) for name, s in samples.items()},
        "speedup_per_image_over_per_phrase": medians["per_phrase"] / medians["per_image"],
        "speedup_batched_over_per_phrase": medians["per_phrase"] / medians["batched"],
        "speedup_batched_over_per_image": medians["per_image"] / medians["batched"],
        "agreement_per_phrase_vs_all_phrases": agreement(
            outputs["per_phrase"], outputs["per_image"], pairs
        ),
        "agreement_batched_vs_per_image": agreement(
            outputs["per_image"], outputs["batched"], pairs
        ),
        "max_box_difference_batched_vs_per_image_same_size_images_px": same_size_difference,
        "notes": (
            "Speed-ups are ratios of median wall times per run over all 8 images. Agreement "
            "compares, per (image, phrase), the top-scoring box of the one-phrase query with "
            "that of the all-phrases query: the queries differ, and GroundingDINO's encoder "
            "fuses the image with every text token and its decoder selects queries by their "
            "best score over all phrases, so boxes depend on the other phrases; with random "
            "weights the fraction says nothing about a trained model. batched vs per_image "
            "use identical queries and agree to float precision on images of one size; on "
            "images of different sizes they differ by the padding to the batch's size (the "
            "Swin backbone sees the black padding; only the transformer masks it)."
        ),
        "elapsed_s": time.perf_counter() - started,
    }
    write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    medians_s = {name: round(m, 4) for name, m in medians.items()}
    summary = {k: v for k, v in result.items() if k.startswith(("speedup", "agreement", "max_box"))}
    summary = {"forwards_per_run": forward_counts, "median_s": medians_s, **summary}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
