"""Several real libvirt hosts on this one machine, for the multi-host tests.

    with HostLab(Path(tmp), count=3, tls={3}) as lab:
        lab.hosts[0].uri        # qemu+tcp://10.251.1.2/system
        lab.hosts[2].uri        # qemu+tls://10.251.3.2/system?pkipath=...
        lab.hosts[1].cut()      # the veth goes down: host 2 is unreachable, its guests run on
        lab.hosts[1].mend()
        lab.hosts[2].kill_daemon(); lab.hosts[2].start_daemon()

Each host is a libvirtd in its own network namespace (`iphvN`) and its own mount namespace,
where private folders are bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt and /var/cache/libvirt. A veth pair joins it to the root namespace:
10.251.N.1 on the root side, 10.251.N.2 inside, where libvirtd listens (TCP without auth, or
TLS with a CA and certificates made here) and where the desktops' VNC displays listen. Both
ends are made by the lab, so no test traffic leaves the machine. libvirtd runs under
`tini -s` (as scripts/libvirtd.sh does), which reaps the QEMUs it orphans.

Everything is torn down on close (guests killed, daemons stopped, namespaces and veths
deleted; the mounts die with the last process of their mount namespace), and stale pieces
of a run that crashed are removed before a new lab starts.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

# IMAGEPIPE_LAB_SLOT=N (1-8) gives a lab of its own names and addresses (namespaces iphvN_1..,
# 10.(251+N).0.0/16 for slots 1-4, 10.(251-N).0.0/16 for 5-8: an octet ends at 255), so two
# checkouts can run their multi-host tests at the same time.
_SLOT = int(os.environ.get("IMAGEPIPE_LAB_SLOT", "0") or 0)
if not 0 <= _SLOT <= 8:
    raise ValueError(f"IMAGEPIPE_LAB_SLOT: expected 0 to 8, got {_SLOT}")
PREFIX = f"iphv{_SLOT}_" if _SLOT else "iphv"  # namespaces iphv1.., root-side veths iphv1r..
SUBNET = f"10.{251 + _SLOT if _SLOT <= 4 else 251 - _SLOT}"
MOUNTED = ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt")
TCP_PORT, TLS_PORT = 16509, 16514
START_TIMEOUT = 20.0


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def _guard_route(add: bool) -> None:
    """`unreachable 10.251.0.0/16` in the root namespace: a lab address whose veth is gone or
    down is refused here, never sent along the default route off this machine."""
    if add:
        _run("ip", "route", "replace", "unreachable", f"{SUBNET}.0.0/16")
    else:
        _run("ip", "route", "delete", "unreachable", f"{SUBNET}.0.0/16", check=False)


def cleanup_stale() -> None:
    """Remove what an earlier lab left behind: its namespaces (and every process in them),
    its root-side veths."""
    listing = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listing:
        name = line.split(" ")[0]
        if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
            _kill_namespace(name)
    links = _run("ip", "-o", "link", "show", check=False).stdout.split("\n")
    for line in links:
        parts = line.split(": ")
        if len(parts) > 1:
            link = parts[1].split("@")[0]
            if link.startswith(PREFIX) and link.endswith("r") and link[len(PREFIX) : -1].isdigit():
                _run("ip", "link", "delete", link, check=False)


def _kill_namespace(netns: str) -> None:
    for _ in range(50):
        pids = _run("ip", "netns", "pids", netns, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
    _run("ip", "netns", "delete", netns, check=False)


@dataclass
class Pki:
    """A CA, a server certificate per TLS host, one client certificate (python cryptography)."""

    folder: Path

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = (
            x509,
            hashes,
            serialization,
            ec,
            NameOID,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagepipe test CA")])
        self._ca_name = name
        self._ca = (
            self._builder(name, self._ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_file = self.folder / "cacert.pem"
        self.ca_file.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        self.client_dir = self.folder / "client"
        self.client_dir.mkdir(exist_ok=True)
        shutil.copy(self.ca_file, self.client_dir / "cacert.pem")
        self.issue(self.client_dir / "clientcert.pem", self.client_dir / "clientkey.pem", None)

    def _builder(self, subject: object, key: object) -> object:
        x509 = self._x509
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "_ca_name", subject))
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, cert: Path, key_file: Path, address: str | None) -> None:
        """A certificate signed by the CA: a server's (for `address`) or the client's."""
        x509, oid = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        common = address or "imagepipe-keeper"
        builder = self._builder(x509.Name([x509.NameAttribute(oid.COMMON_NAME, common)]), key)
        usage = (
            x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
            if address
            else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = builder.add_extension(  # type: ignore[attr-defined]
            x509.ExtendedKeyUsage([usage]), critical=False
        ).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if address:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                critical=False,
            )
        signed = builder.sign(self._ca_key, self._hashes.SHA256())
        cert.write_bytes(signed.public_bytes(self._ser.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                self._ser.Encoding.PEM,
                self._ser.PrivateFormat.TraditionalOpenSSL,
                self._ser.NoEncryption(),
            )
        )
        key_file.chmod(0o600)


@dataclass
class NamespacedHost:
    """One libvirt host: a libvirtd in namespace `iphvN` at 10.251.N.2."""

    index: int
    root: Path
    pki: Pki | None = None  # set: reached over qemu+tls://
    daemon_pid: int | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        return f"host{self.index}"

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def veth(self) -> str:
        return f"{PREFIX}{self.index}r"

    @property
    def address(self) -> str:
        """The host's address (inside its namespace): libvirtd and the displays listen here."""
        return f"{SUBNET}.{self.index}.2"

    @property
    def gateway(self) -> str:
        """The root namespace's end of the veth (where the balancer would be)."""
        return f"{SUBNET}.{self.index}.1"

    @property
    def uri(self) -> str:
        if self.pki is not None:
            return f"qemu+tls://{self.address}/system?pkipath={self.pki.client_dir}"
        return f"qemu+tcp://{self.address}/system"

    def path(self, inside: str) -> Path:
        """Where a path of the host's private folders lives in the root namespace."""
        return self.root / inside.lstrip("/")

    def create(self) -> None:
        for folder in MOUNTED:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        for sub in ("qemu", "images"):
            (self.root / "var/lib/libvirt" / sub).mkdir(exist_ok=True)
        etc = self.root / "etc/libvirt"
        conf = [
            f'listen_addr = "{self.address}"',
            "listen_tcp = 0" if self.pki else "listen_tcp = 1",
            "listen_tls = 1" if self.pki else "listen_tls = 0",
            f'tcp_port = "{TCP_PORT}"',
            f'tls_port = "{TLS_PORT}"',
            'auth_tcp = "none"',
            'auth_tls = "none"',
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
        ]
        if self.pki is not None:
            tls = self.root / "tls"
            tls.mkdir(exist_ok=True)
            self.pki.issue(tls / "servercert.pem", tls / "serverkey.pem", self.address)
            conf += [
                f'ca_file = "{self.pki.ca_file}"',
                f'cert_file = "{tls / "servercert.pem"}"',
                f'key_file = "{tls / "serverkey.pem"}"',
            ]
        (etc / "libvirtd.conf").write_text("\n".join(conf) + "\n")
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
            "dynamic_ownership = 0\nremember_owner = 0\n"
            # no virtlogd in the namespace: QEMU's output goes to a file
            'stdio_handler = "file"\n'
        )
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns",
             self.netns)  # fmt: skip
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.veth)
        _run("ip", "link", "set", self.veth, "up")
        for argv in (
            ("ip", "addr", "add", f"{self.address}/24", "dev", "eth0"),
            ("ip", "link", "set", "eth0", "up"),
            ("ip", "link", "set", "lo", "up"),
        ):
            _run("ip", "netns", "exec", self.netns, *argv)
        self.start_daemon()

    def start_daemon(self) -> None:
        """Start libvirtd in the namespaces (again, after kill_daemon) and wait for it."""
        binds = " && ".join(f"mount --bind {self.root / folder} /{folder}" for folder in MOUNTED)
        pidfile = self.root / "libvirtd.pid"
        log = self.root / "daemon.log"
        script = (
            f"{binds} && exec tini -s -- libvirtd --listen "
            f"--config /etc/libvirt/libvirtd.conf --pid-file {pidfile}"
        )
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "-m", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._supervisor = process
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"libvirtd of {self.name} exited: {log.read_text()[-2000:]}")
            probe = _run("virsh", "-c", self.uri, "version", check=False)
            if probe.returncode == 0:
                self.daemon_pid = int(pidfile.read_text().strip())
                return
            time.sleep(0.2)
        raise RuntimeError(f"libvirtd of {self.name} did not answer at {self.uri}: {probe.stderr}")

    def kill_daemon(self) -> None:
        """SIGKILL libvirtd (its guests keep running, as when libvirtd crashes)."""
        if self.daemon_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.daemon_pid, signal.SIGKILL)
            self.daemon_pid = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._supervisor.wait(timeout=10)

    def cut(self) -> None:
        """The host's side of the link goes down (its cable is pulled): nothing reaches it,
        its guests keep running. The root side stays up, so its route stays and packets to
        the host are dropped there (and the lab's unreachable route catches the rest)."""
        _run("ip", "netns", "exec", self.netns, "ip", "link", "set", "eth0", "down")

    def mend(self) -> None:
        _run("ip", "netns", "exec", self.netns, "ip", "link", "set", "eth0", "up")

    def destroy(self) -> None:
        _kill_namespace(self.netns)
        _run("ip", "link", "delete", self.veth, check=False)


class HostLab:
    """`count` namespaced libvirt hosts; those whose index is in `tls` are reached over TLS."""

    def __init__(self, root: Path, count: int = 3, tls: frozenset[int] = frozenset()) -> None:
        self.root = root
        pki = Pki(root / "pki") if tls else None
        self.hosts = [
            NamespacedHost(i, root / f"host{i}", pki if i in tls else None)
            for i in range(1, count + 1)
        ]

    def __enter__(self) -> HostLab:
        cleanup_stale()
        _guard_route(True)
        try:
            for host in self.hosts:
                host.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for host in self.hosts:
            host.destroy()
        _guard_route(False)
