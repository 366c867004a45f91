"""A local PostgreSQL server for the Dagster instance of a multi-worker run, from the system's
own PostgreSQL binaries (Debian's `postgresql` package):

    python -m mumu_assets.postgres start --dir .postgres     # prints the URL; idempotent
    python -m mumu_assets.postgres stop --dir .postgres

`start` creates the cluster on first use (`initdb`, trust authentication for the one local
user, `listen_addresses` 127.0.0.1 only unless `--host` says otherwise), starts it with
`pg_ctl`, creates the database and writes the URL to `<dir>/url`. A cluster that is already
running is left as it is. Run as root, the server runs as the `postgres` system user, since
PostgreSQL refuses to run as root.

A shared deployment (a managed database, a server on its own host) needs none of this: point
`MUMU_DAGSTER_PG_URL` at it.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

USER = "mumu"
DATABASE = "dagster"
PACKAGE_HINT = "install the server (Debian: apt-get install postgresql)"


class PostgresError(RuntimeError):
    """The server could not be found, created, started or reached."""


def find_bindir() -> Path:
    """The folder holding `initdb` and `pg_ctl`: $MUMU_PG_BINDIR, Debian's newest
    /usr/lib/postgresql/<version>/bin, or the PATH."""
    if os.environ.get("MUMU_PG_BINDIR"):
        candidates = [Path(os.environ["MUMU_PG_BINDIR"])]
    else:
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name),
                          reverse=True)
        candidates = [Path(p) for p in versions]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresError(f"no PostgreSQL server binaries (initdb, pg_ctl) found; {PACKAGE_HINT}, "
                        "or set MUMU_PG_BINDIR")


def available() -> bool:
    try:
        find_bindir()
    except PostgresError:
        return False
    return True


class LocalPostgres:
    """One PostgreSQL cluster in `directory`, serving `port` on `host`."""

    def __init__(self, directory: str | Path, port: int = 5432, host: str = "127.0.0.1"):
        self.directory = Path(directory).resolve()
        self.data = self.directory / "data"
        self.port = int(port)
        self.host = host
        self.bindir = find_bindir()
        # PostgreSQL will not run as root: then the cluster belongs to the package's system user.
        self.run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Dagster takes (the driver named: psycopg2 is what is installed)."""
        return f"postgresql+psycopg2://{USER}@{self.host}:{self.port}/{DATABASE}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            raise PostgresError(f"{' '.join(args[:2])} failed (exit {result.returncode}): "
                                f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def _own(self, path: Path) -> None:
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            os.chown(path, user.pw_uid, user.pw_gid)

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").is_file():
            return False
        command = [str(self.bindir / "pg_ctl"), "status", "-D", str(self.data)]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        return subprocess.run(command, capture_output=True).returncode == 0

    def start(self, timeout_s: float = 60) -> str:
        """Create the cluster if needed, start it unless it runs, create the database; the URL."""
        if self.run_as:
            try:
                pwd.getpwnam(self.run_as)
            except KeyError:
                raise PostgresError(f"running as root needs the '{self.run_as}' system user; {PACKAGE_HINT}") from None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._own(self.directory)
        if not (self.data / "PG_VERSION").is_file():
            # A half-made cluster (initdb killed) is redone; a finished one is never touched.
            shutil.rmtree(self.data, ignore_errors=True)
            self._run("initdb", "-D", str(self.data), f"--username={USER}", "--auth=trust",
                      "--encoding=UTF8", "--no-instructions")
        if not self.running():
            if _port_taken(self.host, self.port):
                raise PostgresError(f"port {self.port} on {self.host} is taken by another server; pass --port")
            options = (f"-c listen_addresses={self.host} -p {self.port} -k {self.directory} "
                       "-c max_connections=200 -c fsync=off")
            self._run("pg_ctl", "start", "-D", str(self.data), "-w", "-t", str(int(timeout_s)),
                      "-l", str(self.directory / "server.log"), "-o", options, timeout=timeout_s + 10)
        self._wait_ready(timeout_s)
        exists = self._run("psql", "-h", self.host, "-p", str(self.port), "-U", USER, "-d", "postgres",
                           "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'").stdout.strip()
        if exists != "1":
            self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", USER, DATABASE)
        (self.directory / "url").write_text(self.url + "\n")
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", self.host, "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL on {self.host}:{self.port} not ready after {timeout_s:.0f} s; "
                                    f"see {self.directory / 'server.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def check_reachable(url: str, setting: str = "MUMU_DAGSTER_PG_URL", timeout_s: int = 5) -> None:
    """Connect to `url` once, failing within `timeout_s` with an error naming `setting`."""
    import psycopg2

    try:
        psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1), connect_timeout=timeout_s).close()
    except psycopg2.OperationalError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PostgresError(f"{setting}={url}: cannot connect to the database ({reason}); start it with "
                            "`python -m mumu_assets.postgres start` or fix the URL") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_assets.postgres", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop", "url"])
    parser.add_argument("--dir", default=".postgres", help="the cluster's folder (default .postgres)")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        server = LocalPostgres(args.dir, port=args.port, host=args.host)
        if args.action == "start":
            print(server.start())
        elif args.action == "stop":
            server.stop()
        else:
            print(server.url)
    except PostgresError as err:
        print(f"postgres: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
