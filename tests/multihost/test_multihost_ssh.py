"""A lab host reached the production way over SSH: `qemu+ssh://root@ADDR/system`.

An SSH server (dropbear, no system service) runs inside host2's network AND mount namespace
(entered from its libvirtd), listening on host2's address only, so the `virt-ssh-helper` it
starts for libvirt reaches host2's libvirtd through the namespace's /run/libvirt, never the
machine's own. The keys are made here: the keeper's key in the namespace's view of
/root/.ssh/authorized_keys (a private folder bind-mounted over /root for the server only), and
the server's host key pinned in a known_hosts file the client's `ssh` is told to use (libvirt's
`command=` names a two-line wrapper around `ssh`; the plain ssh transport has no known_hosts=).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.pool.model import BaseImage, HostSpec, Power
from imagepipe.record import replace
from tests.conftest import require_program
from tests.multihost.conftest import registry_checksums, remove_version
from tests.multihost.lab import HostLab, NamespacedHost
from tests.multihost.test_multihost_libvirt import clean, lab_spec, rfb_banner, volumes_of

pytestmark = pytest.mark.real

SSH_PORT = 22
START_TIMEOUT = 10.0


@dataclass
class SshHost:
    """host2's libvirtd behind an SSH server in its namespaces."""

    host: NamespacedHost
    folder: Path
    server: subprocess.Popen[bytes]

    @property
    def key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def ssh(self) -> Path:
        return self.folder / "ssh-pinned"

    @property
    def log(self) -> Path:
        return self.folder / "dropbear.log"

    def uri(self, ssh: Path | None = None) -> str:
        return (
            f"qemu+ssh://root@{self.host.address}/system"
            f"?keyfile={self.key}&no_tty=1&command={ssh or self.ssh}"
        )


def pinned_ssh(path: Path, known_hosts: Path) -> Path:
    """`ssh` that trusts only the host keys in `known_hosts` and reads no user configuration."""
    path.write_text(
        "#!/bin/sh\n"
        f"exec ssh -F none -o UserKnownHostsFile={known_hosts} "
        "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes "
        '-o PasswordAuthentication=no "$@"\n'
    )
    path.chmod(0o755)
    return path


def _wait_listening(address: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"dropbear exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((address, SSH_PORT), timeout=1) as conn:
                if conn.recv(4) == b"SSH-":
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ssh_host(lab: HostLab) -> Iterator[SshHost]:
    for program in ("dropbear", "dropbearkey", "ssh", "ssh-keygen", "nsenter"):
        require_program(program)
    require_program("virt-ssh-helper")  # libvirt runs it on the host, inside the namespace
    host = lab.hosts[1]
    assert host.daemon_pid is not None
    folder = Path(tempfile.mkdtemp(prefix="iphv-ssh-", dir="/tmp"))
    server = None
    try:
        home = folder / "home"  # the namespace's /root: only the keeper's key is authorized
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        home.chmod(0o700)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "keeper", "-f",
             str(folder / "id_ed25519")],
            check=True, capture_output=True,
        )  # fmt: skip
        authorized = home / ".ssh/authorized_keys"
        shutil.copy(folder / "id_ed25519.pub", authorized)
        authorized.chmod(0o600)
        hostkey = folder / "hostkey"
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(hostkey)],
                       check=True, capture_output=True)  # fmt: skip
        public = subprocess.run(["dropbearkey", "-y", "-f", str(hostkey)], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        line = next(x for x in public.splitlines() if x.startswith("ssh-ed25519 "))
        known = folder / "known_hosts"
        known.write_text(f"{host.address} {' '.join(line.split()[:2])}\n")
        pinned_ssh(folder / "ssh-pinned", known)
        script = (
            f"mount --bind {home} /root && exec dropbear -F -E -s -p {host.address}:{SSH_PORT} "
            f"-r {hostkey} -P {folder / 'dropbear.pid'}"
        )
        log = folder / "dropbear.log"
        with log.open("ab") as out:
            server = subprocess.Popen(
                ["nsenter", "-t", str(host.daemon_pid), "-m", "-n", "--",
                 "unshare", "-m", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        _wait_listening(host.address, server, log)
        yield SshHost(host, folder, server)
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def test_over_ssh_a_version_is_uploaded_and_a_desktop_boots_answers_vnc_and_is_deleted(
    ssh_host: SshHost, lab_base: BaseImage, tmp_path: Path
) -> None:
    host = ssh_host.host
    spec = HostSpec(name=host.name, uri=ssh_host.uri(), address=host.address)
    hv = MultiHostHypervisor([spec], state_dir=tmp_path, checksums=registry_checksums)
    base = replace(lab_base, version=66)
    try:
        assert [c for c in hv.list_clones() if c.pool == "sshp"] == []
        assert [h.connected for h in hv.hosts()] == [True]
        assert hv.ensure_version(host.name, base) is False
        deadline = time.monotonic() + 30
        while not hv.ensure_version(host.name, base):
            assert time.monotonic() < deadline, "the upload over ssh did not finish in 30 s"
            time.sleep(0.05)
        assert "tinymh_v66.ready" in volumes_of(host)  # seen through host2's own libvirtd
        hv.create_clone(lab_spec(base, "sshp", 1, host))
        hv.start("sshp-1")
        listed = {c.name: (c.host, c.power) for c in hv.list_clones() if c.pool == "sshp"}
        assert listed == {"sshp-1": (host.name, Power.RUNNING)}
        assert rfb_banner(host.address, 5901).startswith(b"RFB 003.")
        hv.delete("sshp-1")
        assert [c for c in hv.list_clones() if c.pool == "sshp"] == []
        assert not [v for v in volumes_of(host) if v.startswith("sshp-1")]
        # it went over SSH, with the keeper's key, to the server in host2's namespaces
        assert "Pubkey auth succeeded for 'root'" in ssh_host.log.read_text()
    finally:
        clean(hv, "sshp")
        remove_version(HostSpec(name=host.name, uri=host.uri, address=host.address), base)


def test_over_ssh_a_host_whose_key_is_not_the_pinned_one_is_refused(
    ssh_host: SshHost, tmp_path: Path
) -> None:
    import libvirt

    other = tmp_path / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True, capture_output=True)  # fmt: skip
    other.write_text(f"{ssh_host.host.address} {(tmp_path / 'k.pub').read_text()}")
    uri = ssh_host.uri(pinned_ssh(tmp_path / "ssh-other", other))
    with pytest.raises(libvirt.libvirtError, match=r"(?i)host key verification failed"):
        libvirt.open(uri)
