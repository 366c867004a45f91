"""Materialize assets from the command line, every partition or one:

    python -m mumu_assets.materialize raw_prompts content_style
    python -m mumu_assets.materialize synthetic_images --partition 00001
    python -m mumu_assets.materialize --all      # the whole graph, upstream first

Each asset (and each shard of a sharded one) is its own Dagster run: a run cannot mix
partitioned and unpartitioned assets, and a failed shard then costs only itself.

DVC stages call this (dvc.yaml), so `dvc repro` runs the very assets `dagster dev` shows, and
the runs land in the project's Dagster instance (dagster_home/) with their metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .params import REPO_ROOT


def all_assets(defs) -> list[str]:
    """Every materializable asset of `defs`, upstream first."""
    graph = defs.get_repository_def().asset_graph
    materializable = set(graph.materializable_asset_keys)
    return [key.to_user_string() for key in graph.toposorted_asset_keys if key in materializable]


def materialize(defs, names: list[str], *, instance, partition: str | None = None,
                run_config: dict | None = None, log=print) -> bool:
    """Materialize `names` in order, each partition in its own run; stops at the first failure.
    `run_config` maps an asset name to its config (`{"ops": {name: {"config": ...}}}` per run)."""
    import dagster as dg

    graph = defs.get_repository_def().asset_graph
    known = {key.to_user_string(): key for key in graph.get_all_asset_keys()}
    for name in names:
        partitions = graph.get(known[name]).partitions_def
        keys = [None] if partitions is None else ([partition] if partition else partitions.get_partition_keys())
        config = {"ops": {name: {"config": run_config[name]}}} if run_config and name in run_config else None
        for key in keys:
            result = dg.materialize(
                [node for node in defs.assets if isinstance(node, dg.AssetsDefinition) and known[name] in node.keys],
                resources=defs.resources,
                partition_key=key, instance=instance, run_config=config, raise_on_error=False,
            )
            where = f" [{key}]" if key else ""
            if not result.success:
                log(f"materialize: {name}{where} failed; see run {result.run_id} in the Dagster instance")
                return False
            log(f"materialized {name}{where}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_assets.materialize", description=__doc__.split("\n")[0])
    parser.add_argument("assets", nargs="*", help="asset names, materialized in the order given")
    parser.add_argument("--all", action="store_true", help="every materializable asset, in dependency order")
    parser.add_argument("--partition", default=None, help="one shard (default: every shard)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))

    import dagster as dg

    from .definitions import defs

    known = {key.to_user_string() for key in defs.get_repository_def().asset_graph.get_all_asset_keys()}
    names = list(args.assets) + (all_assets(defs) if args.all else [])
    if not names:
        parser.error("name the assets to materialize, or pass --all")
    unknown = [name for name in names if name not in known]
    if unknown:
        print(f"materialize: unknown asset(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    ok = materialize(defs, names, instance=dg.DagsterInstance.get(), partition=args.partition,
                     log=lambda line: print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
