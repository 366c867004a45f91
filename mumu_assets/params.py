"""params.yaml: the defaults of every asset's config, and what DVC tracks as parameters."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def params_path() -> Path:
    """$MUMU_PARAMS, else ./params.yaml (DVC runs stages from the project folder), else the repo's."""
    if "MUMU_PARAMS" in os.environ:
        return Path(os.environ["MUMU_PARAMS"])
    local = Path("params.yaml")
    return local if local.is_file() else REPO_ROOT / "params.yaml"


@lru_cache(maxsize=None)
def _load(path: str) -> dict:
    with open(path) as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping")
    return loaded


def params(section: str | None = None, group: str = "data"):
    """A top-level group of params.yaml (`data`, `training`, ...), or one of its subsections;
    a scalar group (`profile`) as it is."""
    data = _load(str(params_path())).get(group, {})
    if not isinstance(data, dict):
        return data
    return dict(data if section is None else data.get(section, {}))
