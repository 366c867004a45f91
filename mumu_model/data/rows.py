"""What a synthesis row must hold, for every backend (SDXL, the toy renderer): a `pair_id`, a
non-empty `text` and an integer `seed`. Torch-free, so a renderer need not import diffusers."""

from __future__ import annotations

import numbers


def row_problem(row: object) -> str:
    """Why `row` cannot be rendered, or "" if it can."""
    if not isinstance(row, dict):
        return f"not a dict ({type(row).__name__})"
    missing = [key for key in ("pair_id", "text", "seed") if key not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["text"], str) or not row["text"].strip():
        return "text must be a non-empty string"
    seed = row["seed"]
    # numbers.Integral also admits numpy integers (rows from pandas); bool is no seed.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        return f"seed must be an integer, got {seed!r}"
    if not 0 <= int(seed) < 2**64:
        return f"seed out of range: {seed}"
    return ""


def row_id(row: object) -> str:
    return str(row.get("pair_id", "?")) if isinstance(row, dict) else "?"
