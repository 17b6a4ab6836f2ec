"""The multi-host libvirt adapter on three real libvirt daemons in namespaces (lab.py).

Contract suite on the composite (clones land on host1 unless a spec names a host), the
upload's checksum check, a desktop on each host reached by VNC from the root namespace, a
cut link (host lost within seconds, its desktops not reported deleted, back untouched) and
a killed libvirtd that comes back.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.integration.test_libvirt_contract as single
from imagepipe.errors import DisplayInUseError, FatalHypervisorError, HypervisorUnavailableError
from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.hypervisors.libvirt.volumes import POOL_NAME
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneMode,
    CloneSpec,
    Endpoint,
    HostSpec,
    Power,
    StartMode,
)
from imagepipe.record import replace
from tests.conftest import require
from tests.contract.hypervisor_suite import (
    BaseInUse,
    ForeignVM,
    HypervisorContract,
    OccupyDisplay,
)
from tests.multihost.conftest import registry_checksums
from tests.multihost.lab import HostLab, NamespacedHost

pytestmark = pytest.mark.real

MiB = 1024**2


def host_specs(lab: HostLab) -> list[HostSpec]:
    return [HostSpec(name=h.name, uri=h.uri, address=h.address) for h in lab.hosts]


def make_hv(lab: HostLab, state: Path, **kwargs: Any) -> MultiHostHypervisor:
    kwargs.setdefault("checksums", registry_checksums)
    return MultiHostHypervisor(host_specs(lab), state_dir=state, **kwargs)


def clean(hv: MultiHostHypervisor, pool: str) -> None:
    for clone in hv.list_clones():
        if clone.pool == pool:
            hv.delete(clone.name)
    hv.close()


def rfb_banner(address: str, port: int, timeout: float = 20.0) -> bytes:
    """The first bytes a VNC server says (from the root namespace, over the veth)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=3) as conn:
                return conn.recv(12)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def listening_in(host: NamespacedHost) -> OccupyDisplay:
    """Another program holds the endpoint inside the host's namespace."""

    @contextlib.contextmanager
    def occupy(endpoint: Endpoint) -> Iterator[None]:
        code = (
            "import socket,sys,time\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(({endpoint.host!r},{endpoint.port}));s.listen();print('ok',flush=True)\n"
            "time.sleep(600)\n"
        )
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == b"ok"
            yield
        finally:
            process.kill()
            process.wait()

    return occupy


class TestMultiHostContract(HypervisorContract):
    # desktops boot here: the restore path on remote hosts has its own tests
    # (test_multihost_instant.py), and a warm parent per host would add ~25 s to each run
    start = StartMode.BOOT

    @pytest.fixture
    def hypervisor(
        self, lab: HostLab, tmp_path: Path, contract_pool: str
    ) -> Iterator[MultiHostHypervisor]:
        hv = make_hv(lab, tmp_path / "state")
        try:
            yield hv
        finally:
            clean(hv, contract_pool)

    @pytest.fixture
    def base_image(self, lab_base: BaseImage) -> BaseImage:
        return lab_base

    @pytest.fixture
    def base_in_use(self, base_image: BaseImage) -> BaseInUse:
        assert base_image.disk is not None
        disk = base_image.directory / base_image.disk
        return lambda: single.writer_on(disk)

    @pytest.fixture
    def occupy_display(self, lab: HostLab) -> OccupyDisplay:
        return listening_in(lab.hosts[0])

    @pytest.fixture
    def foreign_vm(self, lab: HostLab, contract_pool: str) -> Iterator[ForeignVM]:
        import libvirt

        conn = libvirt.open(lab.hosts[0].uri)
        name = f"{contract_pool}-7"
        dom = conn.defineXML(single.FOREIGN_XML.format(name=name))
        try:
            yield single.LibvirtForeignVM(conn, name)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
            conn.close()

    def test_a_clone_is_not_made_on_a_display_port_another_program_holds(
        self,
        hypervisor: MultiHostHypervisor,
        make_spec: Callable[..., CloneSpec],
        occupy_display: OccupyDisplay,
    ) -> None:
        """A remote host's ports cannot be probed before QEMU binds them: the clone is made,
        and it is its start that is refused, naming the port and the host."""
        spec = make_spec()
        with occupy_display(spec.display):
            hypervisor.create_clone(spec)
            with pytest.raises(DisplayInUseError, match=str(spec.display.port)):
                hypervisor.start(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SHUTOFF


def lab_spec(base: BaseImage, pool: str, slot: int, host: NamespacedHost) -> CloneSpec:
    return CloneSpec(
        name=f"{pool}-{slot}",
        pool=pool,
        slot=slot,
        base=base,
        mode=CloneMode.LINKED,
        cpus=1,
        memory=128 * MiB,
        display=Endpoint(host.address, 5900 + slot),
        host=host.name,
        start=StartMode.BOOT,  # restoring on a remote host: test_multihost_instant.py
    )


def volumes_of(host: NamespacedHost) -> list[str]:
    import libvirt

    conn = libvirt.open(host.uri)
    try:
        return sorted(conn.storagePoolLookupByName(POOL_NAME).listVolumes())
    finally:
        conn.close()


def test_a_version_whose_file_differs_from_the_registry_is_not_sent(
    lab: HostLab, lab_base: BaseImage, tmp_path: Path
) -> None:
    other = replace(lab_base, version=77)
    wrong = {**registry_checksums(other), "disk.qcow2": "0" * 64}
    hv = make_hv(lab, tmp_path, checksums=lambda _base: wrong)
    try:
        hv.list_clones()
        with pytest.raises(FatalHypervisorError, match="sha256"):
            hv.create_clone(lab_spec(other, "badsum", 1, lab.hosts[1]))
        assert not [v for v in volumes_of(lab.hosts[1]) if v.startswith("tinymh_v77")]
        assert ("tinymh", 77) not in dict.fromkeys(
            next(h for h in hv.hosts() if h.name == "host2").versions
        )
        assert [c for c in hv.list_clones() if c.pool == "badsum"] == []
    finally:
        clean(hv, "badsum")


def test_ensure_version_uploads_once_and_reports_progress_then_holds_it(
    lab: HostLab, lab_base: BaseImage, tmp_path: Path
) -> None:
    base = replace(lab_base, version=5)
    hv = make_hv(lab, tmp_path)
    try:
        hv.list_clones()
        host = lab.hosts[2].name  # the TLS host
        assert hv.ensure_version(host, base) is False
        fractions = []
        deadline = time.monotonic() + 60
        while not hv.ensure_version(host, base):
            state = next(h for h in hv.hosts() if h.name == host)
            if state.upload is not None:
                fractions.append(state.upload.fraction)
            assert time.monotonic() < deadline, "the upload did not finish within 60 s"
            time.sleep(0.02)
        assert all(0.0 <= f <= 1.0 for f in fractions)
        assert ("tinymh", 5) in next(h for h in hv.hosts() if h.name == host).versions
        assert {"tinymh_v5--disk.qcow2", "tinymh_v5.ready"} <= set(volumes_of(lab.hosts[2]))
        assert "tinymh_v5.uploading" not in volumes_of(lab.hosts[2])  # no upload under way
    finally:
        clean(hv, "none")


@pytest.fixture
def spread(lab: HostLab, lab_base: BaseImage, tmp_path: Path) -> Iterator[MultiHostHypervisor]:
    """One running desktop on each host (pool `mh`)."""
    hv = make_hv(lab, tmp_path)
    try:
        hv.list_clones()
        for slot, host in enumerate(lab.hosts, start=1):
            hv.create_clone(lab_spec(lab_base, "mh", slot, host))
            hv.start(f"mh-{slot}")
        yield hv
    finally:
        for host in lab.hosts:
            host.mend()
        deadline = time.monotonic() + 30
        while not all(h.connected for h in hv.hosts()) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                hv.list_clones()
            time.sleep(0.3)
        clean(hv, "mh")


def mine(hv: MultiHostHypervisor) -> dict[str, CloneInfo]:
    return {c.name: c for c in hv.list_clones() if c.pool == "mh"}


def domain_id(host: NamespacedHost, name: str) -> int:
    import libvirt

    conn = libvirt.open(host.uri)
    try:
        return int(conn.lookupByName(name).ID())
    finally:
        conn.close()


def test_a_desktop_on_each_host_is_listed_with_its_host_and_reached_by_vnc(
    lab: HostLab, spread: MultiHostHypervisor
) -> None:
    clones = mine(spread)
    assert {n: (c.host, c.power) for n, c in clones.items()} == {
        "mh-1": ("host1", Power.RUNNING),
        "mh-2": ("host2", Power.RUNNING),
        "mh-3": ("host3", Power.RUNNING),
    }
    for slot, host in enumerate(lab.hosts, start=1):
        assert rfb_banner(host.address, 5900 + slot).startswith(b"RFB 003.")


def test_a_cut_host_is_reported_lost_within_seconds_and_its_desktops_are_not_gone(
    lab: HostLab, spread: MultiHostHypervisor
) -> None:
    host2 = lab.hosts[1]
    before = domain_id(host2, "mh-2")
    host2.cut()
    cut_at = time.monotonic()
    while True:
        clones = mine(spread)
        state = {h.name: h for h in spread.hosts()}
        if not state["host2"].connected:
            break
        assert time.monotonic() - cut_at < 10, "the cut host was not reported lost in 10 s"
        time.sleep(0.2)
    lost_after = time.monotonic() - cut_at
    assert "mh-2" not in clones  # not seen ...
    assert state["host2"].since is not None
    assert {"mh-1", "mh-3"} <= set(clones)  # ... while the others are
    assert all(state[h].connected for h in ("host1", "host3"))
    with pytest.raises(HypervisorUnavailableError, match="host2"):
        spread.start("mh-2")  # its host cannot be asked: an error, never "not found"

    host2.mend()
    deadline = time.monotonic() + 30
    while "mh-2" not in (clones := mine(spread)):
        assert time.monotonic() < deadline, "host2's desktop was not seen again within 30 s"
        time.sleep(0.3)
    assert clones["mh-2"].power is Power.RUNNING
    assert domain_id(host2, "mh-2") == before  # the same QEMU: untouched
    assert next(h for h in spread.hosts() if h.name == "host2").connected
    print(f"host lost noticed after {lost_after:.1f} s")


def test_a_killed_libvirtd_that_comes_back_is_reconnected_and_its_desktop_runs_on(
    lab: HostLab, spread: MultiHostHypervisor
) -> None:
    host3 = lab.hosts[2]
    before = domain_id(host3, "mh-3")
    host3.kill_daemon()
    deadline = time.monotonic() + 10
    while next(h for h in spread.hosts() if h.name == "host3").connected:
        mine(spread)
        assert time.monotonic() < deadline, "the dead libvirtd was not noticed in 10 s"
        time.sleep(0.2)
    host3.start_daemon()
    deadline = time.monotonic() + 30
    while "mh-3" not in (clones := mine(spread)):
        assert time.monotonic() < deadline, "host3 was not reconnected within 30 s"
        time.sleep(0.3)
    assert clones["mh-3"].power is Power.RUNNING
    assert domain_id(host3, "mh-3") == before
    assert rfb_banner(host3.address, 5903).startswith(b"RFB 003.")


def test_a_hung_host_costs_one_timeout_per_pass_and_the_others_are_seen(
    lab: HostLab, spread: MultiHostHypervisor
) -> None:
    """libvirtd of host1 stopped (SIGSTOP: it accepts TCP but never answers): a pass waits
    for it no longer than the observation timeout, host1 is reported lost, and the desktops
    of host2 and host3 are listed; once it answers again its desktop is seen again."""
    import os
    import signal

    spread.observe_timeout = 2.0
    host1 = lab.hosts[0]
    assert host1.daemon_pid is not None
    os.kill(host1.daemon_pid, signal.SIGSTOP)
    try:
        passes = []
        for _ in range(3):
            started = time.monotonic()
            clones = mine(spread)
            passes.append(time.monotonic() - started)
        assert max(passes) < 2.0 + 1.0, passes
        assert {"mh-2", "mh-3"} <= set(clones)
        assert "mh-1" not in clones
        assert not next(h for h in spread.hosts() if h.name == "host1").connected
    finally:
        os.kill(host1.daemon_pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while "mh-1" not in (clones := mine(spread)):
        assert time.monotonic() < deadline, "host1 was not seen again within 30 s"
        time.sleep(0.3)
    assert clones["mh-1"].power is Power.RUNNING


DISPLAY_FIREWALL = """table inet imagepipe {{
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp dport 5900-5999 ip saddr {balancer} accept
    tcp dport 5900-5999 drop
  }}
}}
"""  # the rule docs/hosts.md gives administrators


def connects_from(source: str, address: str, port: int) -> bool:
    with socket.socket() as conn:
        conn.settimeout(2.0)
        conn.bind((source, 0))
        try:
            conn.connect((address, port))
            return conn.recv(4) == b"RFB "
        except OSError:
            return False


def test_a_display_port_is_reached_from_the_balancer_address_only(
    lab: HostLab, spread: MultiHostHypervisor, tmp_path: Path
) -> None:
    """host1's nftables rule lets its display ports be reached from the balancer's address
    (the root side of the veth, 10.251.1.1) and drops everyone else (10.251.1.3, another
    machine on the same network), while the desktop keeps running."""
    nft = shutil.which("nft")
    require(nft is not None, "nft is not installed (scripts/setup-host.sh --dev installs nftables)")
    host1 = lab.hosts[0]
    other = f"{host1.gateway.rsplit('.', 1)[0]}.3"
    rules = tmp_path / "imagepipe.nft"
    rules.write_text(DISPLAY_FIREWALL.format(balancer=host1.gateway))
    in_ns = ["ip", "netns", "exec", host1.netns]
    subprocess.run(["ip", "addr", "add", f"{other}/24", "dev", host1.veth], check=True)
    try:
        assert connects_from(other, host1.address, 5901)  # open before the rule
        subprocess.run([*in_ns, str(nft), "-f", str(rules)], check=True)
        assert connects_from(host1.gateway, host1.address, 5901)
        assert not connects_from(other, host1.address, 5901)
        assert mine(spread)["mh-1"].power is Power.RUNNING
    finally:
        subprocess.run([*in_ns, str(nft), "delete", "table", "inet", "imagepipe"], check=False)
        subprocess.run(["ip", "addr", "del", f"{other}/24", "dev", host1.veth], check=False)
