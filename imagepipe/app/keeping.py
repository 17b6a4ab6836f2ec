"""Running the keeper: choose pools, judge a pass, stop cleanly on signals.

Shared by `imagepipe keep` and `imagepipe demo` (both drive the keeper the same way).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.pool.keeper import Keeper, PassReport
from imagepipe.pool.model import PoolSpec


def select_pools(specs: Sequence[PoolSpec], wanted: Sequence[str]) -> list[PoolSpec]:
    if not wanted:
        return list(specs)
    known = {s.name: s for s in specs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise BadInputError(f"no pool named {', '.join(unknown)} (configured pools: {names})")
    return [known[w] for w in wanted]


def fail_if_failed(report: PassReport) -> None:
    failed = report.execution.failed
    if failed:
        first = failed[0]
        raise OperationFailedError(
            f"{len(failed)} of {len(report.execution.outcomes)} actions failed; first: "
            f"{first.action.kind} {first.action.clone}: {first.error}"
        )
    if report.not_planned:
        pool, why = next(iter(report.not_planned.items()))
        raise OperationFailedError(f"pool {pool} was not reconciled: {why}")
    for pool, why in report.notes.items():
        observed = report.observation.pools.get(pool)
        if observed is None or observed.target_version is None:  # no version to run at all;
            # a base that is only busy right now (being updated) is not a failure
            raise OperationFailedError(f"pool {pool} cannot make desktops: {why}")


class stop_on_signals:
    """SIGTERM and SIGINT call keeper.stop(); the previous handlers come back afterwards."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.keeper.stop()

    def __enter__(self) -> stop_on_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
