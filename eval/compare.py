"""Compare two evaluation runs from MLflow: their metrics side by side, with deltas.

`mumu eval compare RUN_A RUN_B` prints one line per metric (aggregate first, then each suite),
`B - A` in the last column, and warns when the runs did not evaluate the same suites (another
version or content hash) or sampling settings, since their numbers are then not comparable.
A run is named by its id, by its run name (the newest run of that name), or by a registered
model alias, `models:/<name>@<alias>` or `<name>@<alias>`: the run that the aliased version
was logged from (for versions the evaluation asset registers, the evaluation that scored it).

`main_metric` names the metric that ranks models on an evaluation (the evaluation asset moves
the `champion` alias by it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RunMetrics:
    run_id: str
    name: str
    metrics: dict[str, float]
    params: dict[str, str]


# Params whose difference makes two evaluations incomparable.
_SETTINGS = ("steps", "guidance", "seeds", "negative_prompt", "scheduler", "resolution", "dtype")

# What ranks models, most specific first: the first of these an evaluation has. Which ones it
# has follows from its suites: face_sim needs portraits, mm_clip objects and a detector; clip_t
# is there whenever CLIP is. All are higher-is-better. A suite's world puts its own main metric
# first (`eval.worlds`).
MAIN_METRICS = ("face_sim", "mm_clip", "dino", "clip_i", "clip_t", "pickscore")


def main_metric(metrics: Mapping[str, float], preferred: Sequence[str] = ()) -> str | None:
    """The metric that ranks models on an evaluation with these (aggregate) metrics, or None:
    the first of `preferred` (the suites' worlds' main metrics), then of `MAIN_METRICS`, that
    the evaluation has."""
    for name in (*preferred, *MAIN_METRICS):
        value = metrics.get(name)
        if value is not None and not math.isnan(value):
            return name
    return None


def _strip_eval_prefix(params: dict[str, str]) -> dict[str, str]:
    # Evaluations logged into a training run keep their params under "eval.".
    return {k.removeprefix("eval."): v for k, v in params.items()}


def resolve_alias(client, reference: str) -> str | None:
    """The run id behind `models:/<name>@<alias>` or `<name>@<alias>` (the run its version was
    logged from); None when `reference` is not of that form. An unknown model or alias, or a
    version logged outside a run, raises ValueError."""
    from mlflow.exceptions import MlflowException

    from mumu_model.registry import parse_model_reference

    parsed = parse_model_reference(reference)
    if parsed is None:
        return None
    name, alias = parsed
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise ValueError(f"{reference!r}: no registered model {name!r} with alias {alias!r} "
                         f"in {client.tracking_uri}") from None
    if not version.run_id:
        raise ValueError(f"{reference!r}: version {version.version} of {name!r} was not logged from a run")
    return version.run_id


def fetch_run(client, run: str) -> RunMetrics:
    """A run by id, else the newest run with that name (any experiment); `name@alias` and
    `models:/name@alias` name the run of the version the alias points at."""
    from mlflow.exceptions import MlflowException

    aliased = resolve_alias(client, run)
    if aliased is not None:
        run = aliased
    try:
        found = client.get_run(run)
    except MlflowException:
        experiments = [e.experiment_id for e in client.search_experiments()]
        matches = client.search_runs(
            experiments, filter_string=f"attributes.run_name = '{run}'", order_by=["attributes.start_time DESC"],
            max_results=1,
        ) if experiments and "'" not in run else []
        if not matches:
            raise ValueError(f"run {run!r}: no run with that id or name in {client.tracking_uri}") from None
        found = matches[0]
    return RunMetrics(
        run_id=found.info.run_id,
        name=found.info.run_name or found.info.run_id,
        metrics=dict(found.data.metrics),
        params=_strip_eval_prefix(dict(found.data.params)),
    )


def _suites(params: dict[str, str]) -> set[str]:
    return {key.split(".")[1] for key in params if key.startswith("suite.") and key.endswith(".version")}


def _order(name: str) -> tuple:
    scope, _, metric = name.rpartition("/")
    return (scope != "aggregate", scope, metric)


def _format(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def comparison_table(a: RunMetrics, b: RunMetrics) -> str:
    """The side-by-side text table (and warnings), as `mumu eval compare` prints it."""
    names = sorted(set(a.metrics) | set(b.metrics), key=_order)
    header = ("metric", f"A {a.name}"[:28], f"B {b.name}"[:28], "B - A")
    lines = [header]
    for name in names:
        va, vb = a.metrics.get(name), b.metrics.get(name)
        delta = vb - va if va is not None and vb is not None else None
        sign = "+" if delta is not None and delta > 0 else ""
        lines.append((name, _format(va), _format(vb), sign + _format(delta) if delta is not None else "-"))
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    text = []
    for index, row in enumerate(lines):
        text.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            text.append("  ".join("-" * w for w in widths))
    warnings = []
    suites_a, suites_b = _suites(a.params), _suites(b.params)
    for label, only in (("A", suites_a - suites_b), ("B", suites_b - suites_a)):
        if only:
            warnings.append(f"warning: suites only in {label}: {', '.join(sorted(only))} (aggregates not comparable)")
    shared = suites_a & suites_b
    for key in sorted(set(a.params) | set(b.params)):
        if key in _SETTINGS or (key.startswith("suite.") and key.split(".")[1] in shared):
            if a.params.get(key) != b.params.get(key):
                warnings.append(f"warning: {key} differs: A {a.params.get(key, '-')} / B {b.params.get(key, '-')}")
    if a.params.get("pipeline") != b.params.get("pipeline"):
        text.append(f"pipelines: A {a.params.get('pipeline', '-')}  B {b.params.get('pipeline', '-')}")
    return "\n".join(text + warnings)


def compare_runs(run_a: str, run_b: str, tracking_uri: str) -> str:
    """`mumu eval compare`: each of `run_a`, `run_b` a run id, run name or model alias."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return comparison_table(fetch_run(client, run_a), fetch_run(client, run_b))
