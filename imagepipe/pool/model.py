"""Domain types of a pool: what is wanted (PoolSpec), what exists (Observed), what is
remembered (PoolRecord), and what a hypervisor needs to make a clone (CloneSpec). What to
do about the difference (Action) is in imagepipe.pool.actions.

Plain frozen dataclasses: no I/O, no adapter types. The planner reads these and returns
Actions; adapters produce CloneInfo/Backend; the store persists PoolRecord.

Times are float seconds since the epoch (UTC), always passed in, never read from a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

from imagepipe.record import Record, field

# --------------------------------------------------------------------------------------
# What is wanted
# --------------------------------------------------------------------------------------


class CloneMode(StrEnum):
    LINKED = "linked"  # copy-on-write overlay on the base image
    FULL = "full"  # an independent copy of the base disk


class OnLogoff(StrEnum):
    RESET = "reset"  # restore the clean snapshot: the next user never sees this session
    KEEP = "keep"  # persistent desktop: leave it as the user left it
    DELETE = "delete"  # remove the clone; the pool makes a fresh one if it needs one


class StartMode(StrEnum):
    BOOT = "boot"  # a new or recycled clone boots its guest from scratch
    RESTORE = "restore"  # it restores the saved state of a warm parent (instant desktops)


class Standby(StrEnum):
    NONE = "none"  # idle surplus clones are deleted after shrink_after
    SUSPEND = "suspend"  # idle surplus clones are suspended instead, and resumed on demand


class ScheduleRule(Record, kw_only=False):
    """Between start and end (minutes after local midnight) on the given weekdays
    (0 = Monday), keep `free` ready clones instead of the pool's default."""

    days: frozenset[int]
    start_minute: int
    end_minute: int
    free: int


class LearnSpec(Record, kw_only=False):
    """Learned warm-up (pool key `learn`): keep free the desktops for the logins expected
    within `lead`, learned from the logins of past days by time of week."""

    lead: float = 600.0  # look this far ahead (seconds)
    shrink_after: float = 300.0  # surplus over the learned target idle this long goes
    min_free: int | None = None  # allows fewer free than `free` when quiet; None: never


class Endpoint(Record, kw_only=False):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class PoolSpec(Record, kw_only=False):
    """A validated pool, in plain values (config.py builds it from a pool file)."""

    name: str
    image: str
    channel: str | None = "latest"  # exactly one of channel / version is set
    version: int | None = None
    clone: CloneMode = CloneMode.LINKED
    start: StartMode = StartMode.RESTORE  # where the hypervisor can; else it boots
    initial: int = 1
    free: int = 1
    max: int = 5
    cpus: int = 1
    memory: int = 256 * 1024**2  # bytes
    port_first: int = 5900
    port_last: int = 5999
    display_address: str = "127.0.0.1"
    on_logoff: OnLogoff = OnLogoff.RESET
    recycle_after: float = 60.0
    disconnect_timeout: float = 8 * 3600.0
    shrink_after: float = 2 * 3600.0
    standby: Standby = Standby.NONE
    schedule: tuple[ScheduleRule, ...] = ()
    learn: LearnSpec | None = None  # learned warm-up (a pool file's default); None: fixed target
    timezone: str = "UTC"
    assignments: Mapping[str, int] = field(default_factory=dict)  # user -> slot
    boot_timeout: float = 300.0  # a clone not ready this long after start has failed
    max_failures: int = 5  # consecutive failures that open the pool's circuit breaker
    retry_backoff: float = 10.0  # first retry delay; doubles per consecutive failure
    breaker_cooldown: float = 600.0  # how long an open breaker stops new clones
    drain_deadline: float | None = None  # rollout: force old clones off after this long
    hosts: tuple[str, ...] = ()  # host names and `label:X` it may run on; empty: every host
    source: str = ""  # the file this pool came from, for messages

    def clone_name(self, slot: int) -> str:
        return f"{self.name}-{slot}"

    def port_for(self, slot: int) -> int:
        return self.port_first + slot

    def may_use(self, host: HostSpec) -> bool:
        """Whether this pool may put desktops on `host` (pool key `hosts`)."""
        if not self.hosts:
            return True
        return host.name in self.hosts or any(f"label:{x}" in self.hosts for x in host.labels)

    @property
    def slots(self) -> int:
        """How many clones the port range has room for."""
        return self.port_last - self.port_first + 1


# --------------------------------------------------------------------------------------
# What exists (observed from the hypervisor and the balancer)
# --------------------------------------------------------------------------------------


class Power(StrEnum):
    RUNNING = "running"
    SHUTOFF = "shutoff"
    SUSPENDED = "suspended"  # paused or saved to disk
    CRASHED = "crashed"
    OTHER = "other"  # starting, stopping, blocked: transitional


class CloneInfo(Record, kw_only=False):
    """One clone as the hypervisor reports it. Pool, image, version and slot come from
    the clone's own metadata, so they survive a lost state store."""

    name: str
    pool: str
    slot: int
    image: str
    version: int
    power: Power
    display: Endpoint | None = None
    # booted and answering (guest agent, or display up); None: unknown, the read did not
    # answer in time (a late guest agent reply on a loaded host), which is never "not ready"
    ready: bool | None = False
    started_by: StartMode | None = None  # how the running guest started; None: not running
    host: str = ""  # the host it runs on ("": the only host)


class GuestSession(Record, kw_only=False):
    """Who is on a clone right now."""

    client: str | None = None  # remote-display client address; None = nobody connected
    connected_since: float | None = None
    users: tuple[str, ...] = ()  # users logged in inside the guest, where the guest says
    # the guest did not answer who is logged in within the timeout (a late agent reply on a
    # loaded host): `users` is empty because it is unknown, not because nobody is there
    users_unread: bool = False

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def active(self) -> bool:
        """Somebody is connected or logged in."""
        return self.client is not None or bool(self.users)


class BackendState(StrEnum):
    READY = "ready"  # takes new connections
    DRAIN = "drain"  # keeps its connections, gets no new ones
    MAINT = "maint"  # out of service


class Backend(Record, kw_only=False):
    """One desktop as the load balancer has it."""

    name: str
    address: Endpoint
    state: BackendState
    connections: int = 0
    # connections the balancer has passed to this backend since it was added (HAProxy's
    # `stot`, IPVS's `Conns`): persistent evidence that somebody used the desktop, even
    # while no keeper was watching. None: this balancer cannot tell.
    sessions_total: int | None = None


class InstanceHealth(Record, kw_only=False):
    """One balancer instance of several kept in step (a pair behind a VRRP address), as the
    last call found it."""

    name: str
    reachable: bool
    error: str | None = None
    backends: int | None = None  # how many backends it holds; None when unreachable


class ObservedClone(Record, kw_only=False):
    info: CloneInfo
    session: GuestSession = GuestSession()
    backend: Backend | None = None

    @property
    def name(self) -> str:
        return self.info.name


class Observed(Record, kw_only=False):
    """Everything observe() learned about one pool in one pass."""

    clones: tuple[ObservedClone, ...] = ()
    orphan_backends: tuple[Backend, ...] = ()  # balancer entries of this pool with no clone
    target_version: int | None = None  # what the pool's channel/version resolves to now
    base_ready: bool = False  # the target version's base can be cloned from (powered off)
    # clones with a hypervisor call still running (a call that outlived its timeout, or, in
    # the simulator, an operation that takes time): their record's intent is not yet done
    # or undone, so the planner waits for them instead of deciding the call never happened
    in_flight: frozenset[str] = frozenset()
    # clones a client connected to since the last pass (hypervisor events): a session the
    # observation may have missed, so their desktops are dirty even if nobody is on them now
    touched: frozenset[str] = frozenset()
    # several hosts (settings `hosts:`): each host as placement sees it this pass. Empty: the
    # one host "" that holds every version and has no capacity limit
    hosts: tuple[HostRoom, ...] = ()
    lost_hosts: frozenset[str] = frozenset()  # hosts the hypervisor cannot reach now
    draining_hosts: frozenset[str] = frozenset()  # `hosts drain`: no new desktops there

    def by_name(self) -> dict[str, ObservedClone]:
        return {c.name: c for c in self.clones}


class HostSpec(Record, kw_only=False):
    """One hypervisor host of a keeper (settings `hosts:`). Capacity None: no limit."""

    name: str
    uri: str  # its libvirt URI
    address: str  # where the balancer reaches its desktops' display ports
    max_desktops: int | None = None
    max_memory: int | None = None  # bytes
    labels: tuple[str, ...] = ()


class HostUpload(Record, kw_only=False):
    """A version being sent to a host: how far it got and since when."""

    image: str
    version: int
    sent: int  # bytes on the host so far
    total: int  # bytes of the version's files (0: not known yet)
    since: float | None  # when it started (epoch seconds; None: unknown)

    @property
    def fraction(self) -> float:
        return min(1.0, self.sent / self.total) if self.total else 0.0

    def amount(self) -> str:
        """`12.5 of 30.0 MiB (42 %)`."""
        mib = 1024 * 1024
        return f"{self.sent / mib:.1f} of {self.total / mib:.1f} MiB ({self.fraction:.0%})"

    def describe(self) -> str:
        """`tiny v3: 12.5 of 30.0 MiB (42 %)`."""
        return f"{self.image} v{self.version}: {self.amount()}"


class HostState(Record, kw_only=False):
    """One host as the hypervisor sees it now (pool.ports.Hosts.hosts())."""

    name: str
    connected: bool
    since: float | None  # when it was last connected or lost (None: unknown)
    versions: tuple[tuple[str, int], ...] = ()  # (image, version) the host holds
    upload: HostUpload | None = None  # a version being sent to it


class HostRoom(Record, kw_only=False):
    """One host as the placement rule sees it in one pass: whether this pool may put a new
    desktop there, and how full it is (every pool's desktops on it)."""

    name: str
    address: str  # where the balancer reaches its desktops' display ports
    # connected, not draining, the pool may use it, holds the target version, breaker closed
    usable: bool
    desktops: int = 0
    memory: int = 0  # bytes the desktops on it are given
    max_desktops: int | None = None  # None: no limit
    max_memory: int | None = None
    upload: HostUpload | None = None  # the pool's version being sent there (not usable yet)
    breaker_open_until: float | None = None  # its creates kept failing: not used until then


# --------------------------------------------------------------------------------------
# What is remembered (the store): what the hypervisor cannot tell
# --------------------------------------------------------------------------------------


class CloneState(StrEnum):
    CREATING = "creating"  # create action issued, clone not yet (fully) there
    BOOTING = "booting"  # running, not yet ready
    FREE = "free"  # ready, no session, in the balancer
    IN_USE = "in_use"  # a client is connected and/or a user is logged in
    DISCONNECTED = "disconnected"  # user logged in, client gone: in use until the timeout
    RECYCLING = "recycling"  # session ended; waiting recycle_after, then reset/delete
    SUSPENDED = "suspended"  # idle surplus, suspended (standby: suspend)
    RETIRING = "retiring"  # old version: no new users, removed when its session ends
    DELETING = "deleting"  # delete issued
    FAILED = "failed"  # an action on it failed; retried with backoff
    STOPPED = "stopped"  # powered off and kept (persistent desktop)


class CloneRecord(Record, kw_only=False):
    name: str
    slot: int
    version: int
    state: CloneState
    since: float  # when it entered `state`
    session_ended_at: float | None = None  # logoff / power-off / disconnect moment
    last_user: str | None = None
    failures: int = 0  # consecutive failed actions on this clone
    retry_at: float | None = None  # not before this time
    # Somebody has been on this clone (or nobody knows: it was adopted without a record)
    # since its disk was last made clean. Set as soon as a session is observed, written to
    # the store before any other action of that pass, cleared only when a reset (or a fresh
    # create) has completed. A dirty clone never becomes free or enters the balancer.
    dirty: bool = False
    # The balancer's session counter for this clone's backend (Backend.sessions_total) as
    # far as the keeper has accounted for it: a higher count later means somebody connected
    # since (the record becomes dirty). Written in the same record write as that dirty mark;
    # 0 when the keeper adds the backend; None: no baseline yet (the next pass takes one).
    sessions_seen: int | None = None
    host: str = ""  # the host the clone was made on ("": the only host)
    # since when its host is lost (cut off, failed): the clone may still exist and be in use
    # there, so it is never deleted, its slot, name and port never reused, until it is seen
    lost_since: float | None = None


class RolloutPolicy(Record, kw_only=False):
    """How a pool moves onto `to_version`: an active `imagepipe rollout` (its row in the
    store). Without one, a version change retires old clones the plain way."""

    rollout: int  # the rollout's id
    to_version: int
    surge: int  # clones allowed above `max` while both versions run (old free ones held)
    canary: int | None = None  # at most this many new-version clones until the canary passed
    paused: bool = False  # no new-version creates, no old free clone released
    deadline_at: float | None = None  # old clones still in use are ended at this moment


class PoolRecord(Record, kw_only=False):
    pool: str
    clones: Mapping[str, CloneRecord] = field(default_factory=dict)
    target_version: int | None = None  # rollout target; None = not decided yet
    failures: int = 0  # consecutive failed creates in this pool
    breaker_open_until: float | None = None
    rollout_started_at: float | None = None  # when clones of another version began retiring
    rollout: RolloutPolicy | None = None  # an active `imagepipe rollout` of this pool
    # expected logins by time of week, learned from the store's login history (the keeper
    # fills it for pools with `learn`; None: nothing learned yet)
    arrivals: Arrivals | None = None


class Arrivals(Record, kw_only=False):
    """Expected logins per time-of-week bucket, learned from past days (planner/forecast.py):
    `expected[i]` for the i-th `bucket`-second stretch after Monday 00:00 local time."""

    bucket: float
    expected: tuple[float, ...]


class LoginHistory(Record, kw_only=False):
    """Logins a pool saw, per local day (date ordinal) and per bucket of that day."""

    bucket: float
    days: Mapping[int, Mapping[int, int]] = field(default_factory=dict)  # day -> bucket -> n


class PoolDown(Record, kw_only=False):
    """An administrator asked for the pool to be taken down (`imagepipe pools down`): make no
    desktops, drain it, remove free desktops at once and the others as their sessions end
    (`now`: at once, sessions or not)."""

    since: float
    now: bool = False


# --------------------------------------------------------------------------------------
# What a hypervisor needs to make a clone
# --------------------------------------------------------------------------------------


class BaseImage(Record, kw_only=False):
    """A registered image version, as a hypervisor needs it to make clones."""

    image: str
    version: int
    directory: Path  # the version's folder in the image store (read-only)
    disk: str | None = None  # file name of the base disk in `directory` (libvirt)
    kernel: str | None = None  # direct kernel boot (tiny image)
    initrd: str | None = None
    cmdline: str | None = None
    vm: str | None = None  # VirtualBox base VM name or uuid
    snapshot: str | None = None  # VirtualBox snapshot the clones are linked to


class CloneSpec(Record, kw_only=False):
    """Everything a hypervisor needs to make one clone."""

    name: str
    pool: str
    slot: int
    base: BaseImage
    mode: CloneMode
    cpus: int
    memory: int  # bytes
    display: Endpoint
    start: StartMode = StartMode.RESTORE  # restore from a warm parent where the adapter can
    host: str = ""  # the host to make it on ("": the only host)
