"""Turning step results into Dagster metadata that reads well in the UI."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from mumu_model.data.report import Skipped
from mumu_model.data.versioning import dvc_hash


def dataset_metadata(path: Path, rows_in: int | None, rows_out: int, skipped: Skipped | None = None) -> dict:
    metadata = {
        "path": dg.MetadataValue.path(str(path)),
        "dvc_hash": dg.MetadataValue.text(dvc_hash(path)),
        "rows_out": dg.MetadataValue.int(rows_out),
    }
    if rows_in is not None:
        metadata["rows_in"] = dg.MetadataValue.int(rows_in)
    if skipped is not None:
        metadata["skipped"] = dg.MetadataValue.int(skipped.total)
        metadata["skipped_by_reason"] = dg.MetadataValue.json(skipped.as_dict())
    return metadata


def preview(table: pd.DataFrame, rows: int = 5) -> dg.MetadataValue:
    if table.empty:
        return dg.MetadataValue.md("_(empty)_")
    head = table.head(rows).astype(str).map(lambda v: v if len(v) <= 120 else v[:117] + "...")
    return dg.MetadataValue.md(head.to_markdown(index=False))


def histogram(values: list[float], bins: list[float]) -> dg.MetadataValue:
    """A markdown histogram (Dagster has no chart metadata type)."""
    counts = pd.cut(pd.Series(values, dtype=float), bins=bins, include_lowest=True).value_counts(sort=False)
    lines = ["| range | count |", "|---|---|"]
    lines += [f"| {interval} | {count} |" for interval, count in counts.items()]
    return dg.MetadataValue.md("\n".join(lines))
