"""The DVC hash of a dataset, computed the way `dvc add` / `dvc repro` computes it.

Recording it in asset metadata ties a Dagster materialization to the exact bytes that
`dvc push` stores, so a run can be traced to its dataset version and `dvc pull`ed back.
"""

from __future__ import annotations

import os
import tempfile


def dvc_hash(path: str | os.PathLike) -> str:
    """md5 of a file, or DVC's `<md5>.dir` tree hash of a folder (what dvc.lock records)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), os.fspath(path), fs, "md5")
    return obj.hash_info.value
