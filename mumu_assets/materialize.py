"""Materialize assets from the command line, every partition or one:

    python -m mumu_assets.materialize raw_prompts content_style
    python -m mumu_assets.materialize synthetic_images --partition 00001
    python -m mumu_assets.materialize --all      # the whole graph, upstream first

Each asset (and each shard of a sharded one) is its own Dagster run: a run cannot mix
partitioned and unpartitioned assets, and a failed shard then costs only itself. Each run
prints one line: the asset and shard, how long it took and what it made (rows in and out,
failed rows, a training's steps and final loss, an evaluation's main metric). Dagster's own
event log is shown at INFO and above, so the progress lines of long steps stay readable.

A failed ERROR check blocks what is downstream: Dagster fails the step (the checks are
`blocking`), and before each run this refuses an asset whose upstream asset's latest
materialization failed one, naming the asset, shard and check.

DVC stages call this (dvc.yaml), so `dvc repro` runs the very assets `dagster dev` shows, and
the runs land in the project's Dagster instance (dagster_home/) with their metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .params import REPO_ROOT

# Dagster's console logger at this level: its events (step started, output yielded, ...) are
# DEBUG; what assets log (progress every N steps) is INFO; failures are ERROR.
DAGSTER_LOG_LEVEL = "INFO"


@dataclass(frozen=True)
class FailedCheck:
    """A failed ERROR-severity check of an asset (one partition of it, or None)."""

    asset: str
    partition: str | None
    check: str
    description: str
    run_id: str

    def __str__(self) -> str:
        where = f" [{self.partition}]" if self.partition else ""
        about = f" ({self.description})" if self.description else ""
        return f"{self.asset}{where} failed its check {self.check}{about} in run {self.run_id}"


def all_assets(defs) -> list[str]:
    """Every materializable asset of `defs`, upstream first."""
    graph = defs.get_repository_def().asset_graph
    materializable = set(graph.materializable_asset_keys)
    return [key.to_user_string() for key in graph.toposorted_asset_keys if key in materializable]


def failed_upstream_checks(defs, instance, name: str, partition: str | None = None) -> list[FailedCheck]:
    """The ERROR checks that failed on the latest materialization of an asset upstream of `name`.

    A partitioned upstream asset is judged on `partition` when `name` has the same shards, else
    on every shard it has materialized. Only a check that judged that very materialization
    counts (its evaluation's target): an older failure was fixed by the newer materialization."""
    import dagster as dg

    graph = defs.get_repository_def().asset_graph
    node = graph.get(dg.AssetKey.from_user_string(name))
    failed: list[FailedCheck] = []
    for parent_key in sorted(node.parent_keys, key=lambda key: key.to_user_string()):
        parent = graph.get(parent_key)
        if not parent.check_keys:
            continue
        latest = _latest_materializations(instance, parent_key, parent.partitions_def is not None,
                                          partition if parent.partitions_def == node.partitions_def else None)
        for check_key in sorted(parent.check_keys, key=lambda key: key.name):
            for shard, evaluation, run_id in _failures_of(instance, check_key, latest):
                failed.append(FailedCheck(parent_key.to_user_string(), shard, check_key.name,
                                          evaluation.description or "", run_id))
    return sorted(failed, key=lambda f: (f.asset, f.partition or "", f.check))


def _latest_materializations(instance, asset_key, partitioned: bool, partition: str | None) -> dict[int, str | None]:
    """{storage id: partition} of the latest materialization of `asset_key`: of `partition` when
    given, of every partition of a partitioned asset, else the asset's one."""
    from dagster._core.events import DagsterEventType

    if partitioned:
        by_partition = instance.event_log_storage.get_latest_storage_id_by_partition(
            asset_key, DagsterEventType.ASSET_MATERIALIZATION, partitions={partition} if partition else None)
        return {storage_id: key for key, storage_id in by_partition.items()}
    records = instance.fetch_materializations(asset_key, limit=1).records
    return {records[0].storage_id: None} if records else {}


def _failures_of(instance, check_key, latest: dict[int, str | None], page: int = 100):
    """(partition, evaluation, run id) of each failed ERROR evaluation of `check_key` that judged
    one of the `latest` materializations (by storage id)."""
    import dagster as dg
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    if not latest:
        return
    oldest, cursor = min(latest), None
    while True:
        records = instance.event_log_storage.get_asset_check_execution_history(
            check_key, limit=page, cursor=cursor, status={AssetCheckExecutionRecordStatus.FAILED})
        for record in records:  # newest first
            event = record.event.dagster_event if record.event is not None else None
            evaluation = event.event_specific_data if event is not None else None
            if not isinstance(evaluation, dg.AssetCheckEvaluation) or evaluation.target_materialization_data is None:
                continue
            target = evaluation.target_materialization_data.storage_id
            # The checks run in their asset's step, right after its materialization: a failure
            # judging something older than every latest materialization ends the search.
            if target < oldest:
                return
            if target in latest and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                yield latest[target], evaluation, record.run_id
        if len(records) < page:
            return
        cursor = records[-1].id


def materialize(defs, names: list[str], *, instance, partition: str | None = None,
                run_config: dict | None = None, log: Callable[[str], None] = print,
                log_level: str = DAGSTER_LOG_LEVEL) -> bool:
    """Materialize `names` in order, each partition in its own run; stops at the first failure.

    `run_config` maps an asset name to its config (`{"ops": {name: {"config": ...}}}` per run).
    Logs one line per run: elapsed time and key figures on success; on failure, the failed
    ERROR checks by name (or the run to look at). Refuses, with one line per failed check and
    before starting a run, an asset whose upstream asset's latest materialization failed an
    ERROR check (`failed_upstream_checks`). `log_level` is Dagster's console log level."""
    import dagster as dg

    graph = defs.get_repository_def().asset_graph
    known = {key.to_user_string(): key for key in graph.get_all_asset_keys()}
    loggers = {"console": {"config": {"log_level": log_level}}}
    for name in names:
        partitions = graph.get(known[name]).partitions_def
        keys = [None] if partitions is None else ([partition] if partition else partitions.get_partition_keys())
        config = {"ops": {name: {"config": run_config[name]}}} if run_config and name in run_config else {}
        assets = [node for node in defs.assets if isinstance(node, dg.AssetsDefinition) and known[name] in node.keys]
        for key in keys:
            where = f" [{key}]" if key else ""
            blocked = failed_upstream_checks(defs, instance, name, key)
            if blocked:
                for failed in blocked:
                    log(f"materialize: {name}{where} not run: upstream {failed}")
                return False
            started = time.monotonic()
            result = dg.materialize(
                assets, resources=defs.resources, partition_key=key, instance=instance,
                run_config={**config, "loggers": loggers}, raise_on_error=False,
            )
            elapsed = time.monotonic() - started
            checks = result.get_asset_check_evaluations()
            if not result.success:
                errors = [c for c in checks if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR]
                for check in errors:
                    about = f" ({check.description})" if check.description else ""
                    log(f"materialize: {name}{where} failed its check {check.check_name}{about}"
                        f"{_check_figures(check)}; what is downstream will not run; see run {result.run_id}")
                if not errors:
                    log(f"materialize: {name}{where} failed after {_seconds(elapsed)}; "
                        f"see run {result.run_id} in the Dagster instance")
                return False
            metadata = {}
            for event in result.get_asset_materialization_events():
                materialization = event.step_materialization_data.materialization
                metadata.update({k: v.value for k, v in materialization.metadata.items()})
            figures = [_seconds(elapsed), *key_figures(metadata)]
            figures += [f"check {c.check_name} failed ({c.severity.value}{': ' + c.description if c.description else ''})"
                        for c in checks if not c.passed]
            log(f"materialized {name}{where}: {', '.join(figures)}")
    return True


def _seconds(elapsed: float) -> str:
    return f"{elapsed:.1f} s" if elapsed < 100 else f"{elapsed:.0f} s"


def _check_figures(check) -> str:
    """A failed check's numeric metadata, e.g. `: problems 3`."""
    shown = [f"{k} {v.value}" for k, v in check.metadata.items()
             if isinstance(v.value, (int, float)) and not isinstance(v.value, bool)]
    return f": {', '.join(shown)}" if shown else ""


def key_figures(metadata: dict) -> list[str]:
    """The figures of a materialization's metadata worth a console line: rows in and out, failed
    and skipped rows, a training's steps and final loss, a pretrained model's held-out score, an
    evaluation's main metric."""
    figures = []
    if "rows_out" in metadata:
        rows_in = metadata.get("rows_in")
        figures.append(f"rows {rows_in} -> {metadata['rows_out']}" if rows_in is not None
                       else f"rows {metadata['rows_out']}")
    if "failed_rows" in metadata:
        figures.append(f"failed rows {metadata['failed_rows']}")
    if metadata.get("skipped"):
        figures.append(f"skipped {metadata['skipped']}")
    if "kept_fraction" in metadata:
        figures.append(f"kept {metadata['kept_fraction']:.1%}")
    if "final_loss" in metadata:
        figures.append(f"final loss {metadata['final_loss']:.4g}")
    if "steps" in metadata:
        figures.append(f"steps {metadata['steps']}")
    if "psnr_heldout" in metadata:  # the toy VAE
        figures.append(f"held-out PSNR {metadata['psnr_heldout']:.2f} dB")
    if "heldout_top1" in metadata:  # the toy CLIP
        figures.append(f"held-out top-1 {metadata['heldout_top1']:.3f}")
    if "headline" in metadata:  # the toy evaluation's analytic probes, per suite
        figures.append(str(metadata["headline"]))
    else:
        for name in ("dino", "clip_i", "clip_t"):  # DreamBench's
            if f"aggregate/{name}" in metadata:
                figures.append(f"{name} {metadata[f'aggregate/{name}']:.4f}")
    if metadata.get("errors"):
        figures.append(f"errors {metadata['errors']}")
    return figures


def _lines_only() -> None:
    """A console of lines: no progress bars redrawn in place (model loading and saving, MLflow's
    artifact downloads; the steps log progress lines of their own), and no warning Dagster
    raises about its own preview API at every Pipes session."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader\.expected_writer_count`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_assets.materialize", description=__doc__.split("\n")[0])
    parser.add_argument("assets", nargs="*", help="asset names, materialized in the order given")
    parser.add_argument("--all", action="store_true", help="every materializable asset, in dependency order")
    parser.add_argument("--partition", default=None, help="one shard (default: every shard)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))
    _lines_only()

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
