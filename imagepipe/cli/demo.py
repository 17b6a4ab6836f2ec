"""`imagepipe demo`: from nothing to a pool of desktops behind one address, on this host.

Builds (or reuses) the `tiny` image, writes a demo settings file and a demo pool under the
demo directory, and runs the keeper with HAProxy on 127.0.0.1:5999 and the web entrance on
http://127.0.0.1:6080/ (in the background, like HAProxy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from imagepipe.app.keeping import fail_if_failed, stop_on_signals
from imagepipe.app.pidlock import holding, stop_holder
from imagepipe.app.pool_down import drive_down, mark_down
from imagepipe.app.web import start_web_background, stop_web_background, web_url
from imagepipe.cli.context import CliContext, cli_context
from imagepipe.config import Settings, load_pool_file, load_settings
from imagepipe.errors import BadInputError, EnvironmentMissingError, OperationFailedError
from imagepipe.images.build import build_image
from imagepipe.images.progress import PlainProgress
from imagepipe.pool.keeper import Keeper
from imagepipe.pool.model import BackendState, PoolSpec

DEFAULT_DIR = Path("/var/lib/imagepipe/demo")
POOL = "demo"
BIND = "127.0.0.1:5999"
WEB_BIND = "127.0.0.1:6080"
READY_TIMEOUT = 600.0  # seconds --no-keep waits for the pool to be ready
KEEPER_PID = "demo-keeper.pid"  # in the demo's run folder, locked while `imagepipe demo` runs
STOP_TIMEOUT = 120.0  # seconds `--down` gives the demo's keeper to finish its pass and stop
POLL = 1.0

POOL_FILE = f"""\
# The demo pool: 3 ready desktops of the tiny image, at most 5, recycled 1m after logoff.
name: {POOL}
image: tiny
channel: latest
size:
  initial: 3
  free: 3
  max: 5
machine:
  cpus: 1
  memory: 256M
display:
  port_range: 5900-5904
  address: 127.0.0.1
sessions:
  on_logoff: reset
  recycle_after: 1m
"""


@dataclass(frozen=True)
class DemoFiles:
    directory: Path
    settings: Path
    pool: Path


def demo(
    ctx: typer.Context,
    directory: Path = typer.Option(
        DEFAULT_DIR, "--dir", help="Where the demo keeps its settings, state, images and pool."
    ),
    no_keep: bool = typer.Option(
        False, "--no-keep", help="Exit once the pool is ready instead of keeping it."
    ),
    down: bool = typer.Option(
        False, "--down", help="Remove the demo: its desktops (in use or not), and its HAProxy."
    ),
) -> None:
    """Build the tiny image, start a demo pool of 3 desktops behind 127.0.0.1:5999, and keep
    it until Ctrl-C (the desktops keep running afterwards). `--down` removes it all again."""
    console = Console(stderr=True, soft_wrap=True)
    cli = cli_context(ctx)
    if down:
        take_demo_down(cli, directory.absolute(), console)
        return
    base = cli.settings()
    files = write_demo_files(directory.absolute(), base)
    settings = load_settings(files.settings)
    spec = load_pool_file(files.pool)
    console.print(f"demo settings: {files.settings}")
    with holding(settings.run_dir / KEEPER_PID, _already_kept(files.directory)):
        _run_demo(cli, settings, spec, files, console, no_keep=no_keep)


def _already_kept(directory: Path) -> Callable[[int | None], str]:
    def message(pid: int | None) -> str:
        return (
            f"the demo in {directory} is kept already (pid {pid}); "
            "`imagepipe demo --down` stops it and removes the demo"
        )

    return message


def _run_demo(
    cli: CliContext,
    settings: Settings,
    spec: PoolSpec,
    files: DemoFiles,
    console: Console,
    *,
    no_keep: bool,
) -> None:
    with cli.runtime(settings) as runtime:
        result = build_image(runtime, "tiny", progress=PlainProgress())
        console.print(result.message)
        if runtime.store.clear_down(POOL):
            console.print("the demo pool had been taken down; keeping it again")
        keeper = runtime.keeper([spec])
        url = _start_web(settings, files)
        if no_keep:
            wait_until_ready(keeper, spec, console)
            _print_howto(console, files, keeping=False, url=url)
            return
        _print_howto(console, files, keeping=True, url=url)
        with stop_on_signals(keeper):
            keeper.run()
        console.print(
            "Stopped. The desktops, HAProxy and the web entrance keep running; `imagepipe "
            "demo` keeps them again, `imagepipe demo --down` removes them."
        )


def take_demo_down(cli: CliContext, directory: Path, console: Console) -> None:
    """Every desktop of the demo pool deleted (sessions or not), its balancer entries
    removed, the demo's HAProxy stopped. The files under `directory` stay (images, state)."""
    files = DemoFiles(directory, directory / "imagepipe.yml", directory / "pools" / f"{POOL}.yml")
    if not files.settings.is_file() or not files.pool.is_file():
        raise BadInputError(f"no demo in {directory} (no {files.settings}); nothing to take down")
    settings = load_settings(files.settings)
    spec = load_pool_file(files.pool)
    # First the demo's keeper: it would bring HAProxy and desktops back after us.
    pid = stop_holder(settings.run_dir / KEEPER_PID, "the demo's keeper", timeout=STOP_TIMEOUT)
    if pid is not None:
        console.print(f"the demo's keeper (pid {pid}) is stopped")
    with cli.runtime(settings) as runtime:
        mark_down(runtime, POOL, now=True, at=time.time())
        keeper = runtime.keeper([spec])
        passes = drive_down(keeper, POOL, timeout=READY_TIMEOUT)
        console.print(f"the demo's desktops and balancer entries are removed ({passes} passes)")
        if runtime.stop_managed_balancer():
            console.print(f"the demo's HAProxy on {BIND} is stopped")
        if settings.web is not None and stop_web_background(settings):
            console.print(f"the demo's web entrance on {web_url(settings)} is stopped")
    console.print(
        f"The demo is down. Its image, registry and state stay in {directory} "
        f"(`rm -rf {directory}` removes them); `imagepipe demo` starts it again."
    )


def write_demo_files(directory: Path, base: Settings) -> DemoFiles:
    """The demo's settings file and pool file; existing ones are kept as they are."""
    pools = directory / "pools"
    try:
        pools.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentMissingError(
            f"cannot create {pools}: {exc.strerror}; run as root or pass --dir"
        ) from exc
    settings_file = directory / "imagepipe.yml"
    pool_file = pools / f"{POOL}.yml"
    if not settings_file.exists():
        settings_file.write_text(
            "# imagepipe demo settings (written by `imagepipe demo`)\n"
            "pools_dir: pools\n"
            f"packer_dir: {base.packer_dir.absolute()}\n"
            "state_db: state.db\n"
            "registry: registry\n"
            "image_store: images\n"
            "run_dir: run\n"
            "hypervisor:\n"
            f"  driver: {base.hypervisor.driver}\n"
            f"  uri: {base.hypervisor.uri}\n"
            "balancer:\n"
            "  driver: haproxy\n"
            f"  bind: {BIND}\n"
            "keeper:\n"
            "  tick: 2s\n"
            "web:\n"
            f"  bind: {WEB_BIND}\n"
        )
    if not pool_file.exists():
        pool_file.write_text(POOL_FILE)
    return DemoFiles(directory=directory, settings=settings_file, pool=pool_file)


def pool_ready(keeper: Keeper, spec: PoolSpec) -> int:
    """How many of the pool's desktops are booted, free and ready in the balancer."""
    report = keeper.run_pass()
    fail_if_failed(report)
    observed = report.observation.pools.get(spec.name)
    if observed is None:
        return 0
    return sum(
        1
        for c in observed.clones
        if c.info.ready
        and not c.session.active
        and c.backend is not None
        and c.backend.state is BackendState.READY
    )


def wait_until_ready(keeper: Keeper, spec: PoolSpec, console: Console) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    shown = -1
    while True:
        ready = pool_ready(keeper, spec)
        if ready != shown:
            console.print(f"{ready}/{spec.free} desktops ready")
            shown = ready
        if ready >= spec.free:
            return
        if time.monotonic() > deadline:
            raise OperationFailedError(
                f"the demo pool had {ready} of {spec.free} desktops ready after "
                f"{READY_TIMEOUT:.0f}s; see `imagepipe status` and the keeper log above"
            )
        time.sleep(POLL)


def _start_web(settings: Settings, files: DemoFiles) -> str | None:
    """The web entrance in the background (a demo settings file without web: has none)."""
    if settings.web is None:
        return None
    start_web_background(settings, files.settings)
    return web_url(settings)


def _print_howto(
    console: Console, files: DemoFiles, *, keeping: bool, url: str | None = None
) -> None:
    browser = f"\nor open {url} in a web browser" if url else ""
    console.print(
        f"\nThe demo pool is up. Connect any VNC viewer to {BIND} (e.g. `vncviewer {BIND}`)"
        f"{browser};\neach connection gets its own desktop.\n"
        f"Watch it:  imagepipe --config {files.settings} status --watch"
    )
    if keeping:
        console.print("Keeping the pool; Ctrl-C stops the keeper (the desktops keep running).")
