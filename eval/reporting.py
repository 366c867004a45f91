"""Reporting for an evaluation: images, grids, rows.csv and summary.json, and the MLflow run.

Every file is written atomically under the evaluation's `out_dir`: the images as they are
generated (`save_png`), a grid per suite (inputs beside outputs, `suite_grid`), `samples.png`
(the first entries of every suite, small), `rows.csv` (one row per image) and `summary.json`
(`EvalResult` without its rows). `log_mlflow` logs params, `{suite}/{metric}` and
`aggregate/{metric}` metrics, and the grids and files, into a new run or an existing one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image, ImageDraw

from mumu_model.atomic import write_bytes_atomic
from mumu_model.data.shards import encode_image
from mumu_model.images import pad_to_square
from mumu_model.tracking import ensure_experiment, ensure_store, log_batch

from .suites import EntryError

if TYPE_CHECKING:
    from .generation import Generated

SAMPLES_GRID = "samples.png"  # the first SAMPLES_PER_SUITE entries of every suite
SAMPLES_PER_SUITE = 2


@dataclass
class EvalResult:
    rows: pd.DataFrame  # one row per generated image (suite, entry, seed, image, metrics)
    suites: dict[str, dict[str, float]]  # per suite: metric -> value
    aggregate: dict[str, float]  # over suites (means of suite means; counts summed)
    errors: list[EntryError]
    settings: dict[str, str]  # what was logged as MLflow params
    out_dir: Path
    run_id: str | None = None
    tracking_uri: str | None = None
    # Per suite with a world or binding rates: those figures in a line, each rate with its interval.
    headlines: dict[str, str] = field(default_factory=dict)
    ranked_by: list[str] = field(default_factory=list)  # the suites' worlds' main metrics (`compare.main_metric`)

    def metrics(self) -> dict[str, float]:
        """Flat, as logged: {"single_subject/clip_i": ..., "aggregate/clip_i": ...}."""
        flat = {f"{suite}/{name}": value for suite, values in self.suites.items() for name, value in values.items()}
        flat.update({f"aggregate/{name}": value for name, value in self.aggregate.items()})
        return flat


def save_png(out_dir: Path, relative: str, image: Image.Image) -> str:
    """Write `image` as PNG at `out_dir/relative` (a name ending in .png), atomically."""
    write_bytes_atomic(out_dir / relative, encode_image(image, relative))
    return relative


def suite_grid(items: list[Generated], cell: int = 128) -> Image.Image | None:
    """One row per entry: the prompt's images (padded to square, as the model sees them), a gap,
    one output per seed, and then another gap and the outputs to compare with: SDXL's for
    text-only entries, the text-only ablation's for entries with images. The entry id and
    prompt are written under each row."""
    if not items:
        return None
    label = 14
    # An entry has SDXL images (text-only) or ablation images (with images), never both.
    groups = [[list(i.entry.prompt.images), i.images, i.sdxl_images or i.ablation_images] for i in items]
    widths = [max(len(g[k]) for g in groups) for k in range(3)]
    columns = widths[0] + 1 + widths[1] + (1 + widths[2] if widths[2] else 0)
    grid = Image.new("RGB", (columns * cell, len(items) * (cell + label)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, (item, group) in enumerate(zip(items, groups)):
        top = row * (cell + label)
        starts = [0, widths[0] + 1, widths[0] + 1 + widths[1] + 1]
        for start, images in zip(starts, group):
            for column, image in enumerate(images):
                grid.paste(pad_to_square(image).resize((cell, cell)), ((start + column) * cell, top))
        right = "  | right: SDXL" if item.sdxl_images else "  | right: images removed" if item.ablation_images else ""
        caption = f"{item.entry.id}: {item.entry.entry.prompt}{right}"
        draw.text((2, top + cell + 1), caption[:300], fill=(0, 0, 0))
    return grid


def write_summary(result: EvalResult) -> None:
    summary = {
        "suites": result.suites,
        "aggregate": result.aggregate,
        "errors": [e.as_dict() for e in result.errors],
        "settings": result.settings,
        "headlines": result.headlines,
        "run_id": result.run_id,
        "tracking_uri": result.tracking_uri,
    }
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=True, default=str)
    write_bytes_atomic(result.out_dir / "summary.json", text.encode())


def write_report(result: EvalResult, generated: list[Generated], suite_names: list[str]) -> None:
    """The grids, samples.png, rows.csv and summary.json of `result` under its out_dir."""
    out_dir = result.out_dir
    for name in suite_names:
        grid = suite_grid([g for g in generated if g.entry.suite == name])
        if grid is not None:
            save_png(out_dir, f"grids/{name}.png", grid)
        else:  # nothing generated: no grid, and none left from an earlier run into out_dir
            (out_dir / "grids" / f"{name}.png").unlink(missing_ok=True)
    # The first entries of every suite in one small picture: what a reader of a report looks at.
    samples = suite_grid([g for name in suite_names
                          for g in [g for g in generated if g.entry.suite == name][:SAMPLES_PER_SUITE]], cell=64)
    if samples is not None:
        save_png(out_dir, SAMPLES_GRID, samples)
    write_bytes_atomic(out_dir / "rows.csv", result.rows.to_csv(index=False).encode())
    write_summary(result)


def log_mlflow(result: EvalResult, uri: str, experiment: str, run_id: str | None, run_name: str | None,
                tags: dict[str, str]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=ensure_store(uri))  # a new sqlite store: made once, under a lock
    created = run_id is None
    if created:
        run = client.create_run(ensure_experiment(client, experiment, uri), run_name=run_name,
                                tags={"mumu.kind": "evaluation", **{k: str(v) for k, v in tags.items()}})
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in result.settings.items()]
    else:
        client.get_run(run_id)  # raises a clear MlflowException for an unknown run
        # A training run already has its own params; ours go under "eval." so none collide.
        params = [Param(f"eval.{k}", v[:6000]) for k, v in result.settings.items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics().items() if not math.isnan(v)]
    log_batch(client, run_id, params=params, metrics=metrics)
    if not created:
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
    client.set_tag(run_id, "mumu.eval.errors", str(len(result.errors)))
    for suite in result.suites:  # this run's grids only: out_dir may hold older ones
        grid = result.out_dir / "grids" / f"{suite}.png"
        if grid.is_file():
            client.log_artifact(run_id, str(grid), artifact_path="eval/grids")
    for name in ("rows.csv", "summary.json"):
        client.log_artifact(run_id, str(result.out_dir / name), artifact_path="eval")
    if result.errors:
        errors = "\n".join(str(e) for e in result.errors) + "\n"
        client.log_text(run_id, errors, "eval/errors.txt")
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return run_id
