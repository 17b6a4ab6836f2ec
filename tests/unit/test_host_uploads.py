"""An upload of a version to a host, as a rollout shows it: the pool's placement rooms carry
the upload of the pool's version, the rollout's waiting line says how far it got, and
`imagepipe rollout` / `imagepipe status` print it."""

from __future__ import annotations

from pathlib import Path

from imagepipe.app import rollout as use_case
from imagepipe.app.status import SCHEMA, HostStatus
from imagepipe.cli.rollout import _lines
from imagepipe.cli.status import host_summary
from imagepipe.pool.hosts import HostPass
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import (
    BaseImage,
    HostSpec,
    HostState,
    HostUpload,
    Observed,
    PoolRecord,
    PoolSpec,
)
from imagepipe.pool.rollout.control import Request, RolloutControl
from imagepipe.pool.rollout.progress import PoolView, judge
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHosts, FakeImages, FakeVersion
from tests.unit.test_keeper import settle
from tests.unit.test_keeper_hosts import HOSTS as KEEPER_HOSTS
from tests.unit.test_rollout_progress import ROLLOUT, SPEC, T

MiB = 1024 * 1024
V2 = BaseImage(image="tiny", version=2, directory=Path("/nowhere"), disk="disk.qcow2")
HOSTS = (
    HostSpec("h1", "qemu+tcp://h1/system", "10.0.0.1"),
    HostSpec("h2", "qemu+tcp://h2/system", "10.0.0.2"),
)
UPLOAD = HostUpload("tiny", 2, 4 * MiB, 16 * MiB, T)


def rooms_with(upload: HostUpload | None) -> HostPass:
    states = {
        "h1": HostState("h1", connected=True, since=T, versions=(("tiny", 2),)),
        "h2": HostState("h2", connected=True, since=T, versions=(("tiny", 1),), upload=upload),
    }
    return HostPass(specs=HOSTS, states=states, draining=frozenset())


def test_a_host_still_receiving_the_pools_version_carries_its_upload_in_its_room() -> None:
    rooms = rooms_with(UPLOAD).rooms(SPEC, V2, lambda host, base: False)
    by_name = {r.name: r for r in rooms}
    assert by_name["h1"].usable and by_name["h1"].upload is None
    assert not by_name["h2"].usable and by_name["h2"].upload == UPLOAD
    other = rooms_with(replace(UPLOAD, version=3)).rooms(SPEC, V2, lambda host, base: False)
    assert {r.name: r.upload for r in other}["h2"] is None  # another version's upload


def test_a_rollout_says_how_far_the_upload_of_its_version_got() -> None:
    rooms = rooms_with(UPLOAD).rooms(SPEC, V2, lambda host, base: False)
    rollout = ROLLOUT
    seen = Observed(target_version=2, base_ready=True, hosts=rooms)
    verdict = judge(rollout, [PoolView(SPEC, seen, PoolRecord("lab", {}))], T + 1)

    waiting = verdict.rollout.progress[0].waiting
    assert waiting == "uploading tiny v2 to h2: 4.0 of 16.0 MiB (25%)"
    assert f"· waiting: {waiting}" in _lines(verdict.rollout)

    done = Observed(
        target_version=2, base_ready=True, hosts=rooms_with(None).rooms(SPEC, V2, lambda h, b: True)
    )
    after = judge(rollout, [PoolView(SPEC, done, PoolRecord("lab", {}))], T + 2)
    assert after.rollout.progress[0].waiting is None


def test_status_prints_each_hosts_upload_with_how_far_and_since_when() -> None:
    hosts = (
        HostState("h1", connected=True, since=T),
        HostState("h2", connected=True, since=T, upload=UPLOAD),
    )
    summary = host_summary(HostStatus(SCHEMA, T, (), (), None, hosts=hosts))
    assert summary is not None
    [line] = [line for line in summary.splitlines() if "h2" in line]
    assert line.startswith(
        "  h2: 0 desktops, 0 free, 0 in use; uploading tiny v2: 4.0 of 16.0 MiB (25%) since "
    )
    assert "h1" not in summary  # nothing to say about h1


def test_a_rollout_on_the_keeper_says_how_far_its_versions_upload_to_each_host_got(
    tmp_path: Path,
) -> None:
    """The keeper, a rollout to v2, and hosts that have not received v2 yet: the rollout's
    pool line (what `imagepipe rollout --wait` prints) says which upload is under way and
    how far it got; no desktop of v2 is made meanwhile."""
    clock = FakeClock()
    images = FakeImages()
    hv = FakeHosts(clock=clock.now)
    hv.add_base(images.publish("tiny", 1, channel="stable"))
    store = SQLiteStore(tmp_path / "state.db")
    spec = PoolSpec(
        name="lab", image="tiny", channel="stable", initial=3, free=3, max=4,
        port_first=5900, port_last=5909,
    )  # fmt: skip
    keeper = Keeper(
        hypervisor=hv,
        balancer=FakeBalancer(),
        store=store,
        images=images,
        specs=[spec],
        clock=clock,
        settings=KeeperOptions(tick=5.0),
        channels=images,
        hosts=KEEPER_HOSTS,
    )
    try:
        settle(keeper)
        images.versions["tiny"].add(2)
        hv.add_base(FakeVersion("tiny", 2).base_image())
        hv.no_upload.update(h.name for h in KEEPER_HOSTS)  # v2 reaches no host for now
        use_case.start(
            RolloutControl(store, images, images, clock), [spec], Request("tiny"), by="t"
        )
        for _ in range(3):
            keeper.run_pass()
            clock.advance(5.0)

        rollout = store.rollouts("tiny", limit=1)[0]
        waiting = rollout.progress[0].waiting or ""
        for host in ("h1", "h2", "h3"):
            assert f"tiny v2 to {host}: " in waiting, waiting
        assert waiting.startswith("uploading tiny v2 to h1: 2.0 of 8.0 MiB (25%)"), waiting
        assert f"· waiting: {waiting}" in _lines(rollout)
        assert all(c.spec.base.version == 1 for c in hv.clones.values())
    finally:
        store.close()
