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

from mumu_model.data.scoring import defect_stats

from .params import REPO_ROOT, params


def defect_filter_stats(data_root: Path) -> dict | None:
    """Precision and recall of the score filter at rejecting deliberately wrong renders, over
    every shard; None when no shard knows its defects (real models, not the toy renderer)."""
    scores_dir, kept_dir = data_root / "synthetic" / "pickscore", data_root / "synthetic" / "filtered"
    scores = [pd.read_parquet(p) for p in sorted(scores_dir.glob("*.parquet"))]
    kept = [pd.read_parquet(p, columns=["key"]) for p in sorted(kept_dir.glob("*.parquet"))]
    if not scores or not kept:
        return None
    table = pd.concat(scores, ignore_index=True)
    if "defect" not in table or table["defect"].isna().all():
        return None
    return defect_stats(table["defect"], ~table["key"].isin(set(pd.concat(kept)["key"])))


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
    colour = evaluation.get("aggregate/colour_match")
    if colour is not None:
        ablation = evaluation.get("aggregate/colour_match_text_only")
        chance = evaluation.get("aggregate/colour_chance")
        print(f"colour of the generated object = colour of its crop: {colour:.1%}"
              f"  (held-out crops from other renders, colour word left out)")
        if ablation is not None:
            print(f"same prompts without the crops (text-only ablation):  {ablation:.1%}")
        if chance is not None:
            print(f"chance (1 / number of colours):                        {chance:.1%}")
    for name in ("clip_i", "clip_t", "pickscore"):
        value = evaluation.get(f"aggregate/{name}")
        if value is not None:
            print(f"{name} (toy CLIP): {value:.4f}")
    print(evaluation.get("summary", ""))

    defects = defect_filter_stats(Path(params()["root"]))
    if defects:
        print("\n== The scorer's filter on the renders made wrong on purpose ==")
        precision = "n/a" if defects["precision"] is None else f"{defects['precision']:.1%}"
        print(f"{defects['defective']} of {defects['images']} images wrong; filter rejected {defects['rejected']}, "
              f"of which {defects['caught']} wrong: precision {precision}, recall {defects['recall']:.1%}")

    grid = evaluation.get("grid")
    if grid:
        print(f"\nsample grid (crop | multimodal output | text-only output): {grid}")
    mlflow_db = REPO_ROOT / "runs" / "mlflow.db"
    print("\n== Look around ==")
    print(f"dagster dev -m mumu_assets.definitions -h 127.0.0.1 -p 3000     (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    print(f"mlflow ui --backend-store-uri sqlite:///{mlflow_db} --host 127.0.0.1 --port 5000")
    print("(run them with .venv/bin/ in front, or after `source .venv/bin/activate`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
