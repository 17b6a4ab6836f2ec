"""The state database's disk fills up, or is read-only, under the keeper (issue 14): a clear
error, no user's session touched, and the pool comes back once there is room again.

The database lives on a small tmpfs of its own (root, as in CI), filled up with a file; the
keeper, hypervisor and balancer are the campaign's (tests/faults/campaign.py), so every
invariant is checked on every pass."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters, bootstrap
from imagepipe.errors import ImagepipeError
from tests.conftest import require
from tests.fakes.balancer import FakeBalancer
from tests.faults.campaign import Day, Profile

pytestmark = pytest.mark.real


@pytest.fixture
def small_disk() -> Iterator[Path]:
    require(os.geteuid() == 0, "mounting a small tmpfs for the state database needs root")
    mountpoint = Path(tempfile.mkdtemp(prefix="ipf-db-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "ipf-db", str(mountpoint)],
        check=False,
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        mountpoint.rmdir()
        require(False, f"cannot mount a small tmpfs: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def fill(disk: Path) -> Path:
    """Use up every free byte of the filesystem."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        chunk = b"\0" * 65536
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_state_disk_stops_changes_with_a_clear_error_and_no_session_is_touched(
    small_disk: Path,
) -> None:
    day = Day(seed=3, profile=Profile(), workdir=small_disk)
    try:
        day.start()
        alice = day.arrive("alice")
        bob = day.arrive("bob")
        assert alice is not None and bob is not None
        day.run_pass()
        filler = fill(small_disk)

        day.logout("bob")  # the keeper would reset bob's desktop, and make new ones
        day.clock.advance(day.spec.recycle_after + 1)
        errors = []
        for _ in range(3):
            try:
                day.keeper.run_pass()
            except ImagepipeError as exc:
                errors.append(str(exc))
            day.clock.advance(5)
        assert errors, "the keeper wrote to a full disk without noticing"
        assert all("state database" in e and "full" in e for e in errors), errors
        assert "alice" in day.hv.clones[alice].session.users

        filler.unlink()  # room again: the pool comes back
        for _ in range(6):
            day.run_pass()
        assert day.free_ready() >= day.want()
        assert "alice" in day.hv.clones[alice].session.users
        assert [str(v) for v in day.stats.violations] == []
    finally:
        day.close()


def test_a_keeper_started_on_a_read_only_state_disk_says_so_in_one_line(
    small_disk: Path,
) -> None:
    day = Day(seed=3, profile=Profile(), workdir=small_disk)
    day.start()
    day.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True)

    fakes = Adapters(hypervisor=day.hv, balancer=FakeBalancer(day.lb_state), images=day.images)
    with pytest.raises(ImagepipeError) as refused:
        runtime = bootstrap(day.settings, fakes)
        runtime.keeper([day.spec]).run_pass()
    message = str(refused.value)
    assert "\n" not in message and str(day.settings.state_db.parent) in message, message
