"""What a learning pool's login history teaches: one reading shared by the keeper (which keeps
it for the day) and the status read model (which shows the keeper's target)."""

from __future__ import annotations

from dataclasses import dataclass

from imagepipe.pool.model import Arrivals
from imagepipe.pool.planner.forecast import BUCKET, HISTORY_DAYS, learn
from imagepipe.pool.store import Store


@dataclass(frozen=True)
class Learned:
    arrivals: Arrivals | None  # None: not enough history yet
    days: int  # days of history it was learned from


def learned(store: Store, pool: str, day: int) -> Learned:
    """The arrivals to expect on `day` from the history before it (today never counts)."""
    history = store.login_history(pool, seconds=BUCKET, since_day=day - HISTORY_DAYS)
    return Learned(learn(history, day), len(history.days))
