"""Materialize assets from the command line, every partition or one:

    python -m mumu_assets.materialize raw_prompts content_style
    python -m mumu_assets.materialize synthetic_images --partition 00001

DVC stages call this (dvc.yaml), so `dvc repro` runs the very assets `dagster dev` shows, and
the runs land in the project's Dagster instance (dagster_home/) with their metadata.
"""

from __future__ import annotations

import argparse
import os
import sys

from .params import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_assets.materialize", description=__doc__.split("\n")[0])
    parser.add_argument("assets", nargs="+", help="asset names, materialized in the order given")
    parser.add_argument("--partition", default=None, help="one shard (default: every shard)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))

    import dagster as dg

    from .definitions import defs

    repository = defs.get_repository_def()
    graph = repository.asset_graph
    known = {key.to_user_string(): key for key in graph.get_all_asset_keys()}
    unknown = [name for name in args.assets if name not in known]
    if unknown:
        print(f"materialize: unknown asset(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get()
    for name in args.assets:
        partitions = graph.get(known[name]).partitions_def
        keys = [None] if partitions is None else ([args.partition] if args.partition else partitions.get_partition_keys())
        for key in keys:
            result = dg.materialize(
                [node for node in defs.assets if known[name] in node.keys],
                resources=defs.resources, partition_key=key, instance=instance, raise_on_error=False,
            )
            where = f" [{key}]" if key else ""
            if not result.success:
                print(f"materialize: {name}{where} failed; see the run in dagster_home", file=sys.stderr)
                return 1
            print(f"materialized {name}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
