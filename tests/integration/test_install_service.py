"""`./install.sh --service`: user, folders, unit and sample settings, installed twice into a
throwaway root (never this host's /etc), and the unit checked by `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imagepipe.config import load_settings
from tests.conftest import require_program

REPO = Path(__file__).resolve().parents[2]
UNIT = "etc/systemd/system/imagepipe-keep.service"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with this host's user database and a libvirt group, as on a libvirt host."""
    require_program("useradd")
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        source = Path("/etc") / name
        if source.exists():
            shutil.copy(source, tmp_path / "etc" / name)
    group = tmp_path / "etc" / "group"
    if "\nlibvirt:" not in "\n" + group.read_text():
        group.write_text(group.read_text() + "libvirt:x:64990:\n")
    return tmp_path


def install(root: Path, executable: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "install.sh"), "--service", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "IMAGEPIPE_BIN": str(executable)},
    )


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".pwd.lock"
    }


@pytest.mark.real
def test_install_service_makes_user_folders_unit_and_settings_and_a_second_run_changes_nothing(
    root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    executable = tmp_path_factory.mktemp("bin") / "imagepipe"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)

    first = install(root, executable)
    assert first.returncode == 0, first.stderr
    before = snapshot(root)
    second = install(root, executable)
    assert second.returncode == 0, second.stderr

    assert snapshot(root) == before
    passwd = (root / "etc/passwd").read_text().splitlines()
    (user,) = [line for line in passwd if line.startswith("imagepipe:")]
    assert user.endswith(":/var/lib/imagepipe:/usr/sbin/nologin")
    libvirt = next(
        g for g in (root / "etc/group").read_text().splitlines() if g.startswith("libvirt:")
    )
    assert "imagepipe" in libvirt.split(":")[3].split(",")
    settings = load_settings(root / "etc/imagepipe/imagepipe.yml")
    assert settings.keeper.metrics == "127.0.0.1:9464"
    assert settings.state_db == Path("/var/lib/imagepipe/state.db")
    unit = (root / UNIT).read_text()
    assert f"ExecStart={executable} --config /etc/imagepipe/imagepipe.yml keep" in unit
    assert (root / "var/lib/imagepipe").stat().st_mode & 0o777 == 0o700


@pytest.mark.real
def test_an_edited_settings_file_survives_a_second_install(root: Path, tmp_path: Path) -> None:
    executable = tmp_path / "imagepipe"
    executable.write_text("#!/bin/sh\n")
    assert install(root, executable).returncode == 0
    settings = root / "etc/imagepipe/imagepipe.yml"
    settings.write_text("keeper: {tick: 9s}\n")

    assert install(root, executable).returncode == 0

    assert settings.read_text() == "keeper: {tick: 9s}\n"


@pytest.mark.real
@pytest.mark.parametrize(
    ("unit_path", "lines"),
    [
        (
            UNIT,
            ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "User=imagepipe"),
        ),
        (  # the web entrance (docs/web.md), installed beside the keeper
            "etc/systemd/system/imagepipe-web.service",
            (
                "ExecStart={executable} --config /etc/imagepipe/imagepipe.yml web",
                "User=imagepipe",
                "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            ),
        ),
    ],
)
def test_systemd_analyze_verify_finds_nothing_wrong_with_the_installed_unit(
    root: Path, tmp_path: Path, unit_path: str, lines: tuple[str, ...]
) -> None:
    analyze = require_program("systemd-analyze")
    executable = tmp_path / "imagepipe"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    assert install(root, executable).returncode == 0
    unit = root / unit_path

    verify = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )

    assert (verify.returncode, verify.stderr.strip()) == (0, "")  # warnings are failures too
    text = unit.read_text()
    for line in lines:
        assert line.format(executable=executable) in text


@pytest.mark.real
def test_systemd_analyze_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: verify complains about a unit it cannot use."""
    analyze = require_program("systemd-analyze")
    text = (REPO / "imagepipe/data/imagepipe-keep.service").read_text()
    broken = tmp_path / "imagepipe-keep.service"
    broken.write_text(text.replace("Type=notify", "Type=notfy"))

    verify = subprocess.run(
        [analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60, check=False
    )

    assert "Failed to parse service type" in verify.stderr
