"""`imagepipe keep` as a real process over the lab's hosts, its host list changed by SIGHUP.

The keeper starts with host1 and host2 and a pool of 2; a reload whose settings have a typo
under `hosts:` is refused with the file, the line and the key, and nothing changes; a good
reload that adds host3 connects it and sends it the pool's version; a third reload that grows
the pool makes the new desktop there, the first two desktops untouched.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.pool.model import HostSpec
from tests.e2e.harness import (
    Installation,
    Pool,
    PoolFile,
    free_ready,
    require_real_host,
    temp_root,
)
from tests.multihost.lab import HostLab, NamespacedHost
from tests.multihost.test_multihost_libvirt import domain_id

pytestmark = pytest.mark.real

POOL = "mhr"


def hosts_yaml(hosts: list[NamespacedHost], typo: bool = False) -> str:
    key = "adress" if typo else "address"
    return "hosts:\n" + "".join(
        f"  - {{name: {h.name}, uri: '{h.uri}', {key}: {h.address}}}\n" for h in hosts
    )


def pool_yaml(free: int) -> str:
    """The pool without a display address: on several hosts each desktop listens on its
    host's address."""
    return (
        f"name: {POOL}\nimage: tiny\nchannel: latest\nstart: boot\n"
        f"size: {{initial: {free}, free: {free}, max: 3}}\n"
        "machine: {cpus: 1, memory: 128M}\n"
        "display: {port_range: 5960-5969}\n"
        "sessions: {on_logoff: reset, recycle_after: 3s}\nboot_timeout: 3m\n"
    )


@pytest.fixture
def installation(lab: HostLab) -> Iterator[Installation]:
    require_real_host("packer", "haproxy")
    host = Installation(
        temp_root("iphr-"),
        PoolFile(POOL, free=2, max=3, ports=(5960, 5969)),
        settings=hosts_yaml(lab.hosts[:2]),
    )
    try:
        (host.root / "pools" / f"{POOL}.yml").write_text(pool_yaml(2))
        yield host
    finally:
        host.stop_keeper()
        hv = MultiHostHypervisor(
            [HostSpec(name=h.name, uri=h.uri, address=h.address) for h in lab.hosts],
            state_dir=host.root / "cleanup",
            checksums=lambda _base: {},
        )
        try:
            for clone in hv.list_clones():
                if clone.pool == POOL:
                    with contextlib.suppress(Exception):
                        hv.delete(clone.name)
        finally:
            hv.close()
        host.close()


def placed(pool: Pool) -> dict[str, str]:
    """Free, ready desktops -> the host each runs on."""
    return {c["name"]: c["host"] for c in free_ready(pool)}


def test_a_reload_with_a_typo_changes_nothing_and_one_that_adds_a_host_fills_it(
    lab: HostLab, installation: Installation
) -> None:
    h = installation
    h.cli("build", "tiny")
    h.start_keeper()
    first = placed(h.wait_for("2 free desktops", lambda p: len(free_ready(p)) == 2))
    assert sorted(first.values()) == ["host1", "host2"]
    ids = {name: domain_id(lab.hosts[int(on[-1]) - 1], name) for name, on in first.items()}

    # a typo under hosts: refused, the file, line and key named; the keeper goes on as it was
    good = h.config.read_text()
    h.config.write_text(good.replace(hosts_yaml(lab.hosts[:2]), hosts_yaml(lab.hosts, True)))
    assert h.keeper is not None
    h.keeper.send_signal(signal.SIGHUP)
    h.wait_until("the reload refused", lambda: "reload refused" in h.keeper_output())
    refused = next(line for line in h.keeper_output().splitlines() if "reload refused" in line)
    line = 1 + good.splitlines().index("hosts:") + 1  # the first host's line
    assert f"{h.config}:{line}: hosts[0].adress: unknown key; did you mean 'address'?" in refused
    assert "more below" not in refused, refused

    # the good one: host3 connected; it first receives the version its pool needs
    h.config.write_text(good.replace(hosts_yaml(lab.hosts[:2]), hosts_yaml(lab.hosts)))
    h.reload_keeper()
    h.wait_until(
        "host3 holds the pool's version",
        lambda: "tiny v1" in host_row(h, "host3")["versions"],
        timeout=60,
    )
    assert host_row(h, "host3")["connected"] is True

    # the pool grows by one: the new desktop goes to the empty host, the others untouched
    (h.root / "pools" / f"{POOL}.yml").write_text(pool_yaml(3))
    h.reload_keeper()
    now = placed(h.wait_for("3 free desktops", lambda p: len(free_ready(p)) == 3))
    assert {n: on for n, on in now.items() if n in first} == first
    assert [on for n, on in now.items() if n not in first] == ["host3"]
    for name, on in first.items():  # the same QEMU: nothing of them was touched
        assert domain_id(lab.hosts[int(on[-1]) - 1], name) == ids[name]


def host_row(h: Installation, name: str) -> dict[str, Any]:
    """`imagepipe hosts --json`'s row of host `name` (a process of its own: what the hosts
    hold, read from them)."""
    rows: list[dict[str, Any]] = json.loads(h.cli("hosts", "--json"))
    return next(r for r in rows if r["name"] == name)
