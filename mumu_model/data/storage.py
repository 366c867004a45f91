"""Where datasets live: a local folder, or any fsspec URL (`s3://bucket/mumu`, `gs://...`,
`file:///mnt/shared/mumu`) for workers on many hosts.

The data steps read and write local files (tar shards, parquet tables), atomically. With a URL
root, `DatasetRoot.local` hands out paths in a local cache that mirrors the URL: an input is
fetched on first use (again when the remote copy changed), and `publish` uploads the complete
files written under the paths handed out since a given time, each to a temporary key first and
then moved to its name, so a reader never sees half a file. Temp files of killed writers are
never uploaded. A root that cannot be reached fails within `timeout_s`, naming the setting.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import threading
from pathlib import Path

from ..atomic import atomic_file, is_temp_name


_COPY_CHUNK = 1 << 20  # bytes a fetch reads at a time


class StorageError(RuntimeError):
    """The dataset root is unusable; the message names the setting and the URL."""


def is_url(root: str) -> bool:
    return "://" in str(root) and not str(root).startswith("/")


class DatasetRoot:
    """Datasets under `root` (folder or URL). `cache` holds the local mirror of a URL root
    (default `~/.cache/mumu/<hash of the URL>`); `storage_options` go to fsspec (credentials,
    endpoint, timeouts); `setting` names the root in errors."""

    def __init__(self, root: str, cache: str | None = None, storage_options: dict | None = None,
                 timeout_s: float = 30.0, setting: str = "data.root"):
        self.root, self.setting, self.timeout_s = str(root), setting, timeout_s
        self.remote = is_url(self.root)
        self._handed_out: set[Path] = set()
        self._fetched: dict[Path, int] = {}  # cache files fetched: not uploaded back unless changed
        if not self.remote:
            self.cache = Path(self.root)
            return
        import fsspec

        try:
            self.fs, self.base = fsspec.url_to_fs(self.root, **(storage_options or {}))
        except ImportError as err:  # s3fs, gcsfs, adlfs: the protocol's package
            raise StorageError(f"{setting}={self.root}: {err} (pip install it beside mumu)") from None
        except ValueError as err:
            raise StorageError(f"{setting}={self.root}: {err}") from None
        self.base = self.base.rstrip("/")
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.cache = Path(cache or Path.home() / ".cache" / "mumu" / digest)

    def check(self) -> None:
        """Reach the root (list it) within `timeout_s`, or raise `StorageError`."""
        if not self.remote:
            return
        outcome: list = []

        def probe() -> None:
            try:  # not `exists`: some file systems answer False for a connection they cannot make
                outcome.append(self.fs.info(self.base))
            except FileNotFoundError:
                outcome.append(None)  # reached; the root is made by the first write
            except Exception as err:  # noqa: BLE001 - any failure to reach it is reported as such
                outcome.append(err)

        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if not outcome:
            raise StorageError(f"{self.setting}={self.root}: no answer within {self.timeout_s:.0f} s")
        if isinstance(outcome[0], Exception):
            error = str(outcome[0]).strip().splitlines()[0] if str(outcome[0]).strip() else type(outcome[0]).__name__
            raise StorageError(f"{self.setting}={self.root}: cannot reach it ({error})")

    def _remote(self, local: Path) -> str:
        return f"{self.base}/{local.relative_to(self.cache).as_posix()}"

    def local(self, *parts: str) -> Path:
        """The local path of `parts` under the root; with a URL root, fetched into the cache if
        the remote has it (a file, or a folder's files) and the cached copy is missing or stale."""
        path = self.cache.joinpath(*parts)
        if not self.remote:
            return path
        self._handed_out.add(path)
        remote = self._remote(path)
        try:
            if self.fs.isdir(remote):
                for name in self.fs.find(remote):
                    target = self.cache / Path(name[len(self.base) + 1:])
                    if not is_temp_name(target.name):
                        self._fetch(name, target)
            elif self.fs.isfile(remote):
                self._fetch(remote, path)
        except OSError as err:
            raise StorageError(f"{self.setting}={self.root}: cannot read {remote} ({err})") from None
        return path

    def _fetch(self, remote: str, target: Path) -> None:
        info = self.fs.info(remote)
        if target.is_file() and target.stat().st_size == info.get("size"):
            self._fetched.setdefault(target, target.stat().st_mtime_ns)
            return
        with self.fs.open(remote, "rb") as source, atomic_file(target) as copy:
            shutil.copyfileobj(source, copy, _COPY_CHUNK)
        self._fetched[target] = target.stat().st_mtime_ns

    def publish(self, since: float) -> list[str]:
        """Upload the complete files that changed at or after `since` (a `time.time()`) under
        the paths handed out, and beside the files among them (a step writes a shard's manifest
        table next to it); returns their remote paths. A local root has nothing to upload."""
        if not self.remote:
            return []
        files: set[Path] = set()
        for handed in self._handed_out:
            if handed.is_dir():
                files.update(p for p in handed.rglob("*") if p.is_file())
            elif handed.parent.is_dir():
                files.update(p for p in handed.parent.iterdir() if p.is_file())
        uploaded = []
        for path in sorted(files):
            stat = path.stat()
            if is_temp_name(path.name) or stat.st_mtime < since or self._fetched.get(path) == stat.st_mtime_ns:
                continue
            remote = self._remote(path)
            temp = f"{remote.rpartition('/')[0]}/.{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                self.fs.makedirs(remote.rpartition("/")[0], exist_ok=True)
                self.fs.put_file(str(path), temp)
                self.fs.mv(temp, remote)
            except OSError as err:
                raise StorageError(f"{self.setting}={self.root}: cannot write {remote} ({err})") from None
            uploaded.append(remote)
        return uploaded
