"""A fresh machine is really fresh: the packages scripts/setup-host.sh installs are all a
minimal Debian 12 needs for every program the scripts, the image builds and imagepipe call.

The minimal root is `debootstrap --variant=minbase bookworm` (only the Essential and required
packages), made once and cached under /var/cache/imagepipe/debootstrap; the script's package
list is resolved there with `apt-get install --simulate` (cached by the list's hash). Then
every program below, found on this host (where setup-host.sh ran), must come from a package
the minimal root has or the simulated install brings."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_program

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
SETUP_HOST = REPO / "scripts" / "setup-host.sh"
CACHE = Path(os.environ.get("IMAGEPIPE_DEBOOTSTRAP_CACHE", "/var/cache/imagepipe/debootstrap"))
SUITE, VARIANT, MIRROR = "bookworm", "minbase", "http://deb.debian.org/debian"

# The programs each script calls (builtins and functions left out). Each name must appear in
# its script, so the table cannot drift into programs nobody calls.
SCRIPT_PROGRAMS: dict[str, tuple[str, ...]] = {
    "scripts/setup-host.sh": (
        "id", "dpkg-query", "grep", "apt-get", "getent", "groupadd", "useradd", "mkdir", "cp",
        "cat", "virsh", "packer", "haproxy", "head", "cut", "dirname",
    ),
    "scripts/libvirtd.sh": (
        "virsh", "seq", "pgrep", "sleep", "mkdir", "virtlogd", "setsid", "tini", "libvirtd",
        "pkill", "cat",
    ),
    "install.sh": (
        "python3", "useradd", "usermod", "grep", "install", "awk", "chown", "cat", "sed", "cmp",
        "rm", "chmod", "mv", "systemctl", "ln", "cp", "tail", "cut", "mkdir",
    ),
    "packer/tiny/guest/build-guest.sh": (
        "apt-cache", "apt-get", "dpkg", "gcc", "cpio", "gzip", "flock", "sha256sum", "mkdir",
        "awk", "cut", "cat", "ls", "head", "mv", "find", "tr", "grep", "cp", "ln", "install",
        "sort", "mktemp", "rm", "busybox",
    ),
    "packer/ipvs-director/build-director.sh": (
        "apt-cache", "apt-get", "dpkg", "cpio", "gzip", "flock", "sha256sum", "mkdir", "awk",
        "grep", "sort", "busybox",
    ),
}  # fmt: skip
# What imagepipe and its tests run themselves (subprocess argv, shutil.which).
PYTHON_PROGRAMS = (
    "packer", "qemu-system-x86_64", "qemu-img", "qemu-io", "haproxy", "virsh", "virt-admin",
    "systemd-analyze", "mkfs.ext2", "useradd", "git", "ip", "mount", "umount", "pgrep", "sh",
    "bash", "shellcheck", "debootstrap", "chroot", "chromium", "chromedriver", "openssl",
    "runuser", "keepalived", "unshare", "libvirtd", "tini", "nft", "ssh", "ssh-keygen", "nsenter",
    "virt-ssh-helper", "dropbear", "dropbearkey",
)  # fmt: skip
# Files the build of the venv needs that are no program: pip compiles libvirt-python against
# Python's and libvirt's headers; the guest agent is linked statically; venv bootstraps pip.
# And noVNC's page, which the web entrance serves; and PostgreSQL's server programs, which
# Debian keeps off PATH (tests/postgres.py).
BUILD_FILES = (
    "/usr/share/novnc/vnc.html",
    "/usr/lib/postgresql/*/bin/initdb",
    "/usr/lib/postgresql/*/bin/pg_ctl",
    "/usr/include/python3.11/Python.h",
    "/usr/lib/x86_64-linux-gnu/pkgconfig/libvirt.pc",
    "/usr/lib/x86_64-linux-gnu/libc.a",
    "/usr/share/python-wheels/pip-*.whl",
)


def setup_host_packages() -> list[str]:
    """The package list setup-host.sh installs with --dev, read by bash itself."""
    text = SETUP_HOST.read_text()
    arrays = re.findall(r"^(?:dev_)?packages=\(.*?^\)", text, flags=re.M | re.S)
    assert len(arrays) == 2, "setup-host.sh keeps its lists in packages=( ) and dev_packages=( )"
    listed = subprocess.run(
        [
            "bash",
            "-c",
            "\n".join([*arrays, 'printf "%s\\n" "${packages[@]}" "${dev_packages[@]}"']),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed and len(listed) == len(set(listed)), listed
    return listed


@pytest.fixture(scope="module")
def minimal_root() -> Iterator[Path]:
    """A Debian 12 minbase root, made by debootstrap once and then reused."""
    require(os.geteuid() == 0, "debootstrap and chroot need root")
    require_program("debootstrap")
    root = CACHE / f"{SUITE}-{VARIANT}-amd64"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "var" / "lib" / "dpkg" / "status").is_file():
            work = Path(tempfile.mkdtemp(prefix=".debootstrap-", dir=CACHE))
            done = subprocess.run(
                ["debootstrap", f"--variant={VARIANT}", SUITE, str(work), MIRROR],
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            assert done.returncode == 0, f"debootstrap failed (left in {work}):\n{done.stderr}"
            work.rename(root)
    yield root


def installed_in(root: Path) -> set[str]:
    out = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}\\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def simulated_install(root: Path, packages: list[str]) -> set[str]:
    """What `apt-get install --simulate` of `packages` installs in `root` (cached by list)."""
    key = hashlib.sha256("\n".join(sorted(packages)).encode()).hexdigest()[:16]
    cached = root.with_name(f"{root.name}.install-{key}")
    if cached.is_file():
        return set(cached.read_text().split())
    done = subprocess.run(
        ["chroot", str(root), "apt-get", "install", "--simulate", "--no-install-recommends",
         "-q", *packages],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
    )  # fmt: skip
    assert done.returncode == 0, f"the package list does not resolve on Debian 12:\n{done.stderr}"
    brought = set(re.findall(r"^Inst (\S+)", done.stdout, flags=re.M))
    partial = cached.with_name(f"{cached.name}.{os.getpid()}")
    partial.write_text("\n".join(sorted(brought)) + "\n")
    partial.replace(cached)  # a concurrent run never reads half a list
    return brought


def packages_of(paths: list[str]) -> dict[str, str | None]:
    """The Debian package each of this host's files comes from, asked of dpkg in one call
    (usrmerge: the package may have shipped /usr/bin/x as /bin/x)."""
    candidates = {p: _names_of(p) for p in paths}
    every = sorted({c for names in candidates.values() for c in names})
    out = subprocess.run(
        ["dpkg-query", "-S", *every], capture_output=True, text=True, check=False
    ).stdout
    owner: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("diversion ") or ": " not in line:
            continue
        packages, file = line.split(": ", 1)
        owner.setdefault(file, packages.split(",")[0].split(":")[0].strip())
    return {
        p: next((owner[c] for c in names if c in owner), None) for p, names in candidates.items()
    }


def _names_of(path: str) -> list[str]:
    name = os.path.basename(path)
    names = [path, os.path.realpath(path)]
    names += [f"{d}/{name}" for d in ("/bin", "/sbin", "/usr/bin", "/usr/sbin")]
    return list(dict.fromkeys(names))


def test_the_script_table_names_programs_its_scripts_really_call() -> None:
    for script, programs in SCRIPT_PROGRAMS.items():
        text = (REPO / script).read_text()
        for program in programs:
            assert re.search(rf"(?<![\w.-]){re.escape(program)}(?![\w.-])", text), (
                f"{script} does not call {program}"
            )


@pytest.fixture(scope="module")
def fresh_machine(minimal_root: Path) -> tuple[set[str], set[str], list[str]]:
    listed = setup_host_packages()
    return installed_in(minimal_root), simulated_install(minimal_root, listed), listed


def test_every_listed_package_installs_on_a_minimal_debian_12(
    fresh_machine: tuple[set[str], set[str], list[str]],
) -> None:
    base, brought, listed = fresh_machine
    assert "gcc" not in base and "python3" not in base  # the root really is minimal
    assert [p for p in listed if p not in base | brought] == []


def test_every_program_the_scripts_and_imagepipe_call_comes_from_the_list_or_the_base(
    fresh_machine: tuple[set[str], set[str], list[str]],
) -> None:
    base, brought, _ = fresh_machine
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    programs = sorted({p for ps in SCRIPT_PROGRAMS.values() for p in ps} | set(PYTHON_PROGRAMS))
    found: dict[str, str] = {}
    for program in programs:
        where = shutil.which(program, path=path)
        require(where is not None, f"{program} is not installed (run ./install.sh --dev)")
        assert where is not None
        found[program] = where
    owners = packages_of(list(found.values()))
    missing = [
        f"{program} ({where}, package {owners[where]})"
        for program, where in found.items()
        if owners[where] not in base | brought
    ]
    assert missing == [], "a fresh Debian 12 would lack these after setup-host.sh"


def test_the_files_the_venv_and_the_guest_are_built_with_come_from_the_list_or_the_base(
    fresh_machine: tuple[set[str], set[str], list[str]],
) -> None:
    base, brought, _ = fresh_machine
    found: dict[str, str] = {}
    for pattern in BUILD_FILES:
        matches = sorted(glob.glob(pattern))
        require(bool(matches), f"{pattern} is not on this host (run ./install.sh --dev)")
        found[pattern] = matches[0]
    owners = packages_of(list(found.values()))
    missing = [
        f"{pattern} (package {owners[where]})"
        for pattern, where in found.items()
        if owners[where] not in base | brought
    ]
    assert missing == [], "a fresh Debian 12 could not build the venv or the guest"
