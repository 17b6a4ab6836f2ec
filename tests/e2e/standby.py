"""Two `imagepipe keep` processes on one installation whose state is in PostgreSQL (the
standby keeper), for tests/e2e/test_standby_keeper_e2e.py and benchmarks/bench_failover.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import Any

from tests.e2e.harness import Installation, free_ready
from tests.postgres import PostgresServer


class Keeper:
    """One more `imagepipe keep` on the installation's settings (the standby's machine)."""

    def __init__(self, host: Installation, name: str) -> None:
        self.host = host
        self.log = host.root / f"keeper-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.host.command("--log-level", "debug", "keep"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None


class Pair:
    """The installation with two keepers on a PostgreSQL state."""

    def __init__(self, host: Installation, server: PostgresServer, dsn: str) -> None:
        self.host = host
        self.server = server
        self.dsn = dsn
        self.keepers = {"a": Keeper(host, "a"), "b": Keeper(host, "b")}

    def leader(self) -> dict[str, Any] | None:
        leader: dict[str, Any] | None = self.host.status_doc().get("leader")
        return leader if leader is not None and leader["lease_left"] > 0 else None

    def leading(self) -> Keeper | None:
        leader = self.leader()
        if leader is None:
            return None
        pid = int(str(leader["holder"]).rsplit("/", 1)[1])
        return next((k for k in self.keepers.values() if k.process and k.pid == pid), None)

    def wait_leader(self, not_pid: int | None = None, timeout: float = 60.0) -> Keeper:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            keeper = self.leading()
            if keeper is not None and keeper.pid != not_pid:
                return keeper
            time.sleep(0.3)
        raise AssertionError(f"no keeper took the lease; status leader {self.leader()}")

    def at_free_target(self) -> bool:
        """The pool has its free target of free desktops ready in the balancer."""
        pool = self.host.status()
        return len(free_ready(pool)) >= self.host.pool.free

    def standby(self, leader: Keeper) -> Keeper:
        return next(k for k in self.keepers.values() if k is not leader)

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, password=self.server.password) as conn:
            return conn.execute(sql, args).fetchall()

    def creates(self) -> list[str]:
        """Every desktop a CreateClone was begun for, in order (the shared journal)."""
        rows = self.query("SELECT clone FROM journal WHERE kind = 'CreateClone' ORDER BY id")
        return [str(r[0]) for r in rows]

    def records(self) -> list[tuple[str, int]]:
        rows = self.query("SELECT name, slot FROM clones WHERE pool = %s", self.host.pool.name)
        return [(str(n), int(s)) for n, s in rows]

    def journal_count(self) -> int:
        return int(self.query("SELECT count(*) FROM journal")[0][0])

    def resets(self, desktop: str) -> int:
        """Resets of the desktop that completed (the shared journal)."""
        rows = self.query(
            "SELECT count(*) FROM journal WHERE kind = 'ResetClone' AND clone = %s AND ok = 1",
            desktop,
        )
        return int(rows[0][0])


def state_settings(host: Installation, server: PostgresServer, lease: str) -> str:
    """Point the installation's settings at a fresh place on `server` (the password in a
    file) with these keeper lease settings ("lease: 6s, ..."); returns the DSN."""
    dsn = server.fresh_dsn()
    secret = host.root / "pgpass"
    secret.write_text(server.password + "\n")
    secret.chmod(0o600)
    text = host.config.read_text()
    text = re.sub(r"keeper: \{(.*)\}", lambda m: f"keeper: {{{m.group(1)}, {lease}}}", text)
    host.config.write_text(text + f"state: '{dsn}'\nstate_password_file: {secret}\n")
    return dsn
