"""Which versions `imagepipe images prune --keep N` may remove, and removing them.

Never removed: the N newest active versions, any version a channel points at, any version a
pool asks for (by number or through its channel, or as its rollout target), and any version a
clone recorded in the state store still runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from imagepipe.errors import BadInputError
from imagepipe.images.records import ChannelMove, Status, VersionRecord
from imagepipe.images.registry import Registry
from imagepipe.pool.model import PoolRecord, PoolSpec
from imagepipe.pool.store import CloneRecords


@dataclass(frozen=True)
class PruneChoice:
    record: VersionRecord
    remove: bool
    reason: str  # why it is kept, or "prunable"


def choose(
    versions: Sequence[VersionRecord],
    channels: dict[str, tuple[ChannelMove, ...]],
    in_use: dict[int, str],
    keep: int,
) -> list[PruneChoice]:
    """Pure: one choice per version that still has artifacts, oldest first."""
    if keep < 1:
        raise BadInputError("--keep must be at least 1: the newest version is always kept")
    newest = {r.version for r in [v for v in versions if v.usable][-keep:]}
    pinned = {history[-1].version: name for name, history in channels.items() if history}
    choices = []
    for record in versions:
        if record.status is Status.PRUNED:
            continue
        if record.version in newest:
            choices.append(PruneChoice(record, False, f"one of the {keep} newest"))
        elif record.version in pinned:
            choices.append(PruneChoice(record, False, f"channel {pinned[record.version]}"))
        elif record.version in in_use:
            choices.append(PruneChoice(record, False, in_use[record.version]))
        else:
            choices.append(PruneChoice(record, True, "prunable"))
    return choices


def versions_in_use(
    registry: Registry, image: str, pools: Iterable[PoolSpec], records: dict[str, PoolRecord]
) -> dict[int, str]:
    """version -> why it is in use ("pool lab", "clone lab-3")."""
    used: dict[int, str] = {}
    for spec in pools:
        if spec.image != image:
            continue
        if spec.version is not None:
            used.setdefault(spec.version, f"pool {spec.name}")
        elif spec.channel is not None:
            with contextlib.suppress(BadInputError):  # a channel resolving to nothing pins nothing
                used.setdefault(registry.resolve(image, spec.channel).version, f"pool {spec.name}")
        record = records.get(spec.name)
        if record is None:
            continue
        if record.target_version is not None:
            used.setdefault(record.target_version, f"pool {spec.name} rollout")
        for clone in record.clones.values():
            used.setdefault(clone.version, f"clone {clone.name}")
    return used


def load_pool_records(store: CloneRecords, pools: Iterable[PoolSpec]) -> dict[str, PoolRecord]:
    """What the keeper remembers about each pool; empty records when it has never run."""
    return {spec.name: store.load_pool(spec.name) for spec in pools}
