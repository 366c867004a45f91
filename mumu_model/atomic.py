"""Atomic writes: a reader sees the old file or folder or the complete new one, never a half.

Every writer here stages its output beside the target under one name pattern,
`.<target name>.<token>.tmp` (`TEMP_PATTERN`), then renames it into place. A writer killed
before the rename (SIGKILL, OOM, a preempted node) leaves that temp behind; the pattern is what
lets everything else ignore it: `.dvcignore` lists it (so DVC's hash of a dataset folder is the
clean run's), `dvc_hash` skips it, readers glob `*.tar` / `*.parquet`, and `remove_orphans`
deletes it once it is old enough to be surely abandoned.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"
# Hidden, ends in .tmp: a gitignore-style pattern, listed as is in the repository's .dvcignore.
TEMP_PATTERN = ".*.tmp"
# A live writer touches its temp at least this often; older temps are orphans (see remove_orphans).
ORPHAN_AGE_S = 3600.0


def is_temp_name(name: str) -> bool:
    """True for the name of an atomic writer's temp file or folder (`.<name>.<token>.tmp`)."""
    return fnmatch.fnmatchcase(name, TEMP_PATTERN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary handle on a temp file beside `path` (same filesystem); when the block ends
    without error, flush, fsync and rename it to `path`; on error, remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a dataset file is shared
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename into place."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path`, on error it is removed.

    A folder cannot be swapped in one rename if `path` exists, so the old one is first moved
    aside (into another temp of the same pattern) and deleted only after the new one is in
    place; if that rename fails, the old one is put back.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX))
    try:
        yield tmp
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)) / path.name
            os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
            finally:
                shutil.rmtree(aside.parent, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _last_modified(path: Path) -> float:
    """mtime of a temp file; of a temp folder, the newest mtime in it (a writer filling a
    folder rewrites the files in it, which does not always touch the folder itself)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_orphans(folder: str | os.PathLike, older_than_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Delete the temp files and folders of killed writers in `folder` (not below it): entries
    named `.<name>.<token>.tmp` not modified for `older_than_s` seconds (0: all of them).
    Returns what was removed; a missing folder has nothing to remove.

    Why an age and not a pid: the writers of one dataset folder may run on other hosts (one
    Dagster run worker, Slurm task or pod per shard, all on shared storage), where a pid names
    nothing, and pids are reused. A live writer keeps appending to its temp, so its mtime stays
    within seconds of now; the default bound (an hour) is far longer than any pause between two
    writes and than the clock skew between hosts, so a concurrent writer's temp survives.
    """
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    now = time.time()
    removed = []
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        path = Path(entry.path)
        try:
            if older_than_s > 0 and now - _last_modified(path) < older_than_s:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # renamed into place, or removed by another worker's cleanup, meanwhile
        removed.append(path)
    return removed
