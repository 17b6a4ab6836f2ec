"""Placement: which host a new desktop goes to.

A new desktop goes to a host the pool may use (connected, not draining, named by the pool,
holding the version, its circuit breaker closed: HostRoom.usable) that has room left for
one more desktop of this size (desktops and memory), and among those to the least loaded:
fewest desktops, then least memory given out, then the name, so equal loads always give the
same answer. No host qualifies: no desktop is made this pass.

Pure and linear: one Placer per pass, each pick looks at every host once and counts the new
desktop on the chosen host, so the next pick of the same pass sees it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from imagepipe.pool.model import HostRoom

SINGLE_HOST = HostRoom(name="", address="", usable=True)


@dataclass(slots=True)
class _Load:
    room: HostRoom
    desktops: int
    memory: int

    def fits(self, memory: int) -> bool:
        room = self.room
        if room.max_desktops is not None and self.desktops + 1 > room.max_desktops:
            return False
        return room.max_memory is None or self.memory + memory <= room.max_memory


class Placer:
    """The hosts of one pass, with the desktops placed so far counted on them."""

    def __init__(self, hosts: Iterable[HostRoom]) -> None:
        self._hosts = hosts
        self._counted: list[_Load] | None = None  # at the first pick (most passes place none)

    @property
    def _loads(self) -> list[_Load]:
        if self._counted is None:
            rooms = tuple(self._hosts) or (SINGLE_HOST,)
            self._counted = [_Load(r, r.desktops, r.memory) for r in rooms if r.usable]
        return self._counted

    def pick(self, memory: int) -> HostRoom | None:
        """The host for one new desktop of `memory` bytes, counted there; None: none has
        room (or none may be used)."""
        best: _Load | None = None
        for load in self._loads:
            if not load.fits(memory):
                continue
            if best is None or (load.desktops, load.memory, load.room.name) < (
                best.desktops,
                best.memory,
                best.room.name,
            ):
                best = load
        if best is None:
            return None
        best.desktops += 1
        best.memory += memory
        return best.room

    def can_place(self, memory: int) -> bool:
        return any(load.fits(memory) for load in self._loads)
