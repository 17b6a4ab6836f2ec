"""The pool over simulated time, for charts: what users and desktops did, sampled.

A sample holds the state between events (nothing changes between two events), taken at a
fixed interval: desktops in use, free and ready, starting; users waiting; and what
accumulated since the first midnight (logins, logins that had to wait, idle desktop-hours).
Recording samples changes nothing the simulation measures.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    at: float  # seconds after the first simulated midnight
    arrived: int  # logins so far
    in_use: int  # desktops with a user on them
    free_ready: int  # desktops the balancer would give the next user
    starting: int  # desktops being made or coming up (the keeper's creating and booting)
    waiting: int  # users waiting for a desktop now
    waited: int  # logins so far that found no ready desktop at once
    idle_hours: float  # idle desktop-hours so far (running, nobody on them)


@dataclass(frozen=True)
class Timeline:
    """A run's samples, every `interval` seconds; `epoch` is the first simulated midnight
    (seconds since the epoch) and `timezone` the pool's, so samples have local times."""

    interval: float
    epoch: float
    timezone: str
    samples: tuple[Sample, ...]
