"""The DVC hash of a dataset, computed the way `dvc add` / `dvc repro` computes it.

Recording it in asset metadata ties a Dagster materialization to the exact bytes that
`dvc push` stores, so a run can be traced to its dataset version and `dvc pull`ed back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..atomic import is_temp_name


class _SkipTemps:
    """dvc_data's `Ignore` protocol: walk a folder without atomic writers' temp entries.

    DVC applies the repository's `.dvcignore` (which lists `TEMP_PATTERN`) when it hashes a
    folder; `dvc_hash` builds with a bare filesystem that knows no `.dvcignore`, so it drops the
    same pattern itself. A killed writer's temp thus changes neither hash.
    """

    def walk(self, fs, path, **kwargs):
        for root, dirs, files in fs.walk(path, **kwargs):
            for entries in (dirs, files):
                # In place: os.walk then skips the pruned folders (a list, or a dict with detail=True).
                for name in [name for name in entries if is_temp_name(name)]:
                    if isinstance(entries, dict):
                        del entries[name]
                    else:
                        entries.remove(name)
            yield root, dirs, files

    def find(self, fs, path, **kwargs):
        for root, _, files in self.walk(fs, path, **kwargs):
            for name in files:
                yield f"{root}{fs.sep}{name}"


def dvc_hash(path: str | os.PathLike, state_dir: str | os.PathLike | None = None) -> str:
    """md5 of a file, or DVC's `<md5>.dir` tree hash of a folder (what dvc.lock records).
    Temp files and folders of atomic writers (`.<name>.<token>.tmp`) are not part of it.

    With `state_dir`, DVC's state database there (DVC keeps its own in `.dvc/tmp`,
    `dvc_state_dir`) remembers each file's md5 by its inode, mtime and size: files unchanged
    since they were last hashed (by this function or by DVC) are not read again."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.state import State, StateNoop
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    state = State(tmp_dir=os.fspath(state_dir)) if state_dir is not None else StateNoop()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            _, _, obj = build(HashFileDB(fs, scratch, state=state), os.fspath(path), fs, "md5", ignore=_SkipTemps())
    finally:
        state.close()
    return obj.hash_info.value


def dvc_state_dir(path: str | os.PathLike) -> Path | None:
    """`.dvc/tmp` of the DVC repository `path` is in (where DVC keeps its state database), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / ".dvc").is_dir():
            return folder / ".dvc" / "tmp"
    return None
