"""What the last run of the graph learned, from the Dagster instance and the datasets:

    python -m mumu_assets.summary

Prints the evaluation's result (in the toy profile: how often the generated object takes the
colour of its conditioning crop, against the text-only ablation and chance), how well the
scorer's filter caught the renders made wrong on purpose, where the sample grid is, and how to
open the Dagster and MLflow UIs on 127.0.0.1. Exits 1 if the graph has no evaluation yet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from mumu_model.atomic import write_bytes_atomic
from mumu_model.data.scoring import defect_stats

from .datasets import FILTERED, PICKSCORES
from .params import REPO_ROOT, params


def defect_filter_stats(data_root: Path) -> dict | None:
    """Precision and recall of the score filter at rejecting deliberately wrong renders, over
    every shard; None when no shard knows its defects (real models, not the toy renderer)."""
    scores_dir, kept_dir = PICKSCORES.under(data_root), FILTERED.under(data_root)
    scores = [pd.read_parquet(p) for p in sorted(scores_dir.glob("*.parquet"))]
    kept = [pd.read_parquet(p, columns=["key"]) for p in sorted(kept_dir.glob("*.parquet"))]
    if not scores or not kept:
        return None
    table = pd.concat(scores, ignore_index=True)
    if "defect" not in table or table["defect"].isna().all():
        return None
    return defect_stats(table["defect"], ~table["key"].isin(set(pd.concat(kept)["key"])))


def _tracking_uri() -> str:
    """The store the evaluation asset logs to, as it finds it from this working directory."""
    from mumu_model.tracking import DEFAULT_TRACKING_URI, project_tracking_uri

    return project_tracking_uri(default=params(group="evaluation").get("tracking_uri") or DEFAULT_TRACKING_URI)


def _latest_metadata(instance, asset: str) -> dict:
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def main() -> int:
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        evaluation = _latest_metadata(instance, "evaluation")
    if not evaluation:
        print("summary: no materialization of `evaluation` yet; run the graph first", file=sys.stderr)
        return 1

    print("\n== What the model learned (evaluation asset) ==")
    headline = evaluation.get("headline")
    if headline:
        chance = ", ".join(f"{key.removeprefix('aggregate/').removesuffix('_chance')} {value:.1%}"
                           for key, value in evaluation.items() if key.startswith("aggregate/") and key.endswith("_chance"))
        print("Analytic probes of the outputs per suite, 95% intervals in brackets"
              + (f" (chance: {chance})" if chance else "") + ";")
        print("`text-only` is the same prompts with their crops removed:")
        for part in str(headline).split("; "):
            print(f"  {part}")
    for name in ("clip_i", "clip_t", "pickscore"):
        value = evaluation.get(f"aggregate/{name}")
        if value is not None:
            print(f"{name}: {value:.4f}")
    print(evaluation.get("summary", ""))

    defects = defect_filter_stats(Path(params()["root"]))
    if defects:
        print("\n== The scorer's filter on the renders made wrong on purpose ==")
        precision = "n/a" if defects["precision"] is None else f"{defects['precision']:.1%}"
        print(f"{defects['defective']} of {defects['images']} images wrong; filter rejected {defects['rejected']}, "
              f"of which {defects['caught']} wrong: precision {precision}, recall {defects['recall']:.1%}")

    grid = evaluation.get("samples") or evaluation.get("grid")
    if grid:
        print(f"\nsample grid (crops | multimodal output | text-only output): {grid}")
    published = params(group="evaluation").get("samples_image")
    if published and evaluation.get("samples") and Path(evaluation["samples"]).is_file():
        # The README's picture: the main job's latest samples, at a fixed path in the repository.
        write_bytes_atomic(REPO_ROOT / published, Path(evaluation["samples"]).read_bytes())
        print(f"copied to {published}")
    print("\n== Look around ==")
    print(f"dagster dev -m mumu_assets.definitions -h 127.0.0.1 -p 3000     (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    print(f"mlflow ui --backend-store-uri {_tracking_uri()} --host 127.0.0.1 --port 5000")
    pipeline = params(group="evaluation").get("pipeline")
    if pipeline:  # the evaluated model in a browser, its own settings and clickable examples
        print(f"mumu demo --model {pipeline}                              (http://127.0.0.1:7860)")
    print("(run them with .venv/bin/ in front, or after `source .venv/bin/activate`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
