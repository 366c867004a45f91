"""The bootstrap on many workers: every shard of the data graph as its own Dagster run, started
by Dagster's run queue on at most `--workers` run workers at once.

    python -m mumu_assets.postgres start                      # or any PostgreSQL: MUMU_DAGSTER_PG_URL
    python -m mumu_assets.bootstrap --workers 8

What it does, with the instance in `dagster_home/cluster/` (PostgreSQL, QueuedRunCoordinator),
phase by phase (`bootstrap_phases`: the paper profile has one, the toy two, since its scorer
trains on the renders of every shard):
1. materializes the phase's unsharded assets (prompts, a scorer) here, in order;
2. starts `dagster-daemon run` once (unless `--no-daemon`: one already serves this instance);
3. submits one run of `bootstrap_shards_<phase>` per shard as a backfill (`dagster job
   backfill`); the queue starts at most MUMU_WORKERS of them at a time, each a run worker
   process that runs the shard's steps (synthesis -> scores -> filter -> real images ->
   detections -> captions) one after another, each step in its own process (the multiprocess
   executor), so a step whose process is killed is retried (`RetryPolicy`, bounded) without
   touching other shards;
4. waits for every run, printing one line per shard; stops with exit 1 if any shard failed.

Each step process takes one device from MUMU_DEVICE_POOL for as long as it lives
(`mumu_model.devices`): with 8 GPUs and `--workers 8`, every run works on its own GPU. The
same job can be backfilled from the `dagster dev` UI with DAGSTER_HOME=dagster_home/cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg

from .params import REPO_ROOT
from .partitions import SHARDS

CLUSTER_HOME = REPO_ROOT / "dagster_home" / "cluster"
WORKSPACE = REPO_ROOT / "dagster_home" / "workspace.yaml"
JOB_PREFIX = "bootstrap_shards_"
BOOTSTRAP_TAG = "mumu/bootstrap"

# Step processes are forked from a server that has already imported the project (and torch):
# a fresh interpreter per step would cost seconds of imports per step and shard.
shard_executor = dg.multiprocess_executor.configured(
    {"max_concurrent": 1, "start_method": {"forkserver": {"preload_modules": ["mumu_assets.definitions"]}}}
)


class BootstrapError(RuntimeError):
    """A setting is wrong or a service is unreachable; the message names the setting."""


def bootstrap_phases(graph) -> list[tuple[list[str], list[str]]]:
    """The bootstrap as phases of (unsharded assets, sharded assets), each list upstream first.

    It covers every sharded asset and every unsharded asset one of them reads. An unsharded
    asset that reads a sharded one (the toy scorer trains on every shard's renders) waits for
    that phase's shards to finish, and the shards that read it form the next phase. Training
    and evaluation read the shards but no shard reads them, so they are not part of it."""
    keys = [key for key in graph.toposorted_asset_keys if graph.get(key).is_materializable]
    sharded = {key for key in keys if graph.get(key).partitions_def is not None}
    needed, frontier = set(sharded), list(sharded)
    while frontier:
        for parent in graph.get(frontier.pop()).parent_keys:
            if parent not in needed and graph.get(parent).is_materializable:
                needed.add(parent)
                frontier.append(parent)
    phase: dict = {}
    for key in keys:
        if key in needed:
            parents = [p for p in graph.get(key).parent_keys if p in phase]
            bump = 0 if key in sharded else 1  # an unsharded reader of shards comes after them
            phase[key] = max([phase[p] + (bump if p in sharded else 0) for p in parents], default=0)
    count = max(phase.values(), default=-1) + 1
    return [([k.to_user_string() for k in keys if phase.get(k) == i and k not in sharded],
             [k.to_user_string() for k in keys if phase.get(k) == i and k in sharded]) for i in range(count)]


def shard_jobs(assets: list, resources: dict) -> list:
    """One partitioned job per phase of the bootstrap (`bootstrap_shards_<phase>`): a run per
    shard that materializes the phase's sharded steps one after another."""
    graph = dg.Definitions(assets=assets, resources=resources).resolve_asset_graph()
    return [
        dg.define_asset_job(
            f"{JOB_PREFIX}{i}", selection=dg.AssetSelection.assets(*names), partitions_def=SHARDS,
            executor_def=shard_executor,
            # A killed step process (preempted node, OOM kill) is retried; bad data raises a
            # Failure with allow_retries=False and is not.
            op_retry_policy=dg.RetryPolicy(max_retries=2, delay=1),
            description=f"Bootstrap phase {i}, one shard per run: {', '.join(names)}.",
        )
        for i, (_, names) in enumerate(bootstrap_phases(graph)) if names
    ]


def device_pool(workers: int, devices_per_worker: int | None = None) -> list[str]:
    """One device per worker: GPUs when this host has any (an error if fewer than `workers`), else
    the CPU. The pool goes to every step process as MUMU_DEVICE_POOL."""
    import torch

    from mumu_model.devices import check_worker_devices

    if devices_per_worker is None:
        devices_per_worker = 1 if torch.cuda.is_available() else 0
    try:
        visible = check_worker_devices(workers, devices_per_worker, setting="--workers")
    except ValueError as err:
        raise BootstrapError(str(err)) from None
    if devices_per_worker == 0:
        return ["cpu"] * workers
    # Indices among the devices this process sees: children inherit CUDA_VISIBLE_DEVICES.
    return [f"cuda:{i * devices_per_worker}" for i in range(len(visible))]


def _environment(home: Path, workers: int, database: str, pool: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(home),
        "MUMU_DAGSTER_PG_URL": database,
        "MUMU_WORKERS": str(workers),
        "MUMU_DEVICE_POOL": ",".join(pool),
    })
    env.setdefault("MUMU_DEVICE_LEASES", str(Path(env["DAGSTER_HOME"]) / "device_leases"))
    return env


class Daemon:
    """`dagster-daemon run` for the instance, in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], workspace: Path, log: Path):
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(workspace)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT,
        )

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BootstrapError(f"dagster-daemon exited with {self.process.returncode}; see {self.log_path}")

    def stop(self) -> None:
        from .launchers import stop_process_groups

        stop_process_groups([self.process], grace_s=30)
        self._log.close()


def submit(env: dict[str, str], job: str, partitions: list[str], tag: str, workspace: Path) -> None:
    """One queued run per partition of `job`, tagged `mumu/bootstrap=<tag>`."""
    command = [str(Path(sys.executable).with_name("dagster")), "job", "backfill", "-w", str(workspace),
               "-j", job, "--partitions", ",".join(partitions), "--tags", json.dumps({BOOTSTRAP_TAG: tag}),
               "--noprompt"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode:
        raise BootstrapError(f"submitting the backfill failed: {(result.stderr or result.stdout).strip()[-3000:]}")


def wait(instance, tag: str, expected: int, *, daemon: Daemon | None, timeout_s: float | None, log=print) -> dict:
    """Poll the runs tagged `tag` until `expected` of them have ended; {partition: status}."""
    started, reported = time.monotonic(), {}
    ended = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    while True:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BOOTSTRAP_TAG: tag}))
        for run in runs:
            partition = run.tags.get("dagster/partition")
            if run.status in ended and partition not in reported:
                stats = instance.get_run_stats(run.run_id)
                took = (stats.end_time or 0) - (stats.start_time or stats.end_time or 0)
                reported[partition] = run.status.value
                log(f"shard {partition}: {run.status.value.lower()} in {took:.1f} s (run {run.run_id[:8]})")
        if len(reported) >= expected:
            return reported
        if daemon is not None:
            daemon.check()
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise BootstrapError(f"{expected - len(reported)} shard run(s) still running after --timeout {timeout_s:.0f} s")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_assets.bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, required=True, help="runs at once (one device each)")
    parser.add_argument("--database", default=os.environ.get("MUMU_DAGSTER_PG_URL"),
                        help="PostgreSQL URL of the instance (default $MUMU_DAGSTER_PG_URL)")
    parser.add_argument("--home", type=Path, default=CLUSTER_HOME,
                        help="the Dagster instance folder, its dagster.yaml queued (default dagster_home/cluster)")
    parser.add_argument("--workspace", type=Path, default=WORKSPACE,
                        help="the code location's workspace.yaml (default dagster_home/workspace.yaml)")
    parser.add_argument("--partitions", default=None, help="comma-separated shards (default: every shard)")
    parser.add_argument("--skip-upstream", action="store_true",
                        help="the unsharded inputs of the first phase are already materialized")
    parser.add_argument("--no-daemon", action="store_true", help="a dagster-daemon already serves this instance")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)

    from .postgres import PostgresError, check_reachable

    daemon = None
    try:
        if not args.database:
            raise BootstrapError("no database: pass --database or set MUMU_DAGSTER_PG_URL "
                                 "(`python -m mumu_assets.postgres start` prints one)")
        if args.workers < 1:
            raise BootstrapError(f"--workers={args.workers}: need at least 1")
        check_reachable(args.database, setting="--database")
        if not (args.home / "dagster.yaml").is_file():
            raise BootstrapError(f"--home {args.home}: no dagster.yaml (copy dagster_home/cluster/dagster.yaml)")
        env = _environment(args.home.resolve(), args.workers, args.database, device_pool(args.workers))
        os.environ.update({k: env[k] for k in ("DAGSTER_HOME", "MUMU_DAGSTER_PG_URL", "MUMU_WORKERS")})
        from .definitions import defs
        from .materialize import materialize

        partitions = args.partitions.split(",") if args.partitions else SHARDS.get_partition_keys()
        unknown = sorted(set(partitions) - set(SHARDS.get_partition_keys()))
        if unknown:
            raise BootstrapError(f"--partitions: unknown shard(s) {unknown}; data.num_shards gives "
                                 f"{SHARDS.get_partition_keys()[0]}..{SHARDS.get_partition_keys()[-1]}")
        instance = dg.DagsterInstance.get()
        statuses: dict = {}
        for phase, (serial, shard_steps) in enumerate(bootstrap_phases(defs.resolve_asset_graph())):
            if serial and not (args.skip_upstream and phase == 0):
                if not materialize(defs, serial, instance=instance, log=log):
                    return 1
            if not shard_steps:
                continue
            if daemon is None and not args.no_daemon:
                daemon = Daemon(env, args.workspace, Path(env["DAGSTER_HOME"]) / "logs" / "daemon.log")
            tag = uuid.uuid4().hex[:12]
            submit(env, f"{JOB_PREFIX}{phase}", partitions, tag, args.workspace)
            log(f"phase {phase}: queued {len(partitions)} shard run(s) of {', '.join(shard_steps)} "
                f"on {args.workers} worker(s) ({BOOTSTRAP_TAG}={tag})")
            statuses = wait(instance, tag, len(partitions), daemon=daemon, timeout_s=args.timeout, log=log)
            if any(status != "SUCCESS" for status in statuses.values()):
                break  # the next phase reads every shard of this one
    except (BootstrapError, PostgresError) as err:
        print(f"bootstrap: {err}", file=sys.stderr)
        return 2
    finally:
        if daemon is not None:
            daemon.stop()
    failed = sorted(p for p, status in statuses.items() if status != "SUCCESS")
    log(f"{len(statuses) - len(failed)} of {len(statuses)} shard(s) succeeded" +
        (f"; failed: {', '.join(failed)} (see their runs in the Dagster UI)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
