"""Keeping the data fresh: a schedule that re-runs the prompt assets, a sensor that starts a
run when new prompt or image files appear, and eager automation that carries every update
down through the sharded assets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg

from .params import params

prompts_job = dg.define_asset_job(
    "prompts_job", selection=dg.AssetSelection.assets("raw_prompts", "content_style"),
    description="Re-read the prompt source and re-pair contents with styles.",
)
real_images_job = dg.define_asset_job(
    "real_images_job", selection=dg.AssetSelection.assets("real_images"),
    description="Re-ingest the real-image source, shard by shard.",
)

weekly_prompts_schedule = dg.ScheduleDefinition(
    name="weekly_prompts", job=prompts_job, cron_schedule="0 3 * * 1", default_status=dg.DefaultScheduleStatus.STOPPED,
)


def source_fingerprint(source: str | None) -> str:
    """Changes when a file under `source` is added, removed, resized or rewritten."""
    if not source or not Path(source).exists():
        return ""
    root = Path(source)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root.parent)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dg.sensor(
    name="new_source_files", minimum_interval_seconds=60, jobs=[prompts_job, real_images_job],
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def new_source_files(context: dg.SensorEvaluationContext):
    """Start a run when the prompt source or the real-image source changes on disk."""
    data = params()
    prompts, real = data["prompts"]["source"], data["real_images"]["source"]
    cursor = dict(part.split("=", 1) for part in (context.cursor or "").split(";") if "=" in part)
    current = {"prompts": source_fingerprint(prompts), "real": source_fingerprint(real)}
    if current["prompts"] and current["prompts"] != cursor.get("prompts"):
        yield dg.RunRequest(run_key=f"prompts-{current['prompts'][:16]}", job_name="prompts_job")
    if current["real"] and current["real"] != cursor.get("real"):
        from .partitions import SHARDS

        for shard in SHARDS.get_partition_keys():
            yield dg.RunRequest(run_key=f"real-{current['real'][:16]}-{shard}", job_name="real_images_job",
                                partition_key=shard)
    context.update_cursor(";".join(f"{k}={v}" for k, v in current.items()))
