"""A private PostgreSQL server for tests, started from Debian's server programs.

CI installs the `postgresql` package and sets BRANCHOUT_REQUIRE_POSTGRES=1 (see .ci/run):
there a missing server fails the test instead of skipping it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from raycluster import free_port


def bindir() -> str | None:
    """The folder of PostgreSQL's server programs: on PATH, or Debian's versioned one."""
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    return os.path.dirname(found[-1]) if found else None


@contextmanager
def postgres_server(password: str | None = None) -> Iterator[str]:
    """Yield the server's URL without a database; user ``branchout``, authenticated by
    ``password`` when given (then the URL carries it), else trusted."""
    programs = bindir()
    if programs is None:
        message = "no PostgreSQL server programs (initdb, postgres) on this machine"
        if os.environ.get("BRANCHOUT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message}, and BRANCHOUT_REQUIRE_POSTGRES=1 (apt-get install postgresql)", pytrace=False)
        pytest.skip(message)
    # outside pytest's tmp tree: that is private to this user, and the server runs as another
    root = Path(tempfile.mkdtemp(prefix="branchout-pg-"))
    data = root / "pg"
    data.mkdir()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    auth = ["-A", "trust"]
    if password:
        pwfile = root / "pw"
        pwfile.write_text(password)
        if as_user:
            shutil.chown(pwfile, "postgres")
        auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run([*as_user, os.path.join(programs, "initdb"), "-D", str(data), *auth, "-U", "branchout"],
                   check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([*as_user, os.path.join(programs, "postgres"), "-D", str(data),
                               "-p", str(port), "-h", "127.0.0.1", "-k", str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"postgresql+psycopg2://branchout{':' + password if password else ''}@127.0.0.1:{port}"
    probe = sa.create_engine(f"{base}/postgres")
    deadline = time.time() + 30
    while True:
        try:
            with probe.connect():
                break
        except sa.exc.OperationalError:
            if time.time() > deadline:
                server.terminate()
                raise
            time.sleep(0.3)
    probe.dispose()
    try:
        yield base
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    admin = sa.create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return f"{server_url}/{name}"
