"""The toy main job's training recipe, measured beyond one run: at several training seeds, and
with crops at several token counts (the paper's Finding 1), on the test suites.

    .venv/bin/python bench/toy_recipe.py seeds [--seeds 0 1 2]
    .venv/bin/python bench/toy_recipe.py tokens [--tokens 4 16 64]
    .venv/bin/python bench/toy_recipe.py ablation [--rows norm-off norm ...] [--seeds 0 1]
    .venv/bin/python bench/toy_recipe.py attribution runs/evaluation [runs/bench/*/evaluation ...]

Both train stage 1 and stage 2 from the main job's configs (`params.yaml` -> `training`) on the
data the graph made (`make demo` first: data/captions/), each run in its own folder under
`runs/bench/`, and evaluate the stage-2 pipeline as the evaluation asset does (`params.yaml` ->
`evaluation`: the test suites, sampler, guidance, text-only ablation).

- `seeds`: the recipe unchanged but for `seed` (noise, timesteps, data order, initial weights).
  Reports every metric per seed, and its mean, standard deviation (n - 1) and range. With
  `--reuse-main`, the recipe's own seed is not trained again: the main job's pipeline
  (runs/stage2/pipeline, the same training, deterministic) is evaluated in its place. A seed's
  figures are kept in runs/bench/seed<s>/result.json: sweeps over different seeds may run at
  once (`--seeds 1` beside `--seeds 2`), and a last `--seeds 0 1 2 --reuse-main` gathers them.
- `tokens`: both stages with crops at `image_size` = 14 x sqrt(tokens) px (4 -> 28 px, 16 -> 56,
  64 -> 112), at the same compute: each configuration's seconds per step are measured first
  (a short timing run per stage), and a stage whose step is slower than the recipe's trains
  proportionally fewer steps, so that no configuration gets more wall time than the recipe.

- `ablation`: named changes to the recipe (`ABLATIONS`), each at every seed, scored on the
  **validation** suites, both after stage 1 (the "stage 1 only" row of each change) and after
  stage 2. A run's figures are kept in its folder (runs/bench/ablation-<row>-seed<s>/result.json),
  so an interrupted sweep resumes, and two sweeps over different rows may run at once; the
  table gathers every finished run.

- `attribution`: of the two-object rows of finished evaluations (their rows.csv), how often the
  output holds both crops' colours, only the first crop's, only the second's, or neither: where
  the colour of a one-blob output comes from.

Writes bench/results/toy_<command>.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mumu_model.atomic import write_bytes_atomic  # noqa: E402

PATCH = 14
# The figures a table shows, per test suite: (suite kind, metric).
HEADLINE = [("one", "colour_match"), ("one", "obj_shape"), ("one", "count_match"), ("two", "all_colours"),
            ("two", "obj_colour"), ("three", "all_colours"), ("outside", "colour_match"),
            ("one", "colour_match_text_only"), ("two", "all_colours_text_only"),
            ("outside", "colour_match_text_only")]


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _train(config: str, out: Path, overrides: dict, log: Path) -> float:
    """Train one stage; returns its wall seconds. Fails naming the log on a non-zero exit."""
    command = [sys.executable, "-m", "mumu_model.cli", "train", str(REPO / config), "--set", f"output_dir={out}",
               "--set", "tracking=false"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    with log.open("ab") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"training failed ({' '.join(command)}): see {log}")
    return time.perf_counter() - started


def _seconds_per_step(log: Path) -> float:
    """The steady seconds per step of a finished run, from its progress lines' samples/s."""
    rates = [float(m.group(1)) for m in re.finditer(r"([\d.]+) samples/s", log.read_text())]
    batch = [int(m.group(1)) for m in re.finditer(r"x batch (\d+)", log.read_text())]
    if not rates or not batch:
        raise SystemExit(f"no progress lines in {log}")
    return batch[-1] / statistics.median(rates[1:] or rates)


def _evaluate(pipeline: Path, out: Path, suites: list[Path] | None = None) -> dict[str, dict[str, float]]:
    from eval.run import evaluate

    e = _params()["evaluation"]
    suites = suites or [REPO / s for s in e["suites"]]
    result = evaluate(pipeline, suites, steps=e["steps"], guidance=e["guidance"],
                      seeds=e["seeds"], out_dir=out, mlflow_run=False, text_only_ablation=e["text_only_ablation"],
                      batch_size=e["batch_size"], device="cpu")
    if result.errors:
        raise SystemExit(f"evaluation of {pipeline} had {len(result.errors)} entry errors: {result.errors[0]}")
    return result.suites


def _run(name: str, stage1: dict, stage2: dict | None, suites: list[Path] | None = None,
         evaluate_stage1: bool = False, stage1_from: Path | None = None) -> dict:
    """Train both stages (stage 2 None: stage 1 only) with these overrides and evaluate; the run's
    figures. `stage1_from`: a finished run folder whose stage 1 had these very overrides, used
    instead of training the same stage 1 again (training is deterministic per seed)."""
    p = _params()["training"]
    folder = REPO / "runs" / "bench" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder / "train.log"
    first = stage1_from / "stage1" if stage1_from is not None else folder / "stage1"
    write_bytes_atomic(folder / "stage1.json", json.dumps(stage1).encode())
    seconds = [0.0] if stage1_from is not None else [_train(p["stage1_config"], first, stage1, log)]
    if stage2 is not None:
        seconds.append(_train(p["stage2_config"], folder / "stage2", {"init_from": first, **stage2}, log))
    started = time.perf_counter()
    last = folder / "stage2" if stage2 is not None else first
    figures = {"train_seconds": [round(t, 1) for t in seconds], "stage1": stage1,
               "stage2": None if stage2 is None else {k: str(v) for k, v in stage2.items()},
               "stage1_from": None if stage1_from is None else str(stage1_from),
               "suites": _evaluate(last / "pipeline", folder / "evaluation", suites)}
    if evaluate_stage1 and stage2 is not None and stage1_from is None:
        figures["stage1_suites"] = _evaluate(first / "pipeline", folder / "evaluation-stage1", suites)
    print(f"{name}: trained in {' + '.join(f'{t:.0f}' for t in seconds)} s, "
          f"evaluated in {time.perf_counter() - started:.0f} s", flush=True)
    return figures


def _figure(suites: dict, kind: str, metric: str) -> float | None:
    for name, metrics in suites.items():
        if name.endswith(f"_{kind}") and metric in metrics:
            return metrics[metric]
    return None


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _table(rows: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    header = "| run | " + " | ".join(f"{k} {m}" for k, m in HEADLINE) + " |"
    lines = [header, "|" + "---|" * (len(HEADLINE) + 1)]
    for name, run in rows.items():
        cells = [_figure(run["suites"], k, m) for k, m in HEADLINE]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1%}" for c in cells) + " |")
    for name, cells in (extra or {}).items():
        lines.append(f"| {name} | " + " | ".join(cells.get(f"{k}/{m}", "-") for k, m in HEADLINE) + " |")
    return "\n".join(lines)


def _environment() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "evaluation": {k: v for k, v in _params()["evaluation"].items() if k in ("suites", "steps", "guidance", "seeds")}}


def _main_job(seed: int) -> dict:
    """The main job's own stage-2 pipeline, evaluated: the recipe's run at its own seed."""
    p = _params()["training"]
    recipe_seeds = {yaml.safe_load((REPO / p[f"{stage}_config"]).read_text()).get("seed", 0) for stage in ("stage1", "stage2")}
    pipeline = REPO / "runs" / "stage2" / "pipeline"
    if recipe_seeds != {seed} or not (pipeline / "model_index.json").is_file():
        raise SystemExit(f"--reuse-main: the main job trains at seed(s) {sorted(recipe_seeds)}, not {seed}, "
                         f"or {pipeline} is missing (run `make demo`)")
    return {"source": "main job (runs/stage2/pipeline)", "suites": _evaluate(pipeline, REPO / "runs" / "bench" / f"seed{seed}-main")}


def _seed_run(seed: int) -> dict:
    """The recipe trained and evaluated at `seed`; a finished run's figures are read back, so
    sweeps over different seeds may run at once and a later one gathers them."""
    done = REPO / "runs" / "bench" / f"seed{seed}" / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    run = _run(f"seed{seed}", {"seed": seed}, {"seed": seed})
    write_bytes_atomic(done, json.dumps(run, indent=2, default=str).encode())
    return run


def seeds(args: argparse.Namespace) -> dict:
    runs = {f"seed{s}": _main_job(s) if args.reuse_main and s == args.seeds[0] else _seed_run(s) for s in args.seeds}
    summary: dict[str, dict] = {}
    for name in next(iter(runs.values()))["suites"]:
        for metric in next(iter(runs.values()))["suites"][name]:
            values = [run["suites"][name].get(metric) for run in runs.values()]
            if all(isinstance(v, float) and not math.isnan(v) for v in values) and "_ci_" not in metric:
                summary[f"{name}/{metric}"] = _spread(values)
    cells = {}
    for k, m in HEADLINE:
        key = next((key for key in summary if key.endswith(f"_{k}/{m}")), None)
        if key:
            s = summary[key]
            cells[f"{k}/{m}"] = f"{s['mean']:.1%} ± {s['std']:.1%}"
    print(_table(runs, {"mean ± std": cells}))
    return {"runs": runs, "summary": summary}


def tokens(args: argparse.Namespace) -> dict:
    p = _params()["training"]
    base = {stage: yaml.safe_load((REPO / p[f"{stage}_config"]).read_text()) for stage in ("stage1", "stage2")}
    # The recipe's seconds per step, and each configuration's, from short timing runs.
    timing_steps = 30
    per_step: dict[int, dict[str, float]] = {}
    for count in args.tokens:
        side = PATCH * math.isqrt(count)
        if side * side != PATCH * PATCH * count:
            raise SystemExit(f"--tokens {count}: not a square number of 14 px patches")
        folder = REPO / "runs" / "bench" / f"timing-{count}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        per_step[count] = {}
        for stage in ("stage1", "stage2"):
            log = folder / f"{stage}.log"
            overrides = {"image_size": side, "max_steps": timing_steps, "checkpoint_every": 10_000,
                         "validation_prompts": "[]", "log_every": 5, "warmup_steps": 1}
            if stage == "stage2":
                overrides["init_from"] = REPO / "runs" / "stage1"
            _train(p[f"{stage}_config"], folder / stage, overrides, log)
            per_step[count][stage] = _seconds_per_step(log)
    recipe = {stage: {"steps": base[stage]["max_steps"], "image_size": base[stage]["image_size"]} for stage in base}
    reference = {stage: per_step[min(per_step, key=lambda c: abs(PATCH * math.isqrt(c) - recipe[stage]["image_size"]))][stage]
                 for stage in base}
    runs = {}
    for count in args.tokens:
        side = PATCH * math.isqrt(count)
        steps = {stage: min(recipe[stage]["steps"],
                            int(recipe[stage]["steps"] * reference[stage] / per_step[count][stage]))
                 for stage in base}
        run = _run(f"tokens{count}", {"image_size": side, "max_steps": steps["stage1"]},
                   {"image_size": side, "max_steps": steps["stage2"]})
        run.update(tokens=count, image_size=side, steps=steps, seconds_per_step=per_step[count])
        runs[f"{count} tokens ({side} px, {steps['stage1']}+{steps['stage2']} steps)"] = run
    print(_table(runs))
    return {"recipe": recipe, "seconds_per_step": per_step, "runs": runs}


VALIDATION = ["eval/suites/toy/validation/val_one.yaml", "eval/suites/toy/validation/val_two.yaml",
              "eval/suites/toy/validation/val_three.yaml", "eval/suites/toy/validation/val_outside.yaml"]
# Each change: (stage-1 overrides, stage-2 overrides or None for no stage 2), on top of the
# recipe's configs, whose stages both train on the 50/50 mixture. The rows measured before the
# mixture state the recipe of then explicitly (stage 1 on its own records, stage 2 on one-object
# records), so a row means the same training whenever it is run again.
MIXED_STAGE1 = {"shards": "data/captions/stage1,data/captions/stage2", "shard_weights": "0.17,2.0",
                "augment_probability": 0.5, "augmentations": "margin,scale,jitter,crop,flip"}
MIXED_STAGE2 = {"shards": "data/captions/stage2,data/captions/stage1", "shard_weights": "2.0,0.17", "max_images": 4}
OWN_STAGE1 = {"shards": "data/captions/stage1", "shard_weights": "[]", "augment_probability": 0.2,
              "augmentations": "crop,flip,noise,grayscale"}
ONE_OBJECT_STAGE2 = {"shards": "data/captions/stage2", "shard_weights": "[]", "max_images": 1}
ABLATIONS: dict[str, tuple[dict, dict | None]] = {
    "norm-off": ({**OWN_STAGE1, "model_overrides.image_token_norm": "false"}, ONE_OBJECT_STAGE2),
    "norm": (OWN_STAGE1, ONE_OBJECT_STAGE2),
    "norm+pooled-text": ({**OWN_STAGE1, "model_overrides.adapter_pooled": "text"}, ONE_OBJECT_STAGE2),
    "norm+rope": ({**OWN_STAGE1, "model_overrides.adapter_positions": "rope"}, ONE_OBJECT_STAGE2),
    # Stage 2 on one-object records and, as often, records of 2-3 crops (the doc's 50/50 mixture).
    "norm+mixed-stage2": (OWN_STAGE1, MIXED_STAGE2),
    "norm+unet-attention": ({**OWN_STAGE1, "model_overrides.unet_first_block_attention": "true",
                             "model_overrides.unet_cross_attention_dim": 128}, ONE_OBJECT_STAGE2),
    # Stage 2 with 70% one-object records and 30% records of 2-3 crops.
    "norm+mixed-stage2-70": (OWN_STAGE1, {**MIXED_STAGE2, "shard_weights": "2.0,0.073"}),
    # One stage on the 50/50 mixture, as many steps as the two stages together, with stage 2's
    # augmentations; crops at stage 1's 4 tokens.
    "one-stage-mixture": ({**MIXED_STAGE1, "max_steps": 1800}, None),
    # Both stages on the 50/50 mixture: stage 1 at 4 tokens a crop, stage 2 at 16 (the recipe).
    "mixed-both-stages": ({}, {}),
}
# What an ablation row shows, per validation suite: (suite kind, metric).
ABLATION_COLUMNS = [("one", "colour_match"), ("one", "obj_shape"), ("two", "all_colours"), ("two", "count_match"),
                    ("two", "obj_colour"), ("three", "all_colours"), ("outside", "colour_match"),
                    ("one", "colour_match_text_only")]


def ablation(args: argparse.Namespace) -> dict:
    suites = [REPO / s for s in VALIDATION]
    for row in args.rows:
        if row not in ABLATIONS:
            raise SystemExit(f"unknown ablation row {row!r}; rows are {sorted(ABLATIONS)}")
        stage1, stage2 = ABLATIONS[row]
        for seed in args.seeds:
            name = f"ablation-{row}-seed{seed}"
            done = REPO / "runs" / "bench" / name / "result.json"
            if done.is_file():
                continue
            # A run whose stage 1 had the same overrides and is finished lends it (a row that
            # changes stage 2 only), even while that run's stage 2 still trains.
            same = [path.parent for path in (REPO / "runs" / "bench").glob("ablation-*/stage1.json")
                    if json.loads(path.read_text()) == {**stage1, "seed": seed}
                    and (path.parent / "stage1" / "pipeline" / "model_index.json").is_file()]
            run = _run(name, {**stage1, "seed": seed}, None if stage2 is None else {**stage2, "seed": seed},
                       suites, evaluate_stage1=True, stage1_from=same[0] if same else None)
            write_bytes_atomic(done, json.dumps({"row": row, "seed": seed, **run}, indent=2, default=str).encode())
    # Every finished run, whichever sweep made it: (row, stage) -> {seed: suites}.
    finished: dict[str, dict[int, dict]] = {}
    for path in sorted((REPO / "runs" / "bench").glob("ablation-*/result.json")):
        run = json.loads(path.read_text())
        finished.setdefault(run["row"], {})[run["seed"]] = run["suites"]
        if "stage1_suites" in run:
            finished.setdefault(f"{run['row']}, stage 1 only", {})[run["seed"]] = run["stage1_suites"]
    rows = {}
    for row, by_seed in finished.items():
        cells = {}
        for kind, metric in ABLATION_COLUMNS:
            values = [v for v in (_figure(s, kind, metric) for s in by_seed.values()) if v is not None]
            if values:
                cells[f"{kind}/{metric}"] = _spread(values)
        rows[row] = {"seeds": sorted(by_seed), "figures": cells}
    header = "| change | seeds | " + " | ".join(f"{k} {m}" for k, m in ABLATION_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(ABLATION_COLUMNS) + 2)]
    for row, r in rows.items():
        cells = [r["figures"].get(f"{k}/{m}") for k, m in ABLATION_COLUMNS]
        lines.append(f"| {row} | {len(r['seeds'])} | " + " | ".join(
            "-" if c is None else f"{c['mean']:.1%} ± {c['std']:.1%}" for c in cells) + " |")
    print("\n".join(lines))
    return {"suites": VALIDATION, "rows": rows}


def attribution(args: argparse.Namespace) -> dict:
    import pandas as pd

    from eval.suites import load_suite

    colours = {}  # (suite name, entry id) -> the crops' colours, in prompt order
    for path in sorted((REPO / "eval" / "suites" / "toy").rglob("*.yaml")):
        suite = load_suite(path)
        colours.update({(suite.name, e.id): [o.colour for o in e.objects] for e in suite.entries})
    table = {}
    for folder in args.evaluations:
        rows = pd.read_csv(Path(folder) / "rows.csv")
        rows = rows[(rows["variant"] == "multimodal") & rows["suite"].str.endswith("_two")]
        counts = {"both": 0, "first only": 0, "second only": 0, "neither": 0}
        for row in rows.itertuples():
            first, second = colours[(row.suite, row.entry)]
            drawn = {item.strip().split(" ")[0] for item in str(row.objects_found).split(",") if item.strip()}
            has_first, has_second = first in drawn, second in drawn
            key = "both" if has_first and has_second else "first only" if has_first else (
                "second only" if has_second else "neither")
            counts[key] += 1
        table[str(folder)] = {"rows": len(rows), **{k: v / max(len(rows), 1) for k, v in counts.items()}}
    print("| evaluation | two-object rows | both crops' colours | first crop's only | second crop's only | neither |")
    print("|---|---|---|---|---|---|")
    for folder, r in table.items():
        print(f"| {folder} | {r['rows']} | {r['both']:.1%} | {r['first only']:.1%} | {r['second only']:.1%} | {r['neither']:.1%} |")
    return {"evaluations": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    seeds_parser = commands.add_parser("seeds", help="the recipe at several training seeds")
    seeds_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    seeds_parser.add_argument("--reuse-main", action="store_true",
                              help="the first seed is the main job's: evaluate runs/stage2/pipeline instead of training it")
    tokens_parser = commands.add_parser("tokens", help="crops at several token counts, same compute")
    tokens_parser.add_argument("--tokens", type=int, nargs="+", default=[4, 16, 64])
    ablation_parser = commands.add_parser("ablation", help="changes to the recipe on the validation suites")
    ablation_parser.add_argument("--rows", nargs="*", default=list(ABLATIONS), help=f"of {sorted(ABLATIONS)}")
    ablation_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    attribution_parser = commands.add_parser("attribution", help="whose colour the two-object outputs drew")
    attribution_parser.add_argument("evaluations", nargs="+", help="evaluation folders (with rows.csv)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/toy_<command>.json")
    args = parser.parse_args()
    if args.command != "attribution" and not any((REPO / "data" / "captions" / "stage1").glob("*.tar")):
        raise SystemExit("no training data in data/captions/stage1: run `make demo` (the main job) first")
    started = time.perf_counter()
    figures = {"seeds": seeds, "tokens": tokens, "ablation": ablation, "attribution": attribution}[args.command](args)
    out = args.out or REPO / "bench" / "results" / f"toy_{args.command}.json"
    # The ablation's rows and the attribution's evaluations accumulate over sweeps: a row whose
    # run folders are gone keeps the figures (and the date) it was last measured with.
    merged = {"ablation": "rows", "attribution": "evaluations"}.get(args.command)
    if merged:
        today = datetime.date.today().isoformat()
        previous = json.loads(out.read_text()).get(merged, {}) if out.is_file() else {}
        figures[merged] = {**previous, **{k: {**v, "measured": today} for k, v in figures[merged].items()}}
    document = {"benchmark": f"toy_{args.command}", **figures, "seconds": round(time.perf_counter() - started),
                "environment": _environment()}
    write_bytes_atomic(out, json.dumps(document, indent=2, default=str).encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
