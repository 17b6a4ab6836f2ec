"""What imagepipe keeps about its users stays theirs: the state database (it holds who used
which desktop when), its folder, the run folder (HAProxy's admin socket) and the registry's
working files are created owner-only whatever the umask; `doctor` warns about looser modes on
files that exist already and says how to fix them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe import doctor
from imagepipe.app.bootstrap import open_store
from imagepipe.config import Settings
from imagepipe.doctor import Status
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.pool.model import CloneRecord, CloneState


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        pools_dir=tmp_path / "pools",
        state_db=tmp_path / "var" / "state" / "state.db",
        registry=tmp_path / "var" / "registry",
        image_store=tmp_path / "var" / "images",
        run_dir=tmp_path / "run" / "imagepipe",
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def _use(settings: Settings, tmp_path: Path) -> None:
    """What the keeper and a build do first: write the state, register a version."""
    store = open_store(settings)
    try:
        record = CloneRecord(name="lab-0", slot=0, version=1, state=CloneState.FREE, since=1.0)
        store.save_clone("lab", record)
    finally:
        store.close()
    disk = tmp_path / "build" / "disk.qcow2"
    disk.parent.mkdir()
    disk.write_text("disk")
    Registry(settings.registry, settings.image_store).register(
        NewVersion(
            image="tiny",
            fingerprint="fp",
            builder="qemu",
            packer_version="1.6.6",
            files=(disk,),
            disk="disk.qcow2",
        )
    )


def test_state_run_folder_and_registry_are_created_owner_only_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    settings = _settings(tmp_path)
    _use(settings, tmp_path)

    db = settings.state_db
    assert _mode(db) == 0o600
    for companion in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        assert not companion.exists() or _mode(companion) == 0o600
    for folder in (db.parent, settings.run_dir, settings.registry):
        assert _mode(folder) == 0o700, folder
    lock = settings.registry.parent / f".{settings.registry.name}.lock"
    assert not lock.exists() or _mode(lock) == 0o600


def test_doctor_is_quiet_about_owner_only_files(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _use(settings, tmp_path)
    check = doctor.check_private_modes(settings)
    assert check.status is Status.OK, check


def test_doctor_warns_about_a_world_readable_state_database_and_says_how_to_fix_it(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    _use(settings, tmp_path)
    os.chmod(settings.state_db, 0o644)
    os.chmod(settings.run_dir, 0o755)

    check = doctor.check_private_modes(settings)

    assert check.status is Status.WARN
    assert f"{settings.state_db} is 0644" in check.detail
    assert f"{settings.run_dir} is 0755" in check.detail
    assert check.fix == f"chmod 600 {settings.state_db}; chmod 700 {settings.run_dir}"
    assert _mode(settings.state_db) == 0o644  # doctor only looks
