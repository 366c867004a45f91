"""The Dagster Definitions of MUMU: `dagster dev -m mumu_assets.definitions`."""

from __future__ import annotations

import dagster as dg

from .automation import new_source_files, prompts_job, real_images_job, weekly_prompts_schedule
from .bootstrap import shard_jobs
from .data_assets import DATA_ASSETS
from .eval_assets import EVAL_ASSETS
from .profiles import current_profile, get_profile
from .training_assets import TRAINING_ASSETS


def build_definitions(profile: str | None = None, resources: dict | None = None) -> dg.Definitions:
    chosen = get_profile(profile or current_profile())
    assets = [*chosen.pretrained, *DATA_ASSETS, *TRAINING_ASSETS, *EVAL_ASSETS]
    resources = {**chosen.resources, **(resources or {})}
    return dg.Definitions(
        assets=assets,
        jobs=[prompts_job, real_images_job, *shard_jobs(assets, resources)],
        schedules=[weekly_prompts_schedule],
        sensors=[new_source_files],
        resources=resources,
    )


defs = build_definitions()
