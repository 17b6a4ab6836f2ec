"""A real PostgreSQL server for tests: Debian's package, started in a temporary folder.

`PostgresServer.start()` runs initdb and pg_ctl as the `postgres` user (PostgreSQL refuses to
run as root) on a free loopback port, password authentication only (scram-sha-256, no trust),
its socket in its own folder; `stop()` removes it all. tests/conftest.py has the fixtures:
`postgres_server` (one per session) and `postgres_dsn` (a fresh database per test). Under
IMAGEPIPE_REQUIRE_REAL=1 a missing PostgreSQL fails the test instead of skipping it.

The server can be paused and resumed (`halt()` / `resume()`: pg_ctl stop and start on the
same port and data) for tests of a database outage.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "imagepipe_test"
_SERVICE_USER = "postgres"


def postgres_bin() -> Path | None:
    """Debian's versioned folder of server programs (initdb, pg_ctl are not on PATH), the
    newest version installed; None when PostgreSQL's server package is missing."""
    root = Path("/usr/lib/postgresql")
    found = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists() and (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL's server (initdb, pg_ctl) is not installed (run ./install.sh)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .[postgresql])"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            return "there is no postgres user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    folder: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    durable: bool = False
    _databases: int = field(default=0, repr=False)

    @classmethod
    def start(cls, *, durable: bool = False) -> PostgresServer:
        """A new server. Tests run it with fsync off (nothing there needs to survive a power
        cut, and the suite stays fast); `durable` keeps PostgreSQL's defaults, as a
        deployment has them (benchmarks/bench_store.py measures with those)."""
        folder = Path(tempfile.mkdtemp(prefix="imagepipe-pg-"))
        server = cls(
            folder=folder, port=_free_port(), password=secrets.token_urlsafe(18), durable=durable
        )
        try:
            server._own(folder)
            pwfile = folder / "pwfile"
            pwfile.write_text(server.password + "\n")
            server._own(pwfile)
            server._run(
                "initdb",
                "-D",
                str(server.data),
                "-U",
                server.user,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            )
            pwfile.unlink()
            server.resume()
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def dsn(self, database: str = "postgres", user: str | None = None) -> str:
        """The connection string, without the password (that goes separately)."""
        return f"postgresql://{user or self.user}@{self.host}:{self.port}/{database}"

    def fresh_dsn(self) -> str:
        """The DSN of a new, empty place for a store: a schema of its own, chosen by the DSN's
        search_path (a schema takes milliseconds to make, a database about a second)."""
        import psycopg

        self._databases += 1
        name = f"t{self._databases}_{secrets.token_hex(3)}"
        with psycopg.connect(self.dsn(), password=self.password, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.dsn()}?options=-csearch_path%3D{name}"

    def halt(self) -> None:
        """Stop the server (a database outage); resume() starts it again, same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        options = f"-c listen_addresses={self.host} -p {self.port} -k {self.folder}"
        if not self.durable:
            options += " -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.halt()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _own(self, path: Path) -> None:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_SERVICE_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None
        argv = [str(bin_dir / program), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses root
            argv = ["runuser", "-u", _SERVICE_USER, "--", *argv]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False, cwd=self.folder
        )
        if result.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{program} exited with {result.returncode}: {result.stderr.strip()}\n{tail}"
            )
