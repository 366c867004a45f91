"""Does each crop's token state carry its own crop? An encoder probe that needs no training run.

    .venv/bin/python bench/encoder_probe.py                                  # fresh toy builds
    .venv/bin/python bench/encoder_probe.py --pipeline runs/stage1/pipeline runs/stage2/pipeline
    .venv/bin/python bench/encoder_probe.py --fresh "image_token_norm=false" --fresh ""

For every prompt of two or three crops in the toy validation and test suites, each crop's tokens
are averaged at three places: the connector's output (what enters the language model), the
language model's output, and the adapter's output (what the UNet's cross-attention reads). A
leave-one-prompt-out nearest-centroid probe, fitted on every other prompt's crops labelled with
their own colour, then names a colour for each crop: a crop whose tokens carry its own crop gives
its own colour; a crop overwritten by the first gives the first crop's colour. Also printed: the
RMS of image tokens and of text tokens where they enter the language model.

A model is a saved pipeline folder (`--pipeline`), or a fresh build of the toy profile with
`ModelConfig` overrides (`--fresh "field=value,field=value"`; "" is the profile as it is). With
neither, the toy profile is built fresh with the image-token norm off and on. Fresh builds use
the stage-1 crop size (28 px, 4 tokens) unless an override sets `image_size`.

Writes bench/results/encoder_probe.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eval.suites import load_entry, load_suite  # noqa: E402
from mumu_model.atomic import write_bytes_atomic  # noqa: E402
from mumu_model.config import load_model_config  # noqa: E402
from mumu_model.encoder import encoder_inputs  # noqa: E402

SUITES = ["eval/suites/toy/validation/val_two.yaml", "eval/suites/toy/validation/val_three.yaml",
          "eval/suites/toy/test/test_two.yaml", "eval/suites/toy/test/test_three.yaml"]
STAGES = ("connector", "lm", "adapter")


@dataclass
class Crops:
    """One row per crop of every probed prompt: its mean token state at each stage."""

    states: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in STAGES})
    colour: list[str] = field(default_factory=list)
    first_colour: list[str] = field(default_factory=list)  # the colour of the prompt's first crop
    slot: list[int] = field(default_factory=list)  # 1, 2, 3: the crop's place in its prompt
    prompt: list[int] = field(default_factory=list)
    image_rms: list[float] = field(default_factory=list)
    text_rms: list[float] = field(default_factory=list)


def _entries(suites: list[str]):
    """(prompt, colours) of every entry with two or more crops."""
    for path in suites:
        suite = load_suite(REPO / path)
        for entry in suite.entries:
            if len(entry.objects) < 2:
                continue
            loaded = load_entry(suite, entry, max_images=None)
            yield loaded.prompt, [o.colour for o in entry.objects]


@torch.no_grad()
def collect(pipe, suites: list[str], batch_size: int = 32) -> Crops:
    """Run the encoder and the adapter on every multi-crop prompt and keep each crop's states."""
    encoder, adapter, processor = pipe.encoder.eval(), pipe.adapter.eval(), pipe.processor
    lm_input: dict[str, torch.Tensor] = {}
    hook = encoder.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: lm_input.__setitem__("embeds", kwargs["inputs_embeds"]), with_kwargs=True)
    crops = Crops()
    items = list(_entries(suites))
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            inputs = encoder_inputs(processor, [prompt for prompt, _ in batch])
            out = encoder(**inputs, use_cache=False)
            image_mask = inputs["input_ids"] == encoder.config.image_token_id
            mask = inputs["attention_mask"].bool()
            embeds, _ = adapter(out.last_hidden_state, inputs["attention_mask"], image_mask)
            per_image = processor.image_seq_len
            connector = out.image_hidden_states.view(-1, per_image, out.image_hidden_states.shape[-1])
            image_index = 0
            for row, (_, colours) in enumerate(batch):
                positions = image_mask[row].nonzero().flatten().view(-1, per_image)
                if positions.shape[0] != len(colours):
                    raise SystemExit(f"prompt {start + row}: {positions.shape[0]} images for {len(colours)} objects")
                text = mask[row] & ~image_mask[row]
                crops.text_rms.append(lm_input["embeds"][row][text].pow(2).mean().sqrt().item())
                for slot, (where, colour) in enumerate(zip(positions, colours), start=1):
                    crops.states["connector"].append(connector[image_index].mean(0).numpy())
                    crops.states["lm"].append(out.last_hidden_state[row, where].mean(0).numpy())
                    crops.states["adapter"].append(embeds[row, where].mean(0).numpy())
                    crops.image_rms.append(lm_input["embeds"][row, where].pow(2).mean().sqrt().item())
                    crops.colour.append(colour)
                    crops.first_colour.append(colours[0])
                    crops.slot.append(slot)
                    crops.prompt.append(start + row)
                    image_index += 1
    finally:
        hook.remove()
    return crops


def nearest_centroid(states: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Leave-one-group-out nearest-centroid predictions on standardised features."""
    x = (states - states.mean(0)) / (states.std(0) + 1e-8)
    predicted = np.empty(len(labels), dtype=object)
    classes = np.unique(labels)
    for group in np.unique(groups):
        held = groups == group
        fit = ~held
        centroids = np.stack([x[fit & (labels == c)].mean(0) for c in classes if (fit & (labels == c)).any()])
        names = np.array([c for c in classes if (fit & (labels == c)).any()])
        distances = ((x[held][:, None, :] - centroids[None]) ** 2).sum(-1)
        predicted[held] = names[distances.argmin(1)]
    return predicted


def probe(crops: Crops) -> dict:
    """Per stage and crop slot: how often the probe names the crop's own colour, and (slots 2+,
    where the first crop's colour differs) the first crop's."""
    colour, first = np.array(crops.colour), np.array(crops.first_colour)
    slot, groups = np.array(crops.slot), np.array(crops.prompt)
    result = {"crops": len(colour), "prompts": len(set(crops.prompt)),
              "image_rms": float(np.mean(crops.image_rms)), "text_rms": float(np.mean(crops.text_rms))}
    for stage in STAGES:
        predicted = nearest_centroid(np.stack(crops.states[stage]), colour, groups)
        for k in sorted(set(crops.slot)):
            here = slot == k
            result[f"{stage}/crop{k}_own"] = float((predicted[here] == colour[here]).mean())
            if k > 1:
                differs = here & (colour != first)
                result[f"{stage}/crop{k}_first"] = float((predicted[differs] == first[differs]).mean())
    return result


def _fresh(overrides: str):
    from mumu_model.build import build_pipeline

    values = dict(item.split("=", 1) for item in overrides.split(",") if item.strip())
    values.setdefault("image_size", "28")
    return build_pipeline(load_model_config("toy", {k.strip(): v.strip() for k, v in values.items()}))


def _table(results: dict[str, dict]) -> str:
    columns = ["image_rms", "text_rms"] + [f"{stage}/crop{k}_{what}" for stage in STAGES
                                           for k, what in ((2, "own"), (2, "first"), (3, "own"))]
    lines = ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, r in results.items():
        cells = [f"{r[c]:.4f}" if c.endswith("rms") else (f"{r[c]:.0%}" if c in r else "-") for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", nargs="*", default=[], help="saved pipeline folders to probe")
    parser.add_argument("--fresh", action="append", default=None,
                        help='a fresh toy build with these ModelConfig overrides ("field=value,..."); repeatable')
    parser.add_argument("--suites", nargs="*", default=SUITES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh builds' weights")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_probe.json")
    args = parser.parse_args(argv)
    fresh = args.fresh if args.fresh is not None else ([] if args.pipeline else ["image_token_norm=false", ""])

    from mumu_model.loading import load_pipeline

    results: dict[str, dict] = {}
    for folder in args.pipeline:
        results[str(folder)] = probe(collect(load_pipeline(Path(folder), device="cpu"), args.suites))
        print(_table({str(folder): results[str(folder)]}).splitlines()[-1], flush=True)
    for overrides in fresh:
        name = f"fresh toy ({overrides or 'profile defaults'}, seed {args.seed})"
        pipe = _fresh(f"seed={args.seed}," + overrides)
        results[name] = probe(collect(pipe, args.suites))
        print(_table({name: results[name]}).splitlines()[-1], flush=True)
    print(_table(results))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "suites": args.suites, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
