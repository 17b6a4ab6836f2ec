"""observe(): what really exists, per pool, in one pass.

One inventory call to the hypervisor (list_clones), one session query per running clone,
one list of the balancer's backends, and the registry's answer to "which version should this
pool run". The hypervisor is the truth for what exists; clones carry their pool in their own
metadata, so clones of pools that are no longer configured are reported (never deleted
silently), and so are balancer entries that belong to no clone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imagepipe.errors import CloneNotFoundError, ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.model import (
    Backend,
    CloneInfo,
    GuestSession,
    InstanceHealth,
    Observed,
    ObservedClone,
    PoolSpec,
    Power,
)
from imagepipe.pool.ports import Balancer, BalancerInstances, Hypervisor, Images, ImageVersion

log = logging.getLogger(__name__)


def _nothing() -> None:
    """The default `progress` of observe(): nobody to tell."""


@dataclass(frozen=True)
class HostObservation:
    """One pass's view of the host."""

    pools: Mapping[str, Observed] = field(default_factory=dict)
    # pools that could not be observed safely this pass (the keeper does not plan them)
    unobservable: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)  # pool -> e.g. image not found
    stray_clones: tuple[CloneInfo, ...] = ()  # clones of pools that are not configured
    stray_backends: tuple[Backend, ...] = ()  # backends of no configured pool and no clone
    balancer_error: str | None = None
    # a balancer of several instances: each one, reachable or not (else empty)
    balancer_instances: tuple[InstanceHealth, ...] = ()
    # observe(partial=True), for `status`: what could be read of the unobservable pools
    # (their clones; a clone in `unread_sessions` has an empty session that is not known)
    partial: Mapping[str, Observed] = field(default_factory=dict)
    unread_sessions: frozenset[str] = frozenset()


def belongs_to(pool: str, name: str) -> bool:
    """Whether a clone or backend name has this pool's `<pool>-<slot>` form."""
    return re.fullmatch(re.escape(pool) + r"-\d+", name) is not None


def target_version(images: Images, spec: PoolSpec) -> ImageVersion:
    """The version the pool should run now: its pinned version, else its channel's."""
    ref: str | int | None = spec.version if spec.version is not None else spec.channel
    return images.resolve(spec.image, ref)


def observe(
    hypervisor: Hypervisor,
    balancer: Balancer,
    images: Images,
    specs: Sequence[PoolSpec],
    *,
    also_configured: Collection[str] = (),
    partial: bool = False,
    unchanged: Callable[[CloneInfo, Backend | None], bool] | None = None,
    parallel: int = 1,
    progress: Callable[[], None] = _nothing,
) -> HostObservation:
    """`specs`: the pools to observe. `also_configured`: pools that exist in the
    configuration but are not looked after here (`keep --pool`); their clones are not strays.
    `partial`: a pool whose sessions cannot all be read is still unobservable (nothing may
    be planned on it), and the rest of it is read and reported too (`status`).
    `unchanged`: the running clones nobody can be on (the keeper knows them free or booting,
    the balancer has no connection and no new session on them, and no event said a client
    connected): their session is not asked for; it is empty. `parallel`: session reads run
    this many at once (several hosts: a pass takes as long as the slowest host).
    `progress`: called each time a host or balancer call has returned (or failed), from the
    thread that made it: an observation of many slow calls is alive while each one ends
    (the keeper's wedge rule counts only a single call stuck for too long)."""
    clones = hypervisor.list_clones()
    progress()
    balancer_error = None
    try:
        backends = balancer.list_backends()
    except ImagepipeError as exc:
        balancer_error = str(exc)
        backends = []
        log.warning("cannot read the balancer", extra=fields(error=balancer_error))
    progress()
    by_backend = {b.name: b for b in backends}
    configured = {s.name for s in specs} | set(also_configured)
    pools: dict[str, Observed] = {}
    unobservable: dict[str, str] = {}
    notes: dict[str, str] = {}
    ready_cache: dict[tuple[str, int], bool] = {}
    partly: dict[str, Observed] = {}
    unread: set[str] = set()
    for spec in specs:
        mine = [c for c in clones if c.pool == spec.name]
        observed, missed, error = _observe_clones(
            hypervisor,
            mine,
            by_backend,
            partial=partial,
            unchanged=unchanged,
            parallel=parallel,
            progress=progress,
        )
        if error is not None:
            unobservable[spec.name] = f"cannot read sessions: {error}"
            log.warning(
                "pool not planned this pass: its sessions cannot be read",
                extra=fields(pool=spec.name, error=str(error)),
            )
            if not partial:
                continue
            unread |= missed
        names = {c.info.name for c in observed}
        orphans = tuple(
            b for b in backends if belongs_to(spec.name, b.name) and b.name not in names
        )
        version, ready, note = _target(hypervisor, images, spec, ready_cache)
        progress()
        if note:
            notes[spec.name] = note
        seen = Observed(
            clones=tuple(observed),
            orphan_backends=orphans,
            target_version=version,
            base_ready=ready,
        )
        if error is None:
            pools[spec.name] = seen
        else:
            partly[spec.name] = seen
    strays = tuple(c for c in clones if c.pool not in configured)
    clone_names = {c.name for c in clones}
    stray_backends = tuple(
        b
        for b in backends
        if b.name not in clone_names and not any(belongs_to(p, b.name) for p in configured)
    )
    return HostObservation(
        pools=pools,
        unobservable=unobservable,
        notes=notes,
        stray_clones=strays,
        stray_backends=stray_backends,
        balancer_error=balancer_error,
        balancer_instances=(
            tuple(balancer.health()) if isinstance(balancer, BalancerInstances) else ()
        ),
        partial=partly,
        unread_sessions=frozenset(unread),
    )


def _observe_clones(
    hypervisor: Hypervisor,
    clones: Sequence[CloneInfo],
    backends: Mapping[str, Backend],
    *,
    partial: bool,
    unchanged: Callable[[CloneInfo, Backend | None], bool] | None = None,
    parallel: int = 1,
    progress: Callable[[], None] = _nothing,
) -> tuple[list[ObservedClone], set[str], ImagepipeError | None]:
    """The clones with their sessions; the clones whose session could not be read, and the
    first error. Stops at that error unless `partial`."""
    ask = [
        info.name
        for info in clones
        if info.power is Power.RUNNING
        and (unchanged is None or not unchanged(info, backends.get(info.name)))
    ]
    answers = _sessions(hypervisor, ask, parallel, stop_at_error=not partial, progress=progress)
    observed = []
    missed: set[str] = set()
    error: ImagepipeError | None = None
    for info in clones:
        session = GuestSession()
        answer = answers.get(info.name)
        if isinstance(answer, CloneNotFoundError):
            continue  # deleted between the inventory and now: it does not exist
        if isinstance(answer, ImagepipeError):
            error = error or answer
            if not partial:
                break
            missed.add(info.name)
        elif answer is not None:
            session = answer
        observed.append(ObservedClone(info=info, session=session, backend=backends.get(info.name)))
    return observed, missed, error


def _sessions(
    hypervisor: Hypervisor,
    names: Sequence[str],
    parallel: int,
    *,
    stop_at_error: bool,
    progress: Callable[[], None],
) -> dict[str, GuestSession | ImagepipeError]:
    """Each clone's session, or the error reading it raised; `progress` after each read."""

    def read(name: str) -> GuestSession | ImagepipeError:
        try:
            return hypervisor.sessions(name)
        except ImagepipeError as exc:
            return exc
        finally:
            progress()

    if parallel <= 1 or len(names) <= 1:
        answers: dict[str, GuestSession | ImagepipeError] = {}
        for name in names:
            answers[name] = answer = read(name)
            failed = isinstance(answer, ImagepipeError)
            if failed and stop_at_error and not isinstance(answer, CloneNotFoundError):
                break  # the pool is unobservable: the rest need not be asked
        return answers
    with ThreadPoolExecutor(max_workers=min(parallel, len(names))) as pool:
        return dict(zip(names, pool.map(read, names), strict=True))


def _target(
    hypervisor: Hypervisor,
    images: Images,
    spec: PoolSpec,
    ready_cache: dict[tuple[str, int], bool],
) -> tuple[int | None, bool, str | None]:
    try:
        version = target_version(images, spec)
    except ImagepipeError as exc:
        return None, False, str(exc)
    key = (spec.image, version.version)
    if key not in ready_cache:
        try:
            ready_cache[key] = hypervisor.base_ready(version.base_image())
        except ImagepipeError as exc:
            ready_cache[key] = False
            return version.version, False, f"base of {spec.image} v{version.version}: {exc}"
    ready = ready_cache[key]
    note = None if ready else f"base of {spec.image} v{version.version} is not ready to clone"
    return version.version, ready, note
