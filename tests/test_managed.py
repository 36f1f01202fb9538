"""Managed hosts: an application role with only CREATE on its database (no superuser, no
CREATEROLE) installs and runs meowmx through every install path. The group roles are
optional (a WARNING names the step an administrator runs), and their names are chosen per
database (meowmx.role_prefix), so that meowmx databases of different owners on one
cluster keep their rights apart.

Roles are cluster-wide: each one made here has a name unique to the test session, and is
dropped after its test, after the databases (made here too) it has rights in.
"""

from __future__ import annotations

import logging
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import meowmx
from clusters import extension_dir
from meowmx import cli
from meowmx.install import write_extension
from support import raises_meowmx, wait_until
from test_privileges import KINDS, check_privilege_matrix, denied, roles_of
from test_upgrade import install_version

Connection = psycopg.Connection[Any]
Psql = Callable[..., subprocess.CompletedProcess[str]]
Capsys = pytest.CaptureFixture[str]

SESSION = secrets.token_hex(3)  # in every name made here: sessions on one server differ
ALL_VERSIONS = list(range(1, meowmx.latest_version() + 1))


class Cluster:
    """Databases and roles made as the test server's superuser, dropped by `clean`."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.databases: list[str] = []
        self.roles: list[str] = []
        self.group_roles: list[str] = []

    def admin(self) -> Connection:
        return psycopg.connect(self.server_dsn, autocommit=True)

    def name(self, kind: str) -> str:
        return f"mxt{SESSION}_{kind}{secrets.token_hex(3)}"

    def prefix(self) -> str:
        """A role prefix of this session; its four roles are dropped after the test."""
        prefix = self.name("p")
        self.group_roles += roles_of(prefix)
        return prefix

    def dsn(self, user: str, dbname: str) -> str:
        return make_conninfo(self.server_dsn, user=user, dbname=dbname)

    def login_role(self, *options: str) -> str:
        name = self.name("u")
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN {}").format(
                    sql.Identifier(name), sql.SQL(" ".join(options))
                )
            )
        self.roles.append(name)
        return name

    def owner(self, *options: str) -> tuple[str, str]:
        """A fresh database and a login role whose only right on it is CREATE (plus
        `options`, such as CREATEROLE); returns (role, its DSN of the database)."""
        role, dbname = self.login_role(*options), self.name("db")
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname))
            )
            self.databases.append(dbname)
            conn.execute(
                sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    sql.Identifier(dbname), sql.Identifier(role)
                )
            )
        return role, self.dsn(role, dbname)

    def member(self, dsn: str, *groups: str) -> str:
        """A new login role in `groups` (granted by the superuser); its DSN of `dsn`'s
        database."""
        role = self.login_role()
        with self.admin() as conn:
            for group in groups:
                conn.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(role))
                )
        return make_conninfo(dsn, user=role)

    def clean(self) -> None:
        with self.admin() as conn:
            for dbname in self.databases:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
            # Group roles first: dropping them ends the memberships their owners granted.
            for role in [*self.group_roles, *reversed(self.roles)]:
                conn.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                    " WHERE usename = %s",
                    [role],
                )
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def cluster(server_dsn: str) -> Iterator[Cluster]:
    made = Cluster(server_dsn)
    try:
        yield made
    finally:
        made.clean()


def existing(cluster: Cluster, roles: tuple[str, ...]) -> list[str]:
    with cluster.admin() as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname", [list(roles)]
        ).fetchall()
    return [row[0] for row in rows]


def admin_step(hint: str) -> list[str]:
    """The statements the WARNING's HINT tells an administrator to run."""
    return re.findall(r"CREATE ROLE \S+ NOLOGIN;", hint)


def check_notice(hint: str, prefix: str, owner: str) -> None:
    assert admin_step(hint) == [f"CREATE ROLE {role} NOLOGIN;" for role in roles_of(prefix)]
    assert hint.endswith(f"Then {owner} runs: SELECT * FROM meowmx.create_roles();")


def exercise(dsn: str, stream: str, *, subscribe: bool = True) -> None:
    """What an application does: appends, reads, and a subscription round trip."""
    with meowmx.Client(dsn) as client:
        client.append("order", stream, "Placed", {"n": 1}, expected_version=0)
        client.append_many(
            "order",
            stream,
            [meowmx.NewEvent("Paid", {}), meowmx.NewEvent("Shipped", {})],
            expected_version=1,
        )
        assert [e.version for e in client.read_stream("order", stream)] == [1, 2, 3]
        wait_until(
            lambda: len([e for e in client.read_events() if e.stream_id == stream]) == 3,
            "the appends to pass the read horizon",
        )
        if not subscribe:
            return
        name = f"sub-{stream}"
        assert client.create_subscription(name, categories=["order"])
        batch = client.claim_batch(name, "w1")
        assert [e.stream_id for e in batch].count(stream) == 3
        client.ack(name, "w1", batch[-1].partition, batch[-1].position)
        assert client.release(name, "w1") == 1


def run_as_members(cluster: Cluster, dsn: str, prefix: str) -> None:
    """Login roles in the prefix's group roles: each may do what its role may."""
    reader, writer, worker, admin = roles_of(prefix)
    exercise(cluster.member(dsn, writer, worker), "by-members")
    with psycopg.connect(cluster.member(dsn, reader), autocommit=True) as conn:
        conn.execute("SELECT * FROM meowmx.read_stream(category => 'order', stream_id => '1')")
        denied(
            conn,
            "SELECT meowmx.append_event(category => 'order', stream_id => 'r', event_type => 'X',"
            " data => '{}')",
        )
    with psycopg.connect(cluster.member(dsn, writer), autocommit=True) as conn:
        denied(conn, "SELECT meowmx.delete_stream(category => 'order', stream_id => '1')")
        denied(conn, "SELECT * FROM meowmx.events")
    with psycopg.connect(cluster.member(dsn, admin), autocommit=True) as conn:
        conn.execute("SELECT meowmx.delete_stream(category => 'order', stream_id => 'by-members')")


# meowmx.install ---------------------------------------------------------------------------


def test_a_create_only_role_installs_and_runs_everything(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    owner, dsn = cluster.owner()
    prefix = cluster.prefix()
    with caplog.at_level(logging.WARNING, logger="meowmx.install"):
        assert meowmx.install(dsn, role_prefix=prefix) == ALL_VERSIONS
    (notice,) = [r for r in caplog.records if r.name == "meowmx.install"]
    said = notice.notice  # type: ignore[attr-defined]
    assert said.message == f"group roles not created: {', '.join(roles_of(prefix))}"
    check_notice(said.hint, prefix, owner)
    assert existing(cluster, roles_of(prefix)) == []

    exercise(dsn, "1")  # the owner runs everything without the roles
    assert meowmx.install(dsn, role_prefix=prefix) == []
    assert meowmx.install(dsn) == []

    # The administrator's step, then the owner's: the roles get their rights.
    with cluster.admin() as conn:
        for statement in admin_step(said.hint):
            conn.execute(statement)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT kind::text, role_name, status FROM meowmx.create_roles()")
        assert rows.fetchall() == [
            (kind, role, "existed") for kind, role in zip(KINDS, roles_of(prefix), strict=True)
        ]
        check_privilege_matrix(conn, prefix)
        # The default roles, of other databases, got nothing here.
        for role in existing(cluster, roles_of("meowmx")):
            usage = conn.execute("SELECT has_schema_privilege(%s, 'meowmx', 'USAGE')", [role])
            assert usage.fetchone() == (False,), role
    run_as_members(cluster, dsn, prefix)


def test_the_cli_prints_the_administrators_step(cluster: Cluster, capsys: Capsys) -> None:
    owner, dsn = cluster.owner()
    prefix = cluster.prefix()
    code = cli.main(["install", "--dsn", dsn, "--role-prefix", prefix])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"meowmx schema version {meowmx.latest_version()}" in out
    lines = err.splitlines()
    assert lines[0] == f"meowmx: group roles not created: {', '.join(roles_of(prefix))}"
    assert lines[1].startswith(f"DETAIL: Role {owner} may not create roles.")
    check_notice(lines[2].removeprefix("HINT: "), prefix, owner)


# The printed SQL through psql ------------------------------------------------------------


def test_the_printed_sql_installs_as_a_create_only_role(
    cluster: Cluster, psql: Psql, capsys: Capsys
) -> None:
    owner, dsn = cluster.owner()
    prefix = cluster.prefix()
    assert cli.main(["sql", "--role-prefix", prefix]) == 0
    script = capsys.readouterr().out
    assert script.startswith(f"SET meowmx.role_prefix = '{prefix}';\n")
    done = psql(script, dsn, args=["-1", "-f", "-"])  # with -v ON_ERROR_STOP=1
    assert f"WARNING:  group roles not created: {', '.join(roles_of(prefix))}" in done.stderr
    hint = re.search(r"^HINT:  (.*)$", done.stderr, re.MULTILINE)
    assert hint is not None
    check_notice(hint[1], prefix, owner)
    assert psql("SELECT meowmx.version()", dsn).stdout.strip() == str(meowmx.latest_version())

    appended = psql(
        "SELECT version FROM meowmx.append_event(category => 'order', stream_id => '1',"
        " event_type => 'Placed', data => '{}', expected_version => 0);",
        dsn,
    )
    assert appended.stdout.strip() == "1"
    exercise(dsn, "2")

    # The administrator runs the HINT's statements; the owner gives the rights.
    psql(" ".join(admin_step(hint[1])), cluster.server_dsn)
    created = psql("SELECT role_name, status FROM meowmx.create_roles();", dsn)
    assert created.stdout.splitlines() == [f"{role}|existed" for role in roles_of(prefix)]
    assert "WARNING" not in created.stderr
    run_as_members(cluster, dsn, prefix)


# CREATE EXTENSION -------------------------------------------------------------------------


def test_create_extension_as_a_create_only_role(cluster: Cluster) -> None:
    """superuser = false (and not trusted): the script runs as the caller, so the caller
    owns every object and the SECURITY DEFINER functions run as that caller, never as a
    superuser."""
    owner, dsn = cluster.owner()
    write_extension(extension_dir(cluster.server_dsn))  # pg_config is for superusers
    prefix = cluster.prefix()
    notices: list[str | None] = []  # a Diagnostic is valid only during the callback
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        with conn.transaction():
            conn.execute("SELECT set_config('meowmx.role_prefix', %s, true)", [prefix])
            conn.execute("CREATE EXTENSION meowmx")
        # A WARNING: CREATE EXTENSION holds back a script's NOTICEs.
        assert notices == [f"group roles not created: {', '.join(roles_of(prefix))}"]
        owners = conn.execute(
            "SELECT DISTINCT p.proowner::regrole::text, r.rolsuper FROM pg_proc AS p"
            " JOIN pg_roles AS r ON r.oid = p.proowner"
            " WHERE p.pronamespace = 'meowmx'::regnamespace"
        ).fetchall()
        assert owners == [(owner, False)]
        extension = conn.execute(
            "SELECT extowner::regrole::text, extversion FROM pg_extension WHERE extname = 'meowmx'"
        ).fetchone()
        assert extension == (owner, str(meowmx.latest_version()))
    exercise(dsn, "1")
    assert meowmx.install(dsn) == []


# Several meowmx databases on one cluster ---------------------------------------------------


def test_two_databases_of_two_owners_keep_their_roles_apart(cluster: Cluster) -> None:
    """Owners that may create roles (CREATEROLE, no superuser) each make their own
    roles, grant them to their own login roles, and reach nothing of the other's."""
    databases = []
    for label in ("a", "b"):
        owner, dsn = cluster.owner("CREATEROLE")
        prefix = cluster.prefix()
        assert meowmx.install(dsn, role_prefix=prefix) == ALL_VERSIONS
        assert existing(cluster, roles_of(prefix)) == sorted(roles_of(prefix))
        # The owner grants its roles (PostgreSQL 16+ allows that to their creator).
        app = cluster.name("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app)))
            cluster.roles.append(app)
            for group in roles_of(prefix)[1:3]:  # writer and worker
                conn.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(app))
                )
            check_privilege_matrix(conn, prefix)
        exercise(make_conninfo(dsn, user=app), label)
        run_as_members(cluster, dsn, prefix)
        databases.append((dsn, app))

    (dsn_a, app_a), (dsn_b, app_b) = databases
    for app, other in ((app_a, dsn_b), (app_b, dsn_a)):
        with psycopg.connect(make_conninfo(other, user=app), autocommit=True) as conn:
            denied(conn, "SELECT meowmx.stream_version(category => 'order', stream_id => 'a')")


# The demo ---------------------------------------------------------------------------------


def test_the_demo_runs_as_a_create_only_role(cluster: Cluster, capsys: Capsys) -> None:
    """The prefix set on the database (ALTER DATABASE ... SET), as an administrator may."""
    owner, dsn = cluster.owner()
    prefix = cluster.prefix()
    with cluster.admin() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET meowmx.role_prefix = {}").format(
                sql.Identifier(cluster.databases[-1]), sql.Literal(prefix)
            )
        )
    code = cli.main(["demo", "--dsn", dsn, "--seconds", "2"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "consistency check  PASS" in out
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT value FROM meowmx.settings WHERE name = 'role_prefix'")
        assert stored.fetchone() == (prefix,)


# Bad prefixes -----------------------------------------------------------------------------

BAD_PREFIXES = ["Shop", "1shop", "pg", "pg_shop", "shop-eu", "shop eu", "x" * 57, "shop'"]


@pytest.mark.parametrize("prefix", BAD_PREFIXES)
def test_a_bad_role_prefix_is_refused_and_nothing_is_installed(empty_dsn: str, prefix: str) -> None:
    with raises_meowmx(meowmx.InvalidRolePrefix) as info:
        meowmx.install(empty_dsn, role_prefix=prefix)
    assert info.value.facts == {"role_prefix": prefix}
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('meowmx')").fetchone() == (None,)


def test_an_empty_role_prefix_is_refused(empty_dsn: str, capsys: Capsys) -> None:
    with pytest.raises(meowmx.InvalidRolePrefix):
        meowmx.install(empty_dsn, role_prefix="")
    assert cli.main(["install", "--dsn", empty_dsn, "--role-prefix", ""]) == 2
    assert "invalid role prefix value" in capsys.readouterr().err
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('meowmx')").fetchone() == (None,)


def test_a_database_keeps_its_role_prefix(
    dsn: str, extra_db: Callable[[], str], psql: Psql
) -> None:
    """The test database was installed with the default prefix; another is refused,
    by the upgrade to optional roles too (older databases grant to meowmx_*)."""
    with raises_meowmx(meowmx.RolePrefixConflict) as info:
        meowmx.install(dsn, role_prefix="other")
    assert info.value.facts == {"role_prefix": "other", "installed_role_prefix": "meowmx"}
    assert meowmx.install(dsn, role_prefix="meowmx") == []

    old = extra_db()
    install_version(psql, old, 4)
    with raises_meowmx(meowmx.RolePrefixConflict):
        meowmx.install(old, role_prefix="other")
    with psycopg.connect(old) as conn:
        assert conn.execute("SELECT meowmx.version()").fetchone() == (4,)
    assert meowmx.install(old) == ALL_VERSIONS[4:]
