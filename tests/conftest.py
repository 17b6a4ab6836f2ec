"""Shared test helpers.

`require(condition, reason)`: a test that needs a real component (Packer, libvirt/QEMU,
HAProxy) skips with the reason locally, but fails in CI, where IMAGEPIPE_REQUIRE_REAL=1 and
every component is installed by the project's own scripts.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import settings as hypothesis_settings

from tests.postgres import PostgresServer
from tests.postgres import missing as postgres_missing

# Property tests draw the same examples on every run (a suite that passes on one machine passes
# on the next); IMAGEPIPE_HYPOTHESIS=explore draws new ones each run, to hunt for what the
# fixed ones miss. A test's own @settings (max_examples...) still apply.
hypothesis_settings.register_profile("fixed", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("IMAGEPIPE_HYPOTHESIS", "fixed"))

REQUIRE_REAL = os.environ.get("IMAGEPIPE_REQUIRE_REAL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (CI) when a real component is missing."""
    if condition:
        return
    if REQUIRE_REAL:
        pytest.fail(f"real component missing in CI: {reason}")
    pytest.skip(reason)


def require_program(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (run ./install.sh)")
    assert path is not None
    return path


def require_libvirt_python() -> None:
    """libvirt-python is a real component: missing, it skips locally and fails in CI (never
    `pytest.importorskip`, which skips under IMAGEPIPE_REQUIRE_REAL=1 too)."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require(False, "libvirt-python is not installed (pip install -e .[libvirt])")


def libvirt_available(uri: str = "qemu:///system") -> bool:
    if shutil.which("virsh") is None:
        return False
    probe = subprocess.run(
        ["virsh", "-c", uri, "version"], capture_output=True, text=True, timeout=20, check=False
    )
    return probe.returncode == 0


def opted_in(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Suites marked `opt_in(ENV)` (a real VirtualBox host, the long fault profile) run only
    when ENV is set; otherwise they are deselected, not skipped: they are not components a
    CI host lacks, they are runs an administrator asks for."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("opt_in")
        (keep if marker is None or opted_in(marker.args[0]) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def require_libvirt() -> str:
    uri = os.environ.get("IMAGEPIPE_TEST_LIBVIRT_URI", "qemu:///system")
    require(libvirt_available(uri), f"libvirtd does not answer on {uri} (run ./install.sh)")
    require_libvirt_python()
    return uri


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`imagepipe.cli.app.main()` points the root logger at the current stderr; under pytest
    that is a capture that closes after the test. Put the root logger back afterwards so a
    later test never logs into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (tests/postgres.py)."""
    why = postgres_missing()
    require(why is None, why or "")
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty place for a store on the session's server; its DSN (no password in
    it: the password is postgres_server.password)."""
    return postgres_server.fresh_dsn()


# The IPVS director test machine boots once per session, for tests/integration and
# tests/multihost alike (imported last: tests/integration/balancers.py uses `require` above).
from tests.integration.balancers import director, ipvs_harness  # noqa: E402

__all__ = ["director", "ipvs_harness"]
