"""A MySQL-protocol server (Debian's MariaDB) on 127.0.0.1, for tests and for `make mysql-up`.

Each server has its own data directory, made by `mariadb-install-db`, and listens on
loopback only, with its socket inside that directory, so it touches nothing of a system
MariaDB. It has one password-protected user, the way a shared ML Metadata store is
reached from a cluster; that user may create the databases whose names start with `fer_`
(ML Metadata creates its database itself on first connection).

`make test` installs Debian's `mariadb-server` when it is missing (as root, with apt-get:
tools/install_system_deps.sh).
Without `mariadbd` the tests that use the fixture skip with one line saying what to install.

Use: the session fixture `mariadb` (import it into the test module, as
tests/test_metadata_mysql.py does) yields a `MariaDB`; `mariadb.unique_database(name)` names
a fresh database, `mariadb.metadata_overrides(database)` is the `metadata` section of a
pipeline config for it, and `mariadb.env` holds the password variable to set.

    python -m tests.mariadb up DIR [--port P]     # what `make mysql-up` runs
    python -m tests.mariadb down DIR               # what `make mysql-down` runs
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

from fer_pipeline.core.net import free_port
from tests.processes import stop_process, wait_until_ready

SERVER_NAMES = ("mariadbd", "mysqld")
INSTALL_DB_NAMES = ("mariadb-install-db", "mysql_install_db")
# Debian puts the server in /usr/sbin, which a non-root PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
USER = "fer"
DATABASE_PREFIX = "fer_"
PASSWORD_ENV = "FER_METADATA_MYSQL_PASSWORD"   # MetadataConfig.mysql_password_env's default
START_TIMEOUT_S = 60
# Small InnoDB files and buffers: a test store holds a few hundred rows, and the default
# 96 MiB redo log and 128 MiB buffer pool would be most of the data directory and memory.
SERVER_OPTIONS = ["--innodb-log-file-size=4M", "--innodb-buffer-pool-size=32M",
                  "--skip-name-resolve", "--performance-schema=OFF"]
_databases = itertools.count()


@dataclass
class MariaDB:
    host: str
    port: int
    user: str
    password: str
    datadir: Path
    process: Optional[subprocess.Popen] = None
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def env(self) -> dict[str, str]:
        return {PASSWORD_ENV: self.password}

    def unique_database(self, name: str) -> str:
        return f"{DATABASE_PREFIX}{name}_{self.session}_{next(_databases)}"

    def metadata_overrides(self, database: str) -> dict:
        """The pipeline config's `metadata` section for `database` on this server."""
        return {"mysql_host": self.host, "mysql_port": self.port,
                "mysql_database": database, "mysql_user": self.user}

    def sql(self, statement: str) -> str:
        """Runs one statement as root over the server's socket; returns tab-separated rows."""
        return subprocess.run(
            [_find(("mariadb", "mysql")), "--no-defaults", "--batch", "--skip-column-names",
             "-uroot", f"--socket={self.datadir / 'sock'}", "-e", statement],
            capture_output=True, text=True, check=True, timeout=30).stdout


def _find(names: tuple[str, ...]) -> str:
    for name in names:
        found = shutil.which(name, path=SEARCH_PATH)
        if found:
            return found
    raise FileNotFoundError(f"none of {', '.join(names)} is installed")


def installed() -> bool:
    return all(shutil.which(n, path=SEARCH_PATH) for n in (SERVER_NAMES[0],
                                                             INSTALL_DB_NAMES[0], "mariadb"))


def _init_sql(password: str) -> str:
    # Read by the server at every start (--init-file): the user exists before the first
    # client connects, with no client-side race and no root password to manage.
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    return (f"CREATE USER IF NOT EXISTS '{USER}'@'127.0.0.1' IDENTIFIED BY '{quoted}';\n"
            f"ALTER USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{quoted}';\n"
            f"GRANT ALL PRIVILEGES ON `{DATABASE_PREFIX.replace('_', chr(92) + '_')}%`.* "
            f"TO '{USER}'@'127.0.0.1';\n")


def _ready(port: int, log_path: Path) -> bool:
    if "ready for connections" not in log_path.read_text(errors="replace"):
        return False
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_until_ready(port: int, process: subprocess.Popen, log_path: Path) -> None:
    wait_until_ready(f"mariadbd on port {port}", process, log_path,
                     lambda: _ready(port, log_path), START_TIMEOUT_S, poll_s=0.1)


def start_server(base: Path, password: str, port: int = 0, detach: bool = False) -> MariaDB:
    """A fresh (or the existing) data directory under `base` and a server on 127.0.0.1.

    `detach` starts it in its own session so it outlives the caller (`make mysql-up`).
    """
    base = base.resolve()
    datadir = base / "data"
    if not datadir.exists():
        base.mkdir(parents=True, exist_ok=True)
        with open(base / "install.log", "wb") as log:
            subprocess.run([_find(INSTALL_DB_NAMES), "--no-defaults", f"--datadir={datadir}",
                            "--auth-root-authentication-method=normal", "--skip-test-db",
                            *SERVER_OPTIONS[:1]],
                           stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120)
    init = base / "init.sql"
    init.write_text(_init_sql(password))
    init.chmod(0o600)
    log_path = base / "server.log"
    for attempt in range(3):  # a probed free port can be taken before the server binds it
        chosen = port or free_port()
        log_path.write_bytes(b"")
        process = subprocess.Popen(
            [_find(SERVER_NAMES), "--no-defaults", f"--datadir={datadir}",
             f"--socket={datadir / 'sock'}", f"--pid-file={base / 'mariadbd.pid'}",
             f"--port={chosen}", "--bind-address=127.0.0.1", "--user=root",
             f"--init-file={init}", f"--log-error={log_path}", *SERVER_OPTIONS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=detach)
        try:
            _wait_until_ready(chosen, process, log_path)
        except RuntimeError:
            stop_server(process)
            if port or attempt == 2:
                raise
            continue
        (base / "port").write_text(str(chosen))
        return MariaDB("127.0.0.1", chosen, USER, password, datadir, process)
    raise AssertionError("unreachable")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM is mariadbd's clean shutdown (InnoDB flushes, the socket goes away)."""
    stop_process(process, grace_s=30)


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory) -> Iterator[MariaDB]:
    """A running MariaDB on 127.0.0.1 with a password user, for the whole test session."""
    if not installed():
        pytest.skip("no MariaDB server: install Debian's mariadb-server "
                    "(apt-get install mariadb-server) to run the MySQL metadata tests")
    server = start_server(tmp_path_factory.mktemp("mariadb"), password=uuid.uuid4().hex)
    try:
        yield server
    finally:
        stop_server(server.process)
        shutil.rmtree(server.datadir, ignore_errors=True)   # ~20 MB, not worth keeping


# ----------------------------------------------------------------------------- make targets

def _up(base: Path, port: int) -> int:
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        print(f"mysql-up: set {PASSWORD_ENV} to the password the user `{USER}` should have",
              file=sys.stderr)
        return 2
    if not installed():
        print("mysql-up: no MariaDB server: apt-get install mariadb-server", file=sys.stderr)
        return 2
    pid_file = base / "mariadbd.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"mysql-up: already running on 127.0.0.1:{(base / 'port').read_text()} "
              f"({base})")
        return 0
    server = start_server(base, password, port, detach=True)
    print(f"mysql-up: MariaDB on 127.0.0.1:{server.port}, data in {server.datadir}\n"
          f"  in --config:  metadata: {{mysql_host: 127.0.0.1, mysql_port: {server.port}, "
          f"mysql_database: fer_metadata, mysql_user: {USER}}}\n"
          f"  password:     ${PASSWORD_ENV} (as set now)\n"
          f"  stop it with: make mysql-down")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _down(base: Path) -> int:
    pid_file = base / "mariadbd.pid"
    if not pid_file.exists():
        print(f"mysql-down: no server running from {base}")
        return 0
    pid = int(pid_file.read_text())
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    print(f"mysql-down: stopped (data kept in {base / 'data'}; delete it to start afresh)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mariadb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", type=Path, help="where the data directory and logs live")
    parser.add_argument("--port", type=int, default=3306)
    args = parser.parse_args(argv)
    return _up(args.dir, args.port) if args.action == "up" else _down(args.dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
