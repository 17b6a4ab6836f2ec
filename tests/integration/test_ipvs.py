"""The balancer contract and IPVS-specific behaviour against a real IPVS kernel.

One director test machine (Debian's cloud kernel under QEMU, see tests/ipvs_director.py)
boots for the integration tests (tests/integration/conftest.py); every test starts from an
empty IPVS table. The adapter's runner executes ipvsadm inside that machine. Desktops are
tiny TCP servers on this host's 127.0.0.1 (each greets with its port, then echoes), which
the machine reaches at 10.0.3.2; clients connect from this host through QEMU's port forward
to the VIP. Real TCP sessions, real NAT. What HAProxy and IPVS both do is in
test_balancer_pairs.py.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from imagepipe import doctor
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.balancers.ipvs.parse import (
    Forward,
    format_endpoint,
    parse_list,
    parse_names,
    parse_stats,
    parse_thresholds,
)
from imagepipe.config import BalancerSettings, Settings
from imagepipe.doctor import Status
from imagepipe.pool.actions import RecordClone
from imagepipe.pool.executor import ExecutorSettings
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import BackendState, PoolSpec
from imagepipe.stores.sqlite import SQLiteStore
from tests.contract.balancer_suite import BalancerContract, by_name
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages
from tests.host import free_port
from tests.integration.balancers import NAMES, Desktop, IPVSHarness

pytestmark = pytest.mark.real


@pytest.fixture
def harness(ipvs_harness: IPVSHarness) -> IPVSHarness:
    return ipvs_harness


class TestIPVSContract(BalancerContract):
    @pytest.fixture
    def balancer(self, harness: IPVSHarness) -> IPVSBalancer:
        adapter = harness.new_adapter()
        adapter.ensure_frontend()
        return adapter


def test_a_ready_desktop_is_a_masq_real_server_with_weight_1_and_threshold_1(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    (service,) = parse_list(harness.kernel())
    assert (service.address, service.scheduler, service.persistence) == (
        harness.director.vip,
        "wlc",
        0,
    )
    (server,) = service.real_servers
    assert (server.address, server.forward, server.weight) == (harness.desktop(0), Forward.MASQ, 1)
    thresholds = parse_thresholds(
        harness.director.run("ipvsadm", "-L", "-n", "--exact", "--thresholds").stdout
    )
    assert [(t.address, t.upper) for t in thresholds] == [(harness.desktop(0), 1)]


def test_ensure_frontend_sets_the_sysctls_the_drain_rule_needs(harness: IPVSHarness) -> None:
    harness.new_adapter().ensure_frontend()
    values = harness.director.run(
        "sysctl", "-n", "net.ipv4.vs.expire_nodest_conn", "net.ipv4.vs.expire_quiescent_template"
    ).stdout.split()
    assert values == ["1", "0"]


def test_a_closed_session_lingering_as_inactconn_does_not_block_removal_or_the_next_user(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    user = harness.connect()
    assert user.landed_on == harness.desktop(0)
    user.close()

    def lingering() -> bool:
        (service,) = parse_list(harness.kernel())
        return service.real_servers[0].active == 0 and service.real_servers[0].inactive >= 1

    harness.eventually(lingering, "list the closed session as InActConn")
    assert by_name(balancer)["lab-1"].connections == 0
    started = time.monotonic()
    balancer.drain("lab-1")
    balancer.remove("lab-1")  # at once: not after the 2-minute FIN/TIME_WAIT timeout
    assert balancer.list_backends() == []
    balancer.enable("lab-1", harness.desktop(0))  # the desktop was reset and is back
    harness.eventually(
        lambda: (c := harness.connect()).landed_on == harness.desktop(0) or c.close() is not None,
        "let the next user onto the desktop",
    )
    assert time.monotonic() - started < 30


def test_orphans_both_ways_a_lost_real_server_comes_back_a_stray_one_goes(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    balancer.enable("lab-2", harness.desktop(1))
    vip = format_endpoint(harness.director.vip)
    # behind imagepipe's back: lab-2 deleted, an unnamed real server added
    harness.director.run("ipvsadm", "-d", "-t", vip, "-r", str(harness.desktop(1)))
    harness.director.run("ipvsadm", "-a", "-t", vip, "-r", str(harness.desktop(2)), "-m")
    stray = f"ipvs-10.0.3.2-{harness.desktop(2).port}"
    assert [b.name for b in balancer.list_backends()] == [
        "ipvs-10.0.3.2-" + str(harness.desktop(2).port),
        "lab-1",
    ]
    # what a keeper pass does with that: the wanted desktop back, the stray out
    balancer.enable("lab-2", harness.desktop(1))
    balancer.remove(stray)
    assert {b.name: b.address for b in balancer.list_backends()} == {
        "lab-1": harness.desktop(0),
        "lab-2": harness.desktop(1),
    }
    assert set(parse_names(harness.director.run("cat", NAMES).stdout)) == {"lab-1", "lab-2"}


def test_a_service_changed_behind_our_back_is_put_back(harness: IPVSHarness) -> None:
    balancer = harness.new_adapter(scheduler="lc", persistence=60)
    balancer.ensure_frontend()
    vip = format_endpoint(harness.director.vip)
    harness.director.run("ipvsadm", "-E", "-t", vip, "-s", "rr")
    balancer.ensure_frontend()
    (service,) = parse_list(harness.kernel())
    assert (service.scheduler, service.persistence) == ("lc", 60)


def test_doctor_finds_the_director_ready(harness: IPVSHarness) -> None:
    settings = Settings(
        balancer=BalancerSettings(
            driver="ipvs", vip=harness.director.vip.host, port=harness.director.vip.port
        )
    )
    harness.new_adapter().ensure_frontend()

    checks = doctor.check_ipvs(settings, harness.director.runner)

    assert [(c.check, c.status) for c in checks] == [
        (name, Status.OK)
        for name in ("ipvs-module", "ipvsadm", "ipvs-vip", "ipvs-sysctls", "ipvs-forwarding")
    ], checks


# -- the keeper on a real IPVS kernel ------------------------------------------------------


def consecutive_desktops(harness: IPVSHarness, count: int) -> int:
    """Desktops listening on `count` consecutive loopback ports (a pool's port range);
    returns the first port."""
    for _ in range(50):
        first = free_port()
        listeners: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                listeners.append(socket.create_server(("127.0.0.1", port)))
        except OSError:
            for s in listeners:
                s.close()
            continue
        harness.desktops.extend(Desktop(listener) for listener in listeners)
        return first
    raise AssertionError("no free consecutive ports on 127.0.0.1")


def settle(keeper: Keeper, passes: int = 8) -> None:
    """Run passes until one has nothing to do for the hypervisor or the balancer."""
    for _ in range(passes):
        report = keeper.run_pass()
        assert report.ok, report
        if not [a for a in report.actions if not isinstance(a, RecordClone)]:
            return
    raise AssertionError(f"no convergence after {passes} passes: {report.actions}")


def test_the_keeper_runs_a_pool_on_ipvs_from_empty_to_recycled(
    harness: IPVSHarness, tmp_path: Path
) -> None:
    """Real kernel, real sessions; the desktops' hypervisor is the in-memory fake."""
    started = time.monotonic()
    first = consecutive_desktops(harness, 3)
    spec = PoolSpec(
        name="lab",
        image="tiny",
        initial=2,
        free=2,
        max=3,
        port_first=first,
        port_last=first + 2,
        display_address=harness.director.desktop_host,
        recycle_after=60.0,
    )
    clock, images = FakeClock(), FakeImages()
    hv = FakeHypervisor(clock=clock.now)
    hv.add_base(images.publish("tiny", 1))
    store = SQLiteStore(tmp_path / "state.db")

    def keeper(balancer: IPVSBalancer) -> Keeper:
        return Keeper(
            hypervisor=hv,
            balancer=balancer,
            store=store,
            images=images,
            specs=[spec],
            clock=clock,
            settings=KeeperOptions(tick=5.0, executor=ExecutorSettings()),
        )

    def kernel_state(balancer: IPVSBalancer) -> dict[str, BackendState]:
        return {b.name: b.state for b in balancer.list_backends()}

    balancer = harness.new_adapter()
    settle(keeper(balancer))
    assert kernel_state(balancer) == {"lab-0": BackendState.READY, "lab-1": BackendState.READY}

    # a user arrives through the VIP; the keeper drains that desktop and adds a free one
    user = harness.connect()
    assert user.landed_on is not None
    taken = next(b.name for b in balancer.list_backends() if b.address == user.landed_on)
    hv.connect(taken, "10.0.2.2")
    hv.login(taken, "alice")
    settle(keeper(balancer))
    assert kernel_state(balancer)[taken] is BackendState.DRAIN
    assert sorted(kernel_state(balancer)) == ["lab-0", "lab-1", "lab-2"]

    # behind the keeper's back: a free desktop deleted, a leftover of the pool added
    free = next(n for n, s in kernel_state(balancer).items() if s is BackendState.READY)
    vip = format_endpoint(harness.director.vip)
    address = by_name(balancer)[free].address
    harness.director.run("ipvsadm", "-d", "-t", vip, "-r", str(address))
    balancer.enable("lab-9", harness.desktop(3))  # a clone that is long gone
    assert sorted(kernel_state(balancer)) == sorted({"lab-0", "lab-1", "lab-2", "lab-9"} - {free})

    # a restarted keeper reads everything back and puts the kernel right, both ways
    restarted = harness.new_adapter()
    settle(keeper(restarted))
    assert kernel_state(restarted) == {
        "lab-0": kernel_state(restarted)["lab-0"],
        "lab-1": kernel_state(restarted)["lab-1"],
        "lab-2": BackendState.READY,
    }
    assert kernel_state(restarted)[taken] is BackendState.DRAIN
    assert user.alive()

    # disconnected but logged in: the desktop stays; logged off: recycled, back in at once
    user.close()
    hv.disconnect(taken)
    settle(keeper(restarted))
    assert kernel_state(restarted)[taken] is BackendState.DRAIN
    hv.logout(taken, "alice")
    settle(keeper(restarted))
    clock.advance(spec.recycle_after + 1)
    settle(keeper(restarted))
    assert hv.count("reset") == 1
    assert kernel_state(restarted)[taken] is BackendState.READY
    store.close()
    print(f"keeper scenario on IPVS: {time.monotonic() - started:.1f} s")


def test_a_desktop_added_again_while_its_old_connections_linger_still_counts_from_zero(
    harness: IPVSHarness,
) -> None:
    """The kernel gives a real server removed and added again within its connections'
    lifetime (TIME_WAIT) its old counters back from its trash; the adapter keeps them as the
    name's base, so the backend counts from 0 and a reset desktop is not taken for used."""
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    client = harness.connect()
    harness.eventually(lambda: by_name(balancer)["lab-1"].sessions_total == 1, "Conns 1")
    client.close()
    harness.eventually(lambda: by_name(balancer)["lab-1"].connections == 0, "the session end")
    balancer.drain("lab-1")
    balancer.remove("lab-1")
    balancer.enable("lab-1", harness.desktop(0))

    vip = format_endpoint(harness.director.vip)
    raw = parse_stats(
        harness.director.run("ipvsadm", "-L", "-n", "--exact", "--stats", "-t", vip).stdout
    )
    assert raw[0].real_servers[0][1] == 1, "the kernel brought the old counter back"
    assert by_name(balancer)["lab-1"].sessions_total == 0
    again = harness.connect()
    assert again.landed_on == harness.desktop(0)
    harness.eventually(lambda: by_name(balancer)["lab-1"].sessions_total == 1, "Conns 2 - 1")
    again.close()
