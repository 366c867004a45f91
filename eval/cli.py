"""`mumu eval run`, `mumu eval compare` and `mumu eval import`, added to `mumu` by
`add_eval_commands(subparsers)` (registered in pyproject.toml under the `mumu.commands` entry
points).

Mistakes (a missing suite, an incomplete pipeline folder, an unknown run) raise ValueError
subclasses, which `mumu`'s main reports in one line with exit status 2. An evaluation that
finished with entry errors prints them and exits 1, so scripts notice a broken suite; so does
an import that left records out.
`python -m eval.cli ...` runs the same commands without `mumu`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class EvalUsageError(ValueError):
    """A mistake on the command line, reported in one line."""


_MODEL_FLAGS = ("clip", "dino", "pickscore", "detector", "face", "sdxl")


def _models(args: argparse.Namespace):
    import yaml

    from .run import EvalModels

    values: dict = {}
    if args.models:
        path = Path(args.models)
        if not path.is_file():
            raise EvalUsageError(f"--models {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise EvalUsageError(f"--models {path}: expected a mapping of model fields")
    base = EvalModels.paper() if args.paper_models else EvalModels()
    merged = {**{f: getattr(base, f) for f in base.__dataclass_fields__}, **values}
    for flag in _MODEL_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            merged[flag] = None if value.lower() == "none" else value
    return EvalModels.from_mapping(merged)


def _print_summary(result) -> None:
    metrics = sorted({name for values in result.suites.values() for name in values} | set(result.aggregate))
    scopes = list(result.suites) + ["aggregate"]
    width = max(len(s) for s in scopes)
    names = max([16] + [len(name) for name in metrics])
    table = {**result.suites, "aggregate": result.aggregate}
    print("  ".join(["metric".ljust(names)] + [s.rjust(width) for s in scopes]))
    for name in metrics:
        cells = [f"{table[s][name]:.4f}" if name in table[s] else "-" for s in scopes]
        print("  ".join([name.ljust(names)] + [c.rjust(width) for c in cells]))


def cmd_eval_run(args: argparse.Namespace) -> None:
    from mumu_model.cli import check_sampling, device_and_dtype

    # Check the command line before any model is loaded.
    device, dtype = device_and_dtype(args)
    check_sampling(args.steps, args.guidance, {"--resolution": args.resolution}, args.model)
    if args.batch_size < 1:
        raise EvalUsageError(f"--batch-size {args.batch_size}: must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalUsageError(f"--out {out}: exists and is not a folder")

    from .run import evaluate
    from .suites import builtin_suites, resolve_suites

    if args.quiet:
        import diffusers
        import transformers

        for library in (diffusers, transformers):
            library.utils.logging.disable_progress_bar()
            library.utils.logging.set_verbosity_error()
    suites = resolve_suites(args.suite) if args.suite else builtin_suites()
    mlflow_run: bool | str = False if args.no_mlflow else (args.run_id or True)
    result = evaluate(
        args.model, suites, models=_models(args), steps=args.steps, guidance=args.guidance, seeds=args.seeds,
        out_dir=out, mlflow_run=mlflow_run, negative_prompt=args.negative_prompt,
        resolution=args.resolution, device=device, dtype=dtype, tracking_uri=args.tracking_uri,
        experiment=args.experiment, run_name=args.run_name, text_only_ablation=args.text_only_ablation,
        batch_size=args.batch_size,
    )
    _print_summary(result)
    print(f"wrote {result.out_dir} ({len(result.rows)} images)")
    if result.run_id:
        print(f"mlflow run {result.run_id} ({result.tracking_uri})")
    if result.errors:
        for error in result.errors:
            print(f"mumu: entry error: {error}", file=sys.stderr)
        print(f"mumu: {len(result.errors)} entries could not be scored", file=sys.stderr)
        raise SystemExit(1)


# Where `mumu eval compare` looks without --tracking-uri: the project's store (training, the
# evaluation asset, the registry), then where `mumu eval run`'s default --out logs.
_COMPARE_STORES = (Path("runs/mlflow.db"), Path("outputs/mlflow.db"))


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from mumu_model.tracking import absolute_tracking_uri

    from .compare import compare_runs

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        found = next((path for path in _COMPARE_STORES if path.is_file()), None)
        if found is None:
            raise EvalUsageError(f"no --tracking-uri and no {' or '.join(map(str, _COMPARE_STORES))}; "
                                 "pass --tracking-uri sqlite:///PATH/mlflow.db")
        uri = f"sqlite:///{found}"
    print(compare_runs(args.run_a, args.run_b, absolute_tracking_uri(uri)))


def cmd_eval_import(args: argparse.Namespace) -> None:
    from .benchmarks import BENCHMARKS

    source = Path(args.source)
    if not source.exists():
        raise EvalUsageError(f"{source}: no such file or folder")
    written, problems = BENCHMARKS[args.format](source, Path(args.out))
    for path in written:
        print(f"wrote {path}")
    if problems:
        for problem in problems:
            print(f"mumu: not imported: {problem}", file=sys.stderr)
        print(f"mumu: {len(problems)} records or subjects were not imported", file=sys.stderr)
        raise SystemExit(1)


def add_eval_commands(subparsers) -> argparse.ArgumentParser:
    """Add `eval run`, `eval compare` and `eval import` to the `mumu` parser's subcommands."""
    from mumu_model.cli import add_device_arguments

    evaluation = subparsers.add_parser("eval", help="evaluate a pipeline on prompt suites; compare runs")
    commands = evaluation.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="generate and score prompt suites, log to MLflow",
        description="Metrics whose model is not given are left out; --paper-models takes the published "
        "protocol's hub checkpoints. Suites: built-in names (eval/suites/*.yaml), files or folders.",
    )
    run.add_argument("--model", required=True, help="MUMU pipeline folder")
    run.add_argument("--suite", action="append", default=[], help="suite name, file or folder (repeatable; default: all built-in)")
    run.add_argument("--out", default="outputs/eval", help="folder for images, grids, rows.csv, summary.json")
    run.add_argument("--steps", type=int, default=50, help="denoising steps (paper: 50 DDIM)")
    run.add_argument("--guidance", type=float, default=6.0, help="guidance scale (paper: 6)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt, e.g. --seeds 0 1 2")
    run.add_argument("--negative-prompt", default=None, help="(paper: none)")
    run.add_argument("--text-only-ablation", action="store_true",
                     help="also generate every prompt with its images removed (same seeds) and score it "
                     "separately (metrics with a _text_only suffix): what the images add")
    run.add_argument("--batch-size", type=int, default=1,
                     help="prompts per pipeline call, each with all its seeds (speed and memory only)")
    run.add_argument("--resolution", type=int, default=None, help="output side in pixels (default: native)")
    add_device_arguments(run)
    run.add_argument("--models", default=None, help="YAML of EvalModels fields (clip, dino, pickscore, detector, face, sdxl, ...)")
    run.add_argument("--paper-models", action="store_true", help="start from the published checkpoints (hub ids)")
    for flag, meaning in (
        ("clip", "CLIP ViT-B/32 (CLIP-I, CLIP-T, multimodal CLIP score)"), ("dino", "DINO ViT-S/16"),
        ("pickscore", "PickScore_v1"), ("detector", "GroundingDINO (multimodal CLIP score)"),
        ("face", "dlib | dlib:DIR | arcface | arcface:ROOT"), ("sdxl", "base SDXL (text adherence)"),
    ):
        run.add_argument(f"--{flag}", default=None, help=f"{meaning}; 'none' to leave it out")
    run.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite beside --out")
    run.add_argument("--experiment", default="mumu-eval")
    run.add_argument("--run-name", default=None)
    run.add_argument("--run-id", default=None, help="log into this existing MLflow run (e.g. the training run)")
    run.add_argument("--no-mlflow", action="store_true")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=cmd_eval_run)

    compare = commands.add_parser(
        "compare", help="two evaluation runs' metrics side by side, with deltas",
        description="A run is named by its id, its run name, or a registered model alias "
        "(models:/NAME@ALIAS or NAME@ALIAS: the run that version was registered from).",
    )
    reference = "MLflow run id, run name, or models:/NAME@ALIAS / NAME@ALIAS"
    compare.add_argument("run_a", metavar="RUN_A", help=reference)
    compare.add_argument("run_b", metavar="RUN_B", help=reference)
    compare.add_argument("--tracking-uri", default=None,
                         help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db, else outputs/mlflow.db")
    compare.set_defaults(func=cmd_eval_compare)

    imported = commands.add_parser(
        "import", help="a public benchmark's prompts as suite YAML (DreamBench folder, OmniContext JSON)",
        description="Writes suites whose prompts name their images inline, one object per image slot; "
        "the images stay where they are (image_root points at them). Formats: eval/benchmarks.py, "
        "docs/evaluation.md.",
    )
    imported.add_argument("format", choices=("dreambench", "omnicontext"),
                          help="dreambench: a folder with prompts_and_classes.txt and a folder per subject; "
                          "omnicontext: a JSON list of {key, task_type, instruction, input_images}")
    imported.add_argument("source", metavar="SOURCE",
                          help="the benchmark's folder (dreambench) or JSON file (omnicontext)")
    imported.add_argument("--out", required=True, help="folder for the suite YAML files")
    imported.set_defaults(func=cmd_eval_import)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.cli run ...`: the same commands, before they are wired into `mumu`."""
    from mumu_model.cli import one_line
    from mumu_model.prompt import PromptError

    parser = argparse.ArgumentParser(prog="mumu")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, PromptError, ImportError, FileNotFoundError) as err:
        print(f"mumu: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
