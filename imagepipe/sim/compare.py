"""The columns of `imagepipe simulate`: the pool as configured, and what it is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from imagepipe.pool.model import LearnSpec, PoolSpec
from imagepipe.record import replace
from imagepipe.sim.engine import SimSettings, simulate
from imagepipe.sim.policies import POLICIES
from imagepipe.sim.report import SimRun
from imagepipe.sim.trace import Login
from imagepipe.sim.world import Start

# original: the original tool's policy; boot, restore: the pool started that way;
# learned, fixed: the pool with learning on (its own `learn`, else the defaults) or off
COMPARISONS = ("original", "boot", "restore", "learned", "fixed")


@dataclass(frozen=True)
class Variant:
    label: str
    spec: PoolSpec
    policy: str
    start: Start


def variants(spec: PoolSpec, start: Start, compare: list[str]) -> list[Variant]:
    """The pool as configured ("imagepipe"), then one column per comparison, each changing
    one thing. ValueError names an unknown comparison."""
    out = [Variant("imagepipe", spec, "imagepipe", start)]
    for name in dict.fromkeys(compare):
        if name == "original":
            out.append(Variant(name, spec, "original", Start.BOOT))
        elif name in ("boot", "restore"):
            out.append(Variant(name, spec, "imagepipe", Start(name)))
        elif name == "learned":
            out.append(
                Variant(name, replace(spec, learn=spec.learn or LearnSpec()), "imagepipe", start)
            )
        elif name == "fixed":
            out.append(Variant(name, replace(spec, learn=None), "imagepipe", start))
        else:
            raise ValueError(f"expected one of {', '.join(COMPARISONS)}, got {name!r}")
    return out


def compare_runs(
    spec: PoolSpec,
    days: list[list[Login]],
    settings: SimSettings,
    compare: list[str],
) -> list[SimRun]:
    """Every column's run of the same days (settings.start: how the pool starts desktops,
    None: as its pool file says)."""
    start = spec.start if settings.start is None else settings.start
    return [
        simulate(v.spec, days, POLICIES[v.policy], replace(settings, start=v.start), v.label)
        for v in variants(spec, start, compare)
    ]
