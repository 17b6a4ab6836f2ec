"""A steady keeper pass on the PostgreSQL store against the SQLite store, in one run.

    python benchmarks/bench_store.py [--desktops 20] [--users 8] [--passes 300] [--rounds 6]
                                     [--real N]

A real Keeper, planner, executor and store keep one pool on FakeHypervisor + FakeBalancer with
a fake clock (5 s between passes), so the figures are the keeper's and the store's own work:
no hypervisor or balancer waits. The pool is filled, `--users` desktops get a user, and once
passes change nothing more (steady), `--passes` passes are timed, in `--rounds` rounds in which
the stores take turns (a shared host's load drifts alike for each). Three stores, same workload:

  - SQLite (the default: WAL, synchronous=NORMAL), in a temporary folder;
  - PostgreSQL, a server this benchmark starts (tests/postgres.py) with PostgreSQL's default
    durability (fsync on, synchronous_commit on), over loopback TCP with a password;
  - PostgreSQL through a fenced handle (every write checks the leader epoch), as a leading
    keeper of a standby pair writes.

It prints, for each, the median and 95th percentile of a pass's wall time, and the CPU time a
pass costs: this process's (the keeper, the store's client) plus, for PostgreSQL, the database
server process serving its connection (/proc/<pid>/schedstat; the server's background writers
are not counted). Then PostgreSQL over SQLite for both. The goal (issue "No single point of
failure"): at most 1.5. On a machine shared with other busy processes the wall time of a pass
that waits for another process (the database server) mostly measures the wait for a free
core; the CPU time does not.

With --real N, the same comparison with the real adapters, as a user runs the keeper: N tiny
desktops on libvirt/QEMU (TCG) behind a managed HAProxy, made by a real `imagepipe keep`
on the SQLite state, which is then stopped (the desktops and HAProxy keep running) and its
state copied with `imagepipe store copy` into a PostgreSQL database. Two keepers are built
in this process by the application's composition root from the two settings files (the
second, fenced under a lease as `keep` on PostgreSQL runs), and their steady passes
(observing the desktops through libvirt, the balancer through HAProxy's admin socket) are
timed in `--rounds` alternating rounds of `--passes` / 10 passes. libvirtd's and HAProxy's
CPU is not counted (the same for both).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root is not on sys.path

from imagepipe.app.leadership import Election  # noqa: E402
from imagepipe.pool.keeper import Keeper  # noqa: E402
from imagepipe.pool.model import CloneMode, PoolSpec  # noqa: E402
from imagepipe.pool.store import Store  # noqa: E402
from imagepipe.stores.postgres import PostgresStore  # noqa: E402
from imagepipe.stores.sqlite import SQLiteStore  # noqa: E402
from tests.fakes.balancer import FakeBalancer  # noqa: E402
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages  # noqa: E402
from tests.postgres import PostgresServer, missing  # noqa: E402

TICK = 5.0
Figures = tuple[list[float], float, float]  # seconds per pass; CPU seconds: client, server
REAL_PORTS = (6440, 6459)  # the --real pool's display ports


def spec(desktops: int) -> PoolSpec:
    return PoolSpec(
        name="lab",
        image="tiny",
        initial=desktops,
        free=desktops,
        max=desktops * 2,
        port_first=5900,
        port_last=5900 + desktops * 2 - 1,
        clone=CloneMode.LINKED,
    )


def settled(store: Store, desktops: int, users: int) -> Callable[[int], Figures]:
    """A keeper on `store` whose pool is full, with `users` on, and whose passes have settled;
    returns what times `n` more passes: each one's seconds, and the CPU seconds they took
    in this process and in the store's server process."""
    clock = FakeClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    keeper = Keeper(
        hypervisor=hv, balancer=lb, store=store, images=images, specs=[spec(desktops)], clock=clock
    )

    def run(n: int) -> None:
        for _ in range(n):
            keeper.run_pass()
            clock.advance(TICK)

    run(10)
    for i in range(users):
        name = f"lab-{i}"
        lb.connect(name)
        hv.connect(name, f"192.0.2.{10 + i}")
        hv.login(name, f"user{i}")
    run(20)
    if keeper.run_pass().actions:
        raise SystemExit("the pool did not settle: passes still act; the figures would lie")
    server = _server_pid(store)

    def timed(passes: int) -> Figures:
        seconds = []
        client, cpu = time.process_time(), _server_cpu(server)
        for _ in range(passes):
            started = time.perf_counter()
            keeper.run_pass()
            seconds.append(time.perf_counter() - started)
            clock.advance(TICK)
        return seconds, time.process_time() - client, _server_cpu(server) - cpu

    return timed


def _server_pid(store: Store) -> int | None:
    """The database server process serving the store's connection (PostgreSQL), if any."""
    if not isinstance(store, PostgresStore):
        return None
    with store._transaction(begin=False) as db:  # the benchmark may look inside
        return int(db.execute("SELECT pg_backend_pid()").fetchone()[0])


def _server_cpu(pid: int | None) -> float:
    """CPU seconds the process has run so far (0 without one)."""
    if pid is None:
        return 0.0
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def report(name: str, seconds: list[float], client: float, server: float) -> tuple[float, float]:
    """Print a store's figures (`client`, `server`: CPU seconds of all its passes); its
    median pass and CPU per pass."""
    median = statistics.median(seconds)
    p95 = statistics.quantiles(seconds, n=20)[18]
    client, server = client / len(seconds), server / len(seconds)
    print(
        f"{name:<28} median {median * 1000:6.2f} ms  p95 {p95 * 1000:6.2f} ms  "
        f"cpu {(client + server) * 1000:5.2f} ms (keeper {client * 1000:.2f}, "
        f"server {server * 1000:.2f})"
    )
    return median, client + server


def interleaved(
    timers: dict[str, Callable[[int], Figures]], rounds: int, passes: int
) -> dict[str, Figures]:
    """Each timer's figures over `rounds` rounds of `passes` passes, the timers taking turns
    within each round (a host's load drifts: each one sees the same drift)."""
    totals: dict[str, Figures] = {name: ([], 0.0, 0.0) for name in timers}
    for _ in range(rounds):
        for name, timed in timers.items():
            seconds, client, server = timed(passes)
            took, c, d = totals[name]
            totals[name] = (took + seconds, c + client, d + server)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--desktops", type=int, default=20)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--passes", type=int, default=300)
    parser.add_argument(
        "--real",
        type=int,
        default=0,
        metavar="N",
        help="also time steady passes over N real desktops (libvirt + HAProxy)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    args = parser.parse_args()
    if not 0 <= args.users <= args.desktops or args.passes < 20:
        parser.error("--users must be 0 to --desktops, --passes at least 20")
    why = missing()
    if why is not None:
        raise SystemExit(why)
    fakes(args)
    if args.real:
        real(args.real, args.passes // 10, args.rounds)


def fakes(args: argparse.Namespace) -> None:
    server = PostgresServer.start(durable=True)
    try:
        with tempfile.TemporaryDirectory() as folder:
            dsn = server.fresh_dsn()
            fenced_dsn = server.fresh_dsn()
            runs: list[tuple[str, Callable[[], Store]]] = [
                ("SQLite", lambda: SQLiteStore(Path(folder) / "state.db")),
                ("PostgreSQL", lambda: PostgresStore(dsn, password=server.password)),
                ("PostgreSQL, fenced writes", lambda: _fenced(fenced_dsn, server.password)),
            ]
            print(
                f"{args.desktops} desktops, {args.users} users, {args.passes} steady passes "
                f"each in {args.rounds} alternating rounds (fake hypervisor and balancer)"
            )
            stores = [(name, make()) for name, make in runs]
            try:
                timers = {name: settled(store, args.desktops, args.users) for name, store in stores}
                totals = interleaved(timers, args.rounds, max(1, args.passes // args.rounds))
            finally:
                for _name, store in stores:
                    store.close()
            figures = {name: report(name, *total) for name, total in totals.items()}
    finally:
        server.stop()
    median, cpu = figures["SQLite"]
    for name in ("PostgreSQL", "PostgreSQL, fenced writes"):
        print(
            f"{name} / SQLite: median {figures[name][0] / median:.2f}, "
            f"cpu {figures[name][1] / cpu:.2f}  (goal <= 1.5)"
        )


def real(desktops: int, passes: int, rounds: int) -> None:
    """Steady passes with the real adapters (see the module docstring)."""
    from _host import Workspace, bench_pool, check_memory, stop_on_signals

    from imagepipe.app.bootstrap import bootstrap
    from imagepipe.app.leadership import election_for
    from imagepipe.config.pools import load_pools
    from imagepipe.config.settings import load_settings
    from tests.host import free_port

    stop_on_signals()
    check_memory(desktops)
    server = PostgresServer.start(durable=True)
    try:
        with Workspace.create("bst") as ws:
            ws.build_tiny()
            pool = bench_pool(
                ws.pool_name("lab"), free=desktops, max=desktops, ports=REAL_PORTS, start="boot"
            )
            lab = ws.installation("lab", pool, free_port(), tick="5s", parallel=4)
            lab.start_keeper()
            lab.wait_ready(desktops, timeout=900)
            lab.stop_keeper()  # its desktops and HAProxy keep running
            password = ws.root / "db-password"
            password.write_text(server.password + "\n")
            dsn = server.fresh_dsn()
            lab.cli("store", "copy", "--to", dsn, "--password-file", str(password))
            shared = lab.config.with_name("shared.yml")
            shared.write_text(
                lab.config.read_text() + f"state: {dsn}\nstate_password_file: {password}\n"
            )
            keepers = {}
            for name, config in (("SQLite", lab.config), ("PostgreSQL, fenced", shared)):
                settings = load_settings(config)
                runtime = bootstrap(settings)
                keeper = runtime.keeper(load_pools([settings.pools_dir], settings.host_specs()))
                keeper.lead = election_for(settings, runtime.store, runtime.clock)
                keepers[name] = (keeper, runtime)
            try:
                timers = {name: _real_timer(keeper) for name, (keeper, _r) in keepers.items()}
                totals = interleaved(timers, rounds, passes)
            finally:
                for _keeper, runtime in keepers.values():
                    runtime.close()
            print(
                f"real adapters: {desktops} desktops (libvirt, TCG) behind HAProxy, no users, "
                f"{rounds} alternating rounds of {passes} steady passes"
            )
            results = {name: report(name, *total) for name, total in totals.items()}
    finally:
        server.stop()
    median, cpu = results["SQLite"]
    fenced = results["PostgreSQL, fenced"]
    print(
        f"real adapters, PostgreSQL / SQLite: median {fenced[0] / median:.2f}, "
        f"cpu {fenced[1] / cpu:.2f}"
    )


def _real_timer(keeper: Keeper) -> Callable[[int], Figures]:
    """What times `n` steady passes of a keeper on the real adapters; its election (if any)
    is stepped before each pass, outside the timing, as its own lease loop would."""
    election = keeper.lead

    def step() -> None:
        if isinstance(election, Election):
            election.step()

    for _ in range(3):  # settle: nothing to do
        step()
        keeper.pass_if_leading()
    server = _server_pid(keeper.store)

    def timed(passes: int) -> Figures:
        seconds, client, cpu = [], 0.0, 0.0
        for _ in range(passes):
            step()
            began_cpu, began_db = time.process_time(), _server_cpu(server)
            started = time.perf_counter()
            report = keeper.pass_if_leading()
            seconds.append(time.perf_counter() - started)
            client += time.process_time() - began_cpu
            cpu += _server_cpu(server) - began_db
            if report is None or report.actions:
                raise SystemExit("a real pass did not lead or still acts: the figures would lie")
        return seconds, client, cpu

    return timed


def _fenced(dsn: str, password: str) -> Store:
    store = PostgresStore(dsn, password=password)
    epoch = store.try_acquire("bench", 3600.0, time.time())
    assert epoch is not None
    return store.fenced(epoch)


if __name__ == "__main__":
    main()
