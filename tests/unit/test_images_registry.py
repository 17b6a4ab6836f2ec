"""The image registry: versions are never lost, reused or overwritten; channels move."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import git
import pytest

from imagepipe.errors import BadInputError
from imagepipe.images.checksum import sha256_file
from imagepipe.images.prune import choose
from imagepipe.images.records import Status
from imagepipe.images.registry import NewVersion, Registry


def _artifact(folder: Path, name: str, content: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(content)
    return path


def _register(registry: Registry, tmp: Path, tag: str, image: str = "tiny") -> int:
    disk = _artifact(tmp / f"build-{tag}", "disk.qcow2", f"disk {tag}")
    new = NewVersion(
        image=image,
        fingerprint=f"fp-{tag}",
        builder="qemu",
        packer_version="1.6.6",
        files=(disk,),
        disk="disk.qcow2",
        cmdline="console=ttyS0",
    )
    return registry.register(new).version


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", tmp_path / "images")


def test_registering_moves_artifacts_into_a_read_only_store_and_tags_the_commit(
    registry: Registry, tmp_path: Path
) -> None:
    disk = _artifact(tmp_path / "build", "disk.qcow2", "hello")
    digest = sha256_file(disk)
    record = registry.register(
        NewVersion(
            image="tiny",
            fingerprint="abc",
            builder="qemu",
            packer_version="1.6.6",
            files=(disk,),
            disk="disk.qcow2",
            kernel=None,
        )
    )
    assert record.version == 1
    stored = tmp_path / "images" / "tiny" / "v1" / "disk.qcow2"
    assert not disk.exists()
    assert sha256_file(stored) == digest == record.artifacts[0].sha256
    assert not os.stat(stored).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert record.base_image().directory == stored.parent
    assert record.base_image().disk == "disk.qcow2"
    repo = git.Repo(tmp_path / "registry")
    tag = repo.tags["tiny/v1"]
    assert tag.tag is not None  # annotated
    assert "fingerprint abc" in tag.tag.message
    assert registry.resolve("tiny").version == 1


def test_versions_count_up_and_latest_follows(registry: Registry, tmp_path: Path) -> None:
    assert [_register(registry, tmp_path, t) for t in "abc"] == [1, 2, 3]
    assert registry.resolve("tiny", "latest").version == 3
    assert registry.resolve("tiny", "v2").version == 2
    assert registry.resolve("tiny", 1).fingerprint == "fp-a"
    assert [m.version for m in registry.channels("tiny")["latest"]] == [1, 2, 3]


def test_sixteen_parallel_writers_get_sixteen_distinct_versions(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    with context.Pool(16) as pool:
        numbers = pool.starmap(_register_in_process, [(tmp_path, str(i)) for i in range(16)])
    assert sorted(numbers) == list(range(1, 17))
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    assert sorted(r.fingerprint for r in registry.versions("tiny")) == sorted(
        f"fp-{i}" for i in range(16)
    )
    repo = git.Repo(tmp_path / "registry")
    assert {t.name for t in repo.tags} == {f"tiny/v{n}" for n in range(1, 17)}
    assert len(registry.channels("tiny")["latest"]) == 16
    assert not repo.is_dirty(untracked_files=True)


def _register_in_process(tmp_path: Path, tag: str) -> int:
    return _register(Registry(tmp_path / "registry", tmp_path / "images"), tmp_path, tag)


def test_a_version_number_is_never_reused_after_a_leftover_store_folder(
    registry: Registry, tmp_path: Path
) -> None:
    _register(registry, tmp_path, "a")
    (tmp_path / "images" / "tiny" / "v2").mkdir()  # left by a crash mid-registration
    assert _register(registry, tmp_path, "b") == 3


def test_promote_rollback_and_revoke_move_channels(registry: Registry, tmp_path: Path) -> None:
    for tag in "abc":
        _register(registry, tmp_path, tag)
    registry.promote("tiny", 1, "stable")
    registry.promote("tiny", 2, "stable")
    assert registry.resolve("tiny", "stable").version == 2
    assert registry.rollback("tiny", "stable").version == 1
    assert registry.resolve("tiny", "stable").version == 1
    registry.revoke("tiny", 3, "blue screen on boot")
    assert registry.resolve("tiny", 3).status is Status.REVOKED
    assert registry.resolve("tiny", "latest").version == 2  # latest moved back off v3
    with pytest.raises(BadInputError, match="revoked"):
        registry.promote("tiny", 3, "stable")


def test_bad_references_fail_with_what_exists(registry: Registry, tmp_path: Path) -> None:
    _register(registry, tmp_path, "a")
    with pytest.raises(BadInputError, match=r"no version 9 \(versions: v1\)"):
        registry.resolve("tiny", 9)
    with pytest.raises(BadInputError, match=r"no channel 'stable' \(channels: latest\)"):
        registry.resolve("tiny", "stable")
    with pytest.raises(BadInputError, match="no registered versions"):
        registry.resolve("win10")
    with pytest.raises(BadInputError, match="no earlier usable version"):
        registry.rollback("tiny", "latest")


def test_a_corrupt_registry_file_is_reported_not_guessed(
    registry: Registry, tmp_path: Path
) -> None:
    _register(registry, tmp_path, "a")
    record = tmp_path / "registry" / "images" / "tiny" / "versions" / "v0001.json"
    record.write_text('{"image": "tiny"')
    with pytest.raises(BadInputError, match=r"registry file .*v0001.json is corrupt"):
        registry.versions("tiny")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("version", "1", "version: expected a whole number, got '1'"),
        ("source_dirty", "yes", "source_dirty: expected true or false, got 'yes'"),
        ("status", "gone", "status: expected 'active', 'revoked' or 'pruned', got 'gone'"),
        ("artifacts", [{"name": "a"}], "artifacts.0.size: required key is missing"),
        ("colour", "red", "colour: unknown key"),
    ],
)
def test_a_record_field_of_the_wrong_kind_is_named(
    registry: Registry, tmp_path: Path, key: str, value: object, words: str
) -> None:
    """Nothing the registry wrote is coerced on reading: a wrong value is corruption."""
    _register(registry, tmp_path, "a")
    record = tmp_path / "registry" / "images" / "tiny" / "versions" / "v0001.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), key: value}))
    with pytest.raises(BadInputError) as caught:
        Registry(tmp_path / "registry", tmp_path / "images").versions("tiny")
    assert str(caught.value).startswith(f"registry file {record} is corrupt: {words}")


def test_a_registry_path_that_is_not_a_git_repository_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "registry"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    registry = Registry(folder, tmp_path / "images")
    with pytest.raises(BadInputError, match="not a git repository"):
        _register(registry, tmp_path, "a")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "images" / "tiny").exists()


def test_prune_keeps_newest_channels_and_versions_in_use(
    registry: Registry, tmp_path: Path
) -> None:
    for tag in "abcde":
        _register(registry, tmp_path, tag)
    registry.promote("tiny", 1, "stable")
    choices = choose(registry.versions("tiny"), registry.channels("tiny"), {2: "clone lab-3"}, 2)
    assert {c.record.version: c.reason for c in choices} == {
        1: "channel stable",
        2: "clone lab-3",
        3: "prunable",
        4: "one of the 2 newest",
        5: "one of the 2 newest",
    }
    registry.prune("tiny", 3, "test")
    assert registry.resolve("tiny", 3).status is Status.PRUNED
    assert not (tmp_path / "images" / "tiny" / "v3").exists()
    assert (tmp_path / "images" / "tiny" / "v2" / "disk.qcow2").exists()


def test_the_keeper_removes_from_hosts_only_versions_the_registry_pruned(
    registry: Registry, tmp_path: Path
) -> None:
    """What the keeper's host tidy asks (multihost.tidy_with): pruned → may go; active,
    revoked or unknown → stays."""
    from imagepipe.app.bootstrap import pruned_in
    from imagepipe.config import Settings

    for tag in "abc":
        _register(registry, tmp_path, tag)
    registry.prune("tiny", 1, "test")
    registry.revoke("tiny", 2, "bad")
    pruned = pruned_in(Settings(registry=registry.path, image_store=tmp_path / "images"))
    assert [pruned("tiny", v) for v in (1, 2, 3, 4)] == [True, False, False, False]
    assert pruned("other", 1) is False
