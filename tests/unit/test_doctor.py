"""`imagepipe doctor`: one ok/warn/FAIL line per check, a fix for each problem, exit code 3
when something is missing, and nothing on the host changed by looking."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from imagepipe import doctor, schema
from imagepipe.cli.app import main
from imagepipe.config import BalancerInstance, BalancerSettings, HypervisorSettings, Settings
from imagepipe.doctor import Check, Status, run_checks
from imagepipe.hypervisors.libvirt import checks as libvirt_checks
from imagepipe.images.packer import Packer
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.stores.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.conftest import require_program

POOL = (
    "name: lab\nimage: tiny\nsize: {initial: 1, free: 1, max: 2}\n"
    "display: {port_range: 5900-5901}\n"
)


def write_settings(tmp_path: Path, extra: str = "") -> Path:
    """A settings file whose every path is inside tmp_path; one valid pool file."""
    (tmp_path / "pools").mkdir(exist_ok=True)
    (tmp_path / "pools" / "lab.yml").write_text(POOL)
    path = tmp_path / "imagepipe.yml"
    path.write_text(
        "pools_dir: pools\nstate_db: state/state.db\nregistry: registry\n"
        "image_store: images\nrun_dir: run\n" + extra
    )
    return path


def settings(tmp_path: Path, **changes: object) -> Settings:
    base = Settings(
        pools_dir=tmp_path / "pools",
        state_db=tmp_path / "state" / "state.db",
        registry=tmp_path / "registry",
        image_store=tmp_path / "images",
        run_dir=tmp_path / "run",
    )
    return schema.replace(base, **changes)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.check: c for c in checks}


def tree(root: Path) -> dict[str, tuple[int, float]]:
    """Every path below root with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")
    }


# --- settings and pool files -------------------------------------------------------------


def test_a_misspelt_settings_key_fails_with_file_and_line_and_skips_dependent_checks(
    tmp_path: Path,
) -> None:
    path = tmp_path / "imagepipe.yml"
    path.write_text("state_db: /tmp/x.db\nhypervisr: {driver: libvirt}\n")

    checks = run_checks(path)

    assert [c.check for c in checks] == ["settings", "packer"]
    [settings_check] = [c for c in checks if c.check == "settings"]
    assert settings_check.status is Status.FAIL
    assert f"{path}:2: hypervisr: unknown key; did you mean 'hypervisor'?" in settings_check.detail
    assert settings_check.fix is not None and "settings file" in settings_check.fix


def test_a_broken_pool_file_fails_with_its_file_line_message(tmp_path: Path) -> None:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text("name: lab\nimage: tiny\nclone: linkd\n")

    check, specs = doctor.check_pools(settings(tmp_path))

    assert check.status is Status.FAIL and specs == []
    assert check.detail.startswith(f"{tmp_path}/pools/lab.yml:3: clone: expected")


def test_a_missing_pools_dir_fails_and_an_empty_one_warns(tmp_path: Path) -> None:
    missing, _ = doctor.check_pools(settings(tmp_path))
    (tmp_path / "pools").mkdir()
    empty, _ = doctor.check_pools(settings(tmp_path))

    assert missing.status is Status.FAIL and "does not exist" in missing.detail
    assert empty.status is Status.WARN and "no pool files" in empty.detail


# --- programs and daemons ----------------------------------------------------------------


def test_missing_packer_fails_and_says_to_run_the_installer() -> None:
    check = doctor.check_packer(Packer(binary="imagepipe-no-such-packer"))

    assert check.status is Status.FAIL
    assert "not installed" in check.detail and check.fix == "run ./install.sh"


class FakeLibvirtError(Exception):
    def get_error_message(self) -> str:
        return "Failed to connect socket to '/run/libvirt/libvirt-sock-ro': No such file"


def test_libvirt_not_answering_fails_and_says_to_start_libvirtd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(uri: str) -> object:
        raise FakeLibvirtError(uri)

    fake = SimpleNamespace(libvirtError=FakeLibvirtError, openReadOnly=refuse)
    monkeypatch.setattr(libvirt_checks, "import_libvirt", lambda: (fake, None))

    check = libvirt_checks.check_libvirt("qemu:///system")

    assert check.status is Status.FAIL
    assert "libvirt does not answer at qemu:///system" in check.detail
    assert check.fix is not None and "start libvirtd" in check.fix


def test_libvirt_versions_are_decoded_from_libvirts_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[bool] = []
    conn = SimpleNamespace(
        getLibVersion=lambda: 9_000_000,
        getVersion=lambda: 7_002_022,
        getType=lambda: "QEMU",
        close=lambda: closed.append(True),
    )
    fake = SimpleNamespace(libvirtError=FakeLibvirtError, openReadOnly=lambda uri: conn)
    monkeypatch.setattr(libvirt_checks, "import_libvirt", lambda: (fake, None))

    check = libvirt_checks.check_libvirt("qemu:///system")

    assert check == doctor.ok(
        "hypervisor", "libvirt 9.0.0, QEMU 7.2.22 at qemu:///system (read-only)"
    )
    assert closed == [True]


def test_virtualbox_without_virtualbox_on_the_host_fails_with_how_to_install_it(
    tmp_path: Path,
) -> None:
    check = doctor.check_hypervisor(
        settings(tmp_path, hypervisor=HypervisorSettings(driver="virtualbox"))
    )

    assert check.status is Status.FAIL
    assert check.fix is not None and "VirtualBox 6.1 or 7.x" in check.fix


def test_without_a_kvm_device_guests_run_under_tcg_which_is_a_warning(tmp_path: Path) -> None:
    check = libvirt_checks.check_kvm(tmp_path / "kvm")

    assert check.status is Status.WARN
    assert "TCG" in check.detail and "No such file" in check.detail


def test_balancer_none_is_ok_and_ipvs_names_its_virtual_service(tmp_path: Path) -> None:
    none = doctor.check_balancer(settings(tmp_path, balancer=BalancerSettings(driver="none")))
    ipvs = doctor.check_balancer(
        settings(tmp_path, balancer=BalancerSettings(driver="ipvs", vip="10.0.0.1"))
    )

    assert none.status is Status.OK and "no balancer" in none.detail
    assert ipvs.status is Status.OK and "virtual service 10.0.0.1:3389" in ipvs.detail


def test_managed_haproxy_missing_fails_and_says_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    check = doctor.check_balancer(settings(tmp_path))

    assert check.status is Status.FAIL
    assert "haproxy is not installed" in check.detail and check.fix == "run ./install.sh"


def test_unmanaged_haproxy_that_does_not_answer_fails_and_names_the_setting(
    tmp_path: Path,
) -> None:
    cfg = BalancerSettings(manage=False, admin_socket=tmp_path / "nobody.sock")

    check = doctor.check_balancer(settings(tmp_path, balancer=cfg))

    assert check.status is Status.FAIL
    assert str(tmp_path / "nobody.sock") in check.detail
    assert check.fix is not None and "balancer.admin_socket" in check.fix


@pytest.fixture
def answering_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that answers every command like HAProxy's `show version`."""
    path = tmp_path / "admin.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                if stop.is_set():
                    return
                conn.recv(1024)
                conn.sendall(b"2.6.12-1+deb12u4\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
        wake.connect(str(path))
    thread.join(timeout=5)
    server.close()


def test_unmanaged_haproxy_that_answers_is_ok_with_its_version(
    tmp_path: Path, answering_socket: Path
) -> None:
    cfg = BalancerSettings(manage=False, admin_socket=answering_socket)

    check = doctor.check_balancer(settings(tmp_path, balancer=cfg))

    assert check.status is Status.OK
    assert check.detail == f"HAProxy 2.6.12-1+deb12u4 answers on {answering_socket} (manage: false)"


def test_a_balancer_pair_with_one_silent_instance_warns_and_names_it(
    tmp_path: Path, answering_socket: Path
) -> None:
    cfg = BalancerSettings(
        manage=False,
        instances=(
            BalancerInstance(name="lb1", admin_socket=answering_socket),
            BalancerInstance(name="lb2", admin_socket=tmp_path / "lb2.sock"),
        ),
    )

    check = doctor.check_balancer(settings(tmp_path, balancer=cfg))

    assert check.status is Status.WARN
    assert check.detail.startswith("lb1: HAProxy 2.6.12-1+deb12u4 answers on ")
    assert f"lb2: no HAProxy answers on the admin socket {tmp_path / 'lb2.sock'}" in check.detail
    assert check.fix is not None and "instance lb2" in check.fix


def test_a_balancer_pair_with_no_instance_answering_fails(tmp_path: Path) -> None:
    cfg = BalancerSettings(
        manage=False,
        instances=(
            BalancerInstance(name="lb1", admin_socket=tmp_path / "lb1.sock"),
            BalancerInstance(name="lb2", admin_socket=tmp_path / "lb2.sock"),
        ),
    )

    check = doctor.check_balancer(settings(tmp_path, balancer=cfg))

    assert check.status is Status.FAIL
    assert "lb1: no HAProxy answers" in check.detail and "lb2: no HAProxy" in check.detail


# --- state database ----------------------------------------------------------------------


def make_db(path: Path, version: int) -> None:
    SQLiteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (version,))
    db.close()


def stored_version(path: Path) -> int:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        return int(db.execute("SELECT max(version) FROM schema_version").fetchone()[0])
    finally:
        db.close()


def test_state_db_current_schema_is_ok(tmp_path: Path) -> None:
    make_db(tmp_path / "state" / "state.db", SCHEMA_VERSION)

    check = doctor.check_state_db(settings(tmp_path))

    assert (
        check.status is Status.OK and f"schema version {SCHEMA_VERSION} (current)" in check.detail
    )


def test_state_db_older_schema_warns_that_keep_migrates_it_and_is_left_unmigrated(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state" / "state.db"
    make_db(db, 1)
    before = tree(tmp_path)

    check = doctor.check_state_db(settings(tmp_path))

    assert check.status is Status.WARN and "schema version 1, older" in check.detail
    assert check.fix is not None and "migrates it" in check.fix
    assert stored_version(db) == 1
    assert tree(tmp_path) == before


def test_state_db_written_by_a_newer_imagepipe_fails(tmp_path: Path) -> None:
    make_db(tmp_path / "state" / "state.db", SCHEMA_VERSION + 1)

    check = doctor.check_state_db(settings(tmp_path))

    assert check.status is Status.FAIL and "newer imagepipe" in check.detail
    assert check.fix is not None and "upgrade imagepipe" in check.fix


def test_a_file_that_is_not_a_state_db_fails(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").write_text("hello, not sqlite\n" * 100)

    check = doctor.check_state_db(settings(tmp_path))

    assert check.status is Status.FAIL and "not an imagepipe state database" in check.detail


def test_state_db_under_a_file_instead_of_a_folder_fails(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")

    check = doctor.check_state_db(settings(tmp_path, state_db=tmp_path / "blocker" / "s.db"))

    assert check.status is Status.FAIL and "is not a folder" in check.detail
    assert check.fix is not None and "state_db" in check.fix


# --- registry and pool images ------------------------------------------------------------


def register_tiny(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"qcow2")
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    registry.register(
        NewVersion(
            image="tiny", fingerprint="fp", builder="qemu", packer_version="1.6.6", files=(disk,)
        )
    )


def test_absent_registry_warns_it_is_created_on_first_build(tmp_path: Path) -> None:
    check = doctor.check_registry(settings(tmp_path))

    assert check.status is Status.WARN and "created on the first" in (check.fix or "")


def test_registry_folder_that_is_not_git_fails(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "notes.txt").write_text("mine")

    check = doctor.check_registry(settings(tmp_path))

    assert check.status is Status.FAIL and "is not a git repository" in check.detail


def test_doctor_says_whether_the_shared_registry_remote_answers(tmp_path: Path) -> None:
    remote = tmp_path / "shared.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    check = doctor.check_registry_remote(settings(tmp_path, registry_remote=str(remote)))
    assert check.status is Status.OK and "empty" in check.detail
    missing = doctor.check_registry_remote(
        settings(tmp_path, registry_remote=str(tmp_path / "gone.git"))
    )
    assert missing.status is Status.FAIL and "unreachable" in missing.detail
    assert "credential helper" in (missing.fix or "")
    assert not (tmp_path / "registry").exists()  # doctor changes nothing


def test_pool_image_resolves_once_built_and_warns_to_build_it_before(tmp_path: Path) -> None:
    spec_settings = settings(tmp_path)
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL)
    _, specs = doctor.check_pools(spec_settings)

    [before] = doctor.check_pool_images(spec_settings, specs)
    register_tiny(tmp_path)
    [after] = doctor.check_pool_images(spec_settings, specs)
    registry = doctor.check_registry(spec_settings)

    assert before.check == "image:lab" and before.status is Status.WARN
    assert before.fix == "run imagepipe build tiny"
    assert after == doctor.ok("image:lab", "tiny@latest is v1")
    assert registry == doctor.ok("registry", f"{tmp_path}/registry is a git repository: tiny")


# --- the command -------------------------------------------------------------------------


def test_json_is_a_stable_list_and_a_fail_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_settings(tmp_path, "balancer: {manage: false, admin_socket: none.sock}\n")

    code = doctor_cli(config, "--json", capsys=capsys)

    report = json.loads(code[1])
    assert code[0] == 3
    assert all(sorted(item) == ["check", "detail", "fix", "status"] for item in report)
    [balancer] = [item for item in report if item["check"] == "balancer"]
    assert balancer["status"] == "FAIL" and balancer["fix"].startswith("start your HAProxy")
    assert all(item["fix"] is None for item in report if item["status"] == "ok")


def doctor_cli(config: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--config", str(config), "doctor", *args])
    return code, capsys.readouterr().out


@pytest.mark.real
def test_doctor_on_this_host_passes_with_warnings_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], require_libvirt: str
) -> None:
    require_program("packer")
    require_program("haproxy")
    config = write_settings(tmp_path, f"hypervisor: {{uri: '{require_libvirt}'}}\n")
    before = tree(tmp_path)

    code, output = doctor_cli(config, capsys=capsys)

    lines = {line.split()[1]: line.split()[0] for line in output.splitlines()[:-1]}
    kvm = lines.pop("kvm")
    assert code == 0, output
    assert lines == {
        "settings": "ok",
        "packer": "ok",
        "pools": "ok",
        "hypervisor": "ok",
        "balancer": "ok",
        "state-db": "ok",
        "run-dir": "ok",
        "registry": "warn",
        "image-store": "ok",
        "private-modes": "ok",
        "image:lab": "warn",
    }
    assert kvm in ("ok", "warn")  # depends on the host's /dev/kvm; never a FAIL
    assert re.search(r"libvirt \d+\.\d+\.\d+, QEMU \d+\.\d+\.\d+ at ", output)
    assert re.search(r"packer \d+\.\d+\.\d+; ", output)
    assert re.search(
        r"haproxy \d+\.\d+\S* at \S+, managed, bind 127\.0\.0\.1:5999; not running", output
    )
    assert "run imagepipe build tiny" in output
    assert tree(tmp_path) == before  # no db, registry, run dir, haproxy.cfg or socket made
