"""The `imagepipe` command imports only what the invoked command needs (the start-up figures
are benchmarks/bench_startup.py's), and its command table says what the commands say."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagepipe.cli.app import COMMANDS
from tests.conftest import require

COMMAND_MODULES = {row.module for row in COMMANDS.values()}


def imported_by(argv: list[str], tmp_path: Path) -> set[str]:
    """The modules a fresh `imagepipe ARGV` process has imported when it ends."""
    return run_counting_imports(argv, tmp_path)[1]


def run_counting_imports(argv: list[str], cwd: Path) -> tuple[str, set[str]]:
    """A fresh `imagepipe ARGV` process in `cwd`: what it printed, and the modules it had
    imported when it ended (it must succeed)."""
    probe = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
        "from imagepipe.cli.app import run\n"
        f"sys.argv = ['imagepipe', *{argv!r}]\n"
        "run()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_help_lists_every_command_and_imports_none_of_them(tmp_path: Path) -> None:
    modules = imported_by(["--help"], tmp_path)
    assert modules & COMMAND_MODULES == set()
    heavy = {"imagepipe.config", "imagepipe.pool.model", "imagepipe.images.registry", "git"}
    assert modules & heavy == set()
    done = subprocess.run(
        [sys.executable, "-m", "imagepipe", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    listed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("│ ")]
    assert [name for name in listed if name in COMMANDS] == list(COMMANDS)


def test_status_imports_its_own_command_and_no_other(tmp_path: Path) -> None:
    (tmp_path / "pools").mkdir()
    config = tmp_path / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {tmp_path / 'pools'}\nregistry: {tmp_path / 'registry'}\n"
        f"image_store: {tmp_path / 'images'}\nstate_db: {tmp_path / 'state.db'}\n"
        f"run_dir: {tmp_path / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'test:///default'}\nbalancer: {driver: none}\n"
    )
    require(importlib.util.find_spec("libvirt") is not None, "libvirt-python is not installed")
    modules = imported_by(["--config", str(config), "status", "--json"], tmp_path)
    assert modules & COMMAND_MODULES == {"imagepipe.cli.status"}
    others = {"imagepipe.images.build", "imagepipe.app.rollout", "imagepipe.sim.engine", "jinja2"}
    assert modules & others == set()
    assert "imagepipe.hypervisors.libvirt" in modules  # the one adapter it uses
    assert not any(m.startswith("imagepipe.hypervisors.virtualbox") for m in modules)


# What a single-host SQLite `status --json` has no use for: the PostgreSQL store and its
# driver, leadership, the several-host adapters, the rollout driver, the keeper loop, the
# balancers it does not have, the web entrance, the simulator's charts, the image builder.
NOT_FOR_STATUS = {
    "psycopg",
    "imagepipe.stores.postgres",
    "imagepipe.app.leadership",
    "imagepipe.app.hosts",
    "imagepipe.hypervisors.libvirt.multihost",
    "imagepipe.hypervisors.libvirt.remote",
    "imagepipe.hypervisors.libvirt.volumes",
    "imagepipe.pool.hosts",
    "imagepipe.pool.rollout.driver",
    "imagepipe.pool.keeper",
    "imagepipe.pool.executor",
    "imagepipe.balancers.haproxy",
    "imagepipe.balancers.ipvs",
    "imagepipe.app.web",
    "imagepipe.web",
    "matplotlib",
    "imagepipe.images.packer",
    "rich",  # --json draws nothing
}


def test_status_json_on_one_host_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(
        "name: lab\nimage: tiny\nsize: {initial: 1, free: 1, max: 2}\n"
        "display: {port_range: 5900-5901}\n"
    )
    config = tmp_path / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {tmp_path / 'pools'}\nregistry: {tmp_path / 'registry'}\n"
        f"image_store: {tmp_path / 'images'}\nstate_db: {tmp_path / 'state.db'}\n"
        f"run_dir: {tmp_path / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'test:///default'}\nbalancer: {driver: none}\n"
    )
    require(importlib.util.find_spec("libvirt") is not None, "libvirt-python is not installed")
    modules = imported_by(["--config", str(config), "status", "--json"], tmp_path)
    assert "imagepipe.pool.model" in modules  # it did read the pool and observe the host
    loaded = {m for m in modules if m in NOT_FOR_STATUS or m.split(".")[0] in NOT_FOR_STATUS}
    assert loaded == set()


def test_reading_settings_for_a_build_loads_neither_the_pool_model_nor_pool_files(
    tmp_path: Path,
) -> None:
    """`imagepipe build` (an up-to-date one is mostly start-up) reads imagepipe.yml only."""
    config = tmp_path / "imagepipe.yml"
    config.write_text(f"registry: {tmp_path / 'registry'}\nimage_store: {tmp_path / 'images'}\n")
    probe = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import imagepipe.cli.build\n"
        "from imagepipe.config import load_settings\n"
        f"assert load_settings(Path({str(config)!r})).source == {str(config)!r}\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert "imagepipe.config.settings" in modules
    assert modules & {"imagepipe.pool.model", "imagepipe.config.pools"} == set()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_commands_summary_is_how_its_own_help_begins(name: str) -> None:
    command = COMMANDS[name].load(name)
    assert command.name == name
    own_help = " ".join((command.help or "").split())
    assert own_help.startswith(COMMANDS[name].summary), own_help


def test_completion_is_installed_from_the_root_and_no_command_offers_it_again() -> None:
    """`imagepipe --install-completion` installs it for every command; a command's own help
    lists only its own options (and its parsing builds no validators for the root's)."""

    def options(*argv: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "imagepipe", *argv, "--help"],
            capture_output=True,
            text=True,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
            check=True,
        )
        return [w for line in done.stdout.splitlines() for w in line.split() if w[:2] == "--"]

    assert {"--install-completion", "--show-completion"} <= set(options())
    for name in ("status", "build"):
        mine = options(name)
        assert "--json" in mine
        assert {"--install-completion", "--show-completion"} & set(mine) == set()
