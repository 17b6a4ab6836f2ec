"""Registry reads are cached by file signature: a keeper pass that resolves every pool's
image parses nothing unchanged, and still sees what another process registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.errors import BadInputError
from imagepipe.images.registry import Registry
from tests.unit.test_images_registry import _register


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", tmp_path / "images")


def test_resolving_again_parses_no_file_that_did_not_change(
    registry: Registry, tmp_path: Path
) -> None:
    for tag in ("a", "b", "c"):
        _register(registry, tmp_path, tag)
    keeper = Registry(registry.path, registry.store_dir)  # the keeper's own instance
    keeper.resolve("tiny", "latest")
    first = keeper.parsed
    assert first == 4  # three records and state.json
    for _pass in range(50):  # fifty keeper passes over ten pools on this image
        for _pool in range(10):
            assert keeper.resolve("tiny", "latest").version == 3
    assert keeper.parsed == first


def test_a_version_another_process_registers_is_seen_on_the_next_resolve(
    registry: Registry, tmp_path: Path
) -> None:
    _register(registry, tmp_path, "a")
    keeper = Registry(registry.path, registry.store_dir)
    assert keeper.resolve("tiny", "latest").version == 1
    other_process = Registry(registry.path, registry.store_dir)
    _register(other_process, tmp_path, "b")
    assert keeper.resolve("tiny", "latest").version == 2
    assert keeper.parsed == 2 + 2  # first: record + state; then: the new record + new state


def test_a_promotion_and_a_revocation_by_another_process_are_seen(
    registry: Registry, tmp_path: Path
) -> None:
    _register(registry, tmp_path, "a")
    _register(registry, tmp_path, "b")
    keeper = Registry(registry.path, registry.store_dir)
    assert keeper.resolve("tiny", "latest").version == 2
    other = Registry(registry.path, registry.store_dir)
    other.promote("tiny", 1, "stable")
    assert keeper.resolve("tiny", "stable").version == 1
    other.revoke("tiny", 2, "broken")
    assert keeper.resolve("tiny", "latest").version == 1


def test_a_record_corrupted_after_it_was_cached_is_reported(
    registry: Registry, tmp_path: Path
) -> None:
    _register(registry, tmp_path, "a")
    keeper = Registry(registry.path, registry.store_dir)
    keeper.resolve("tiny")
    record = registry.path / "images" / "tiny" / "versions" / "v0001.json"
    record.write_text("{not json")
    with pytest.raises(BadInputError, match=r"v0001\.json is corrupt"):
        keeper.resolve("tiny")
