"""Built-in login profiles: deterministic for a given seed."""

from __future__ import annotations

import random
from collections.abc import Callable

from imagepipe.errors import BadInputError
from imagepipe.sim.trace import Login

HOUR = 3600.0
MINUTE = 60.0


def _lognormal_minutes(rng: random.Random, median: float, spread: float) -> float:
    return max(5.0, rng.lognormvariate(0.0, spread) * median) * MINUTE


def morning_storm(users: int, rng: random.Random) -> list[Login]:
    """Everybody arrives around 08:30 (±10 min), works about 3 h, some come back after lunch."""
    logins: list[Login] = []
    for i in range(users):
        at = max(7 * HOUR, rng.gauss(8.5 * HOUR, 10 * MINUTE))
        logins.append(Login(f"user{i}", at, _lognormal_minutes(rng, 180, 0.25)))
        if rng.random() < 0.6:
            back = rng.gauss(13.25 * HOUR, 15 * MINUTE)
            logins.append(Login(f"user{i}", back, _lognormal_minutes(rng, 150, 0.3)))
    return logins


def steady(users: int, rng: random.Random) -> list[Login]:
    """Logins spread evenly over 08:00-18:00; sessions of about 45 minutes."""
    return [
        Login(f"user{i}", rng.uniform(8 * HOUR, 18 * HOUR), _lognormal_minutes(rng, 45, 0.5))
        for i in range(users)
    ]


def evening(users: int, rng: random.Random) -> list[Login]:
    """A training evening: logins 18:00-19:00, sessions of about 2 hours."""
    return [
        Login(f"user{i}", rng.uniform(18 * HOUR, 19 * HOUR), _lognormal_minutes(rng, 120, 0.3))
        for i in range(users)
    ]


def classes(users: int, rng: random.Random) -> list[Login]:
    """A computer lab: classes start on the hour 08:00-15:00, each of about users/4 students,
    logging in within 5 minutes and out after about 45 minutes."""
    logins: list[Login] = []
    class_size = max(1, users // 4)
    for i in range(users):
        hour = 8 + (i // class_size) % 8
        at = hour * HOUR + rng.uniform(0, 5 * MINUTE)
        logins.append(Login(f"user{i}", at, rng.uniform(40, 50) * MINUTE))
    return logins


PROFILES: dict[str, Callable[[int, random.Random], list[Login]]] = {
    "morning-storm": morning_storm,
    "steady": steady,
    "evening": evening,
    "classes": classes,
}


def make_profile(name: str, users: int, seed: int) -> list[Login]:
    """The logins of a built-in profile, sorted by time; same seed, same day."""
    if name not in PROFILES:
        known = ", ".join(sorted(PROFILES))
        raise BadInputError(f"unknown profile {name!r}; choose one of: {known}")
    if users < 1:
        raise BadInputError(f"--users must be at least 1, got {users}")
    logins = PROFILES[name](users, random.Random(seed))
    return sorted(logins, key=lambda login: (login.at, login.user))
