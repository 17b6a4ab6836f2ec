"""A registry shared through a git remote, and an image store checked against it (real git,
a bare repository in a temporary folder as the remote)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
from pathlib import Path

import git
import pytest

from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.images.integrity import ArtifactChecker, ArtifactMismatchError, CheckedImages
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.observe import observe
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeHypervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _bare(tmp_path: Path) -> Path:
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    return remote


def _registry(
    tmp_path: Path, name: str, remote: Path, *, store: str = "images", clock: Clock | None = None
) -> Registry:
    return Registry(
        tmp_path / name / "registry",
        tmp_path / store,
        remote=str(remote),
        fetch_every=30.0,
        clock=clock or Clock(),
    )


def _new(tmp_path: Path, tag: str) -> NewVersion:
    build = tmp_path / f"build-{tag}"
    build.mkdir()
    (build / "disk.qcow2").write_bytes(f"disk of build {tag}\n".encode() * 64)
    return NewVersion(
        image="tiny",
        fingerprint=f"fp-{tag}",
        builder="qemu",
        packer_version="1.10.0",
        files=(build / "disk.qcow2",),
        disk="disk.qcow2",
    )


def _register_in_process(tmp_path: Path, remote: Path, builder: str, store: str, tag: str) -> int:
    registry = _registry(tmp_path, builder, remote, store=store)
    return registry.register(_new(tmp_path, tag)).version


@pytest.mark.parametrize("shared_store", [True, False], ids=["shared-store", "own-stores"])
def test_two_builders_racing_through_one_remote_never_get_the_same_number(
    tmp_path: Path, shared_store: bool
) -> None:
    remote = _bare(tmp_path)
    _registry(tmp_path, "a", remote).refresh()  # both clones exist before the race
    _registry(tmp_path, "b", remote).refresh()
    jobs = [
        (
            tmp_path,
            remote,
            builder,
            "images" if shared_store else f"images-{builder}",
            f"{builder}{i}",
        )
        for i in range(3)
        for builder in ("a", "b")
    ]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        numbers = pool.starmap(_register_in_process, jobs)
    assert len(set(numbers)) == len(jobs)  # a number a lost race claimed is skipped, never shared
    third = _registry(tmp_path, "c", remote)  # a keeper's fresh clone sees every version
    versions = third.versions("tiny")
    assert [r.version for r in versions] == sorted(numbers)
    assert sorted(r.fingerprint for r in versions) == sorted(f"fp-{job[-1]}" for job in jobs)
    checker = ArtifactChecker()
    for record in versions:  # every record names the files its own build made
        checker.check(record)
    stores = {tmp_path / job[3] / "tiny" for job in jobs}
    left = {p for store in stores for p in store.iterdir()}
    assert left == {Path(r.directory) for r in versions}  # no folder left behind by a retry
    tags = git.Repo(remote).tags
    assert {t.name for t in tags} == {f"tiny/v{n}" for n in numbers}
    latest = [m.version for m in third.channels("tiny")["latest"]]
    assert latest == sorted(numbers)  # each registration moved `latest` forward, in order


def test_a_channel_moved_on_one_machine_is_seen_by_the_other_after_its_next_fetch(
    tmp_path: Path,
) -> None:
    remote = _bare(tmp_path)
    builder = _registry(tmp_path, "builder", remote)
    clock = Clock()
    keeper = _registry(tmp_path, "keeper", remote, clock=clock)
    builder.register(_new(tmp_path, "1"))
    builder.register(_new(tmp_path, "2"))
    builder.promote("tiny", 1, "stable")
    assert keeper.resolve("tiny", "stable").version == 1
    builder.promote("tiny", 2, "stable")
    clock.now += 10  # within fetch_every: the keeper works from what it fetched
    assert keeper.resolve("tiny", "stable").version == 1
    clock.now += 30
    assert keeper.resolve("tiny", "stable").version == 2
    keeper.move_channel("tiny", "stable", 1, "rollout r1")  # a rollout, through the port
    builder.refresh(force=True)
    assert builder.channel_version("tiny", "stable") == 1
    assert [m.by for m in builder.channels("tiny")["stable"]] == [
        "promote",
        "promote",
        "rollout r1",
    ]


def test_with_the_remote_unreachable_reads_use_the_last_state_and_writes_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = _bare(tmp_path)
    builder = _registry(tmp_path, "builder", remote)
    clock = Clock()
    keeper = _registry(tmp_path, "keeper", remote, clock=clock)
    builder.register(_new(tmp_path, "1"))
    builder.promote("tiny", 1, "stable")
    assert keeper.resolve("tiny", "stable").version == 1
    remote.rename(tmp_path / "gone.git")  # the remote's machine is down
    keeper_repo = git.Repo(keeper.path)
    head = keeper_repo.head.commit.hexsha

    caplog.set_level(logging.INFO, logger="imagepipe.images.registry")
    for _ in range(3):
        clock.now += 60
        assert keeper.resolve("tiny", "stable").version == 1
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # said once, not every pass

    with pytest.raises(OperationFailedError, match=r"registry remote .* unreachable"):
        keeper.promote("tiny", 1, "candidate")
    new = _new(tmp_path, "2")
    with pytest.raises(OperationFailedError, match="unreachable"):
        builder.register(new)
    assert new.files[0].is_file()  # the build's output is where it was
    assert not (tmp_path / "images" / "tiny" / "v2").exists()
    assert keeper_repo.head.commit.hexsha == head
    assert not keeper_repo.is_dirty(untracked_files=True)
    assert "candidate" not in keeper.channels("tiny")

    (tmp_path / "gone.git").rename(remote)  # back: the next fetch says so and writes work
    clock.now += 60
    keeper.refresh()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert builder.register(new).version == 2


def test_an_image_file_with_one_byte_changed_is_never_used(tmp_path: Path) -> None:
    remote = _bare(tmp_path)
    builder = _registry(tmp_path, "builder", remote)
    record = builder.register(_new(tmp_path, "1"))
    keeper = CheckedImages(_registry(tmp_path, "keeper", remote))
    assert keeper.resolve("tiny", "latest").version == 1
    assert keeper.resolve("tiny", "latest").version == 1
    assert keeper.checker.hashed == 1  # unchanged file: hashed once, not every pass
    next_command = CheckedImages(keeper.registry)
    assert next_command.resolve("tiny").version == 1
    assert next_command.checker.hashed == 0  # nor by the next command on this machine

    disk = Path(record.directory) / "disk.qcow2"
    os.chmod(disk, 0o644)
    data = bytearray(disk.read_bytes())
    data[100] ^= 0x01
    disk.write_bytes(bytes(data))  # same size, one bit different
    with pytest.raises(ArtifactMismatchError, match=r"tiny v1: .*disk.qcow2 differs from the"):
        keeper.resolve("tiny", "latest")
    with pytest.raises(ArtifactMismatchError):
        keeper.resolve("tiny", 1)


def test_a_missing_image_file_is_refused_too(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    record = registry.register(_new(tmp_path, "1"))
    os.chmod(record.directory, 0o755)
    (Path(record.directory) / "disk.qcow2").unlink()
    with pytest.raises(ArtifactMismatchError, match="unreadable"):
        CheckedImages(registry).resolve("tiny")


def test_a_pool_on_a_corrupted_version_makes_no_desktop_and_says_why(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    record = registry.register(_new(tmp_path, "1"))
    images = CheckedImages(registry)
    hypervisor = FakeHypervisor()
    hypervisor.add_base(record.base_image())  # the hypervisor alone would clone it
    spec = PoolSpec(
        name="lab", image="tiny", initial=2, free=2, max=4, port_first=5900, port_last=5903
    )
    assert observe(hypervisor, FakeBalancer(), images, [spec]).pools["lab"].base_ready

    disk = Path(record.directory) / "disk.qcow2"
    os.chmod(disk, 0o644)
    with disk.open("r+b") as handle:
        handle.seek(7)
        handle.write(b"X")
    host = observe(hypervisor, FakeBalancer(), images, [spec])
    assert not host.pools["lab"].base_ready
    assert "disk.qcow2 differs from the registry" in host.notes["lab"]


def test_a_local_registry_given_an_empty_remote_pushes_its_history_on_the_next_write(
    tmp_path: Path,
) -> None:
    local = Registry(tmp_path / "a" / "registry", tmp_path / "images")
    local.register(_new(tmp_path, "1"))
    local.promote("tiny", 1, "stable")
    remote = _bare(tmp_path)
    shared = _registry(tmp_path, "a", remote)  # the same folder, now with registry_remote
    shared.register(_new(tmp_path, "2"))
    other = _registry(tmp_path, "b", remote)
    assert [r.version for r in other.versions("tiny")] == [1, 2]
    assert other.resolve("tiny", "stable").version == 1
    assert {t.name for t in git.Repo(remote).tags} == {"tiny/v1", "tiny/v2"}


def test_a_registry_with_a_history_unrelated_to_the_remote_is_refused_and_kept(
    tmp_path: Path,
) -> None:
    remote = _bare(tmp_path)
    _registry(tmp_path, "a", remote).register(_new(tmp_path, "1"))
    own = Registry(tmp_path / "b" / "registry", tmp_path / "images-b")
    own.register(_new(tmp_path, "2"))
    head = git.Repo(own.path).head.commit.hexsha
    with pytest.raises(BadInputError, match=r"has versions or moves the remote .* lacks"):
        _registry(tmp_path, "b", remote, store="images-b").promote("tiny", 1, "stable")
    repo = git.Repo(own.path)
    assert repo.head.commit.hexsha == head
    assert [r.name for r in repo.remotes] == []
    assert [r.fingerprint for r in own.versions("tiny")] == ["fp-2"]
