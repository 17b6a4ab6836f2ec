"""Settings (imagepipe.yml): where they are found, what they hold, how they are checked."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

from imagepipe.config.errors import Issue, issue_at, raise_if, top_mapping, unknown_key, validate
from imagepipe.config.values import (
    Duration,
    FilePath,
    Positive,
    PositiveDuration,
    SizeWithUnit,
    parse_git_remote,
    parse_host_port,
    parse_ip_address,
    parse_libvirt_uri,
    parse_optional_path,
    parse_optional_vip,
    parse_path,
    parse_pool_name,
    parse_state_dsn,
    parse_uri,
)
from imagepipe.errors import ConfigError
from imagepipe.yamlsrc import Located, expand_user, load_file, path_kind

if TYPE_CHECKING:  # not for reading settings: `build` never loads the pool model
    from imagepipe.pool.model import HostSpec

SYSTEM_SETTINGS = Path("/etc/imagepipe/imagepipe.yml")
SETTINGS_NAME = "imagepipe.yml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HypervisorSettings(Section):
    driver: Literal["libvirt", "virtualbox"] = "libvirt"
    uri: Annotated[str, BeforeValidator(parse_uri)] = "qemu:///system"


class HostCapacity(Section):
    desktops: Positive | None = None  # None: no limit
    memory: SizeWithUnit | None = None  # memory its desktops may be given, with a unit


class HostSettings(Section):
    """One libvirt host of a keeper that spans several (docs/hosts.md)."""

    name: Annotated[str, BeforeValidator(parse_pool_name)]
    uri: Annotated[str, BeforeValidator(parse_libvirt_uri)]
    address: Annotated[str, BeforeValidator(parse_ip_address)]  # the balancer reaches it here
    capacity: HostCapacity = HostCapacity()
    labels: list[Annotated[str, BeforeValidator(parse_pool_name)]] = Field(default_factory=list)

    def host_spec(self) -> HostSpec:
        from imagepipe.pool.model import HostSpec

        return HostSpec(
            name=self.name,
            uri=self.uri,
            address=self.address,
            max_desktops=self.capacity.desktops,
            max_memory=self.capacity.memory,
            labels=tuple(self.labels),
        )


INSTANCE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# HAProxy's own address prefixes, or host:port: an admin socket over the network
NETWORK_SOCKET = re.compile(
    r"(?:ipv4|ipv6|tcp|tcp4|tcp6|udp|abns|fd|sockpair)@.*|\[?[0-9a-fA-F.:]+\]?:[0-9]+|[A-Za-z0-9.-]+:[0-9]+"
)


def parse_admin_socket(value: object) -> Path:
    """HAProxy's admin socket: a unix socket imagepipe reaches on this machine. An address
    is refused: imagepipe talks to HAProxy through a file on this machine only."""
    if isinstance(value, str) and NETWORK_SOCKET.fullmatch(value.strip()):
        raise ValueError(
            f"expected the path of HAProxy's admin socket on this machine, got the network "
            f"address {value!r}: imagepipe reaches HAProxy through a unix socket only; for an "
            "HAProxy on another machine forward its socket to a path here (for example "
            "ssh -N -L /run/imagepipe/lb2.sock:/run/haproxy/admin.sock lb2) and give that "
            "path, with manage: false"
        )
    return parse_path(value)


def parse_optional_admin_socket(value: object) -> Path | None:
    return None if value is None else parse_admin_socket(value)


def parse_instance_name(value: object) -> str:
    if isinstance(value, str) and INSTANCE_NAME.fullmatch(value):
        return value
    raise ValueError(
        f"expected a short name of lowercase letters, digits and '-' (such as lb1), got {value!r}"
    )


class BalancerInstance(Section):
    """One HAProxy of a balancer pair (docs/high-availability.md "Balancer pair")."""

    name: Annotated[str, BeforeValidator(parse_instance_name)]
    # its admin socket: a unix socket on this machine (another machine's: forwarded here)
    admin_socket: Annotated[Path, BeforeValidator(parse_admin_socket)]
    manage: StrictBool | None = None  # None: balancer.manage
    bind: Annotated[str, BeforeValidator(parse_host_port)] | None = None  # None: balancer.bind
    # where it exchanges stick-table entries with the other instances (HAProxy peers);
    # needed by each instance when balancer.persist is not none
    peer: Annotated[str, BeforeValidator(parse_host_port)] | None = None


class BalancerSettings(Section):
    driver: Literal["haproxy", "ipvs", "none"] = "haproxy"
    bind: Annotated[str, BeforeValidator(parse_host_port)] = "127.0.0.1:5999"
    # None: load_settings fills in run_dir/haproxy.sock
    admin_socket: Annotated[Path | None, BeforeValidator(parse_optional_admin_socket)] = None
    manage: StrictBool = True
    balance: Literal["leastconn", "first"] = "leastconn"
    # haproxy: a returning user reaches the desktop with their session (docs/rollouts.md)
    persist: Literal["none", "source", "rdp-cookie"] = "none"
    persist_expire: PositiveDuration = 8 * 3600.0
    vip: Annotated[str | None, BeforeValidator(parse_optional_vip)] = None
    port: Annotated[StrictInt, Field(ge=1, le=65535)] = 3389
    # ipvs (docs/ipvs.md): how the kernel picks, reaches and keeps a user's desktop
    scheduler: Literal[
        "wlc", "lc", "rr", "wrr", "sed", "nq", "sh", "dh", "lblc", "lblcr", "fo", "ovf", "mh"
    ] = "wlc"  # fmt: skip
    forward: Literal["masq", "droute"] = "masq"  # NAT, or direct routing on the same L2
    persistence: Annotated[Duration, Field(le=31 * 86400)] = 0.0  # ipvsadm -p; 0 = off
    ipvs_names_file: Annotated[Path | None, BeforeValidator(parse_optional_path)] = None
    ipvs_sysctls: StrictBool = True  # set net.ipv4.vs.expire_nodest_conn / _quiescent_template
    # haproxy: several instances kept in step (a pair behind a VRRP address); empty: one,
    # at admin_socket
    instances: tuple[BalancerInstance, ...] = ()


class KeeperSettings(Section):
    tick: PositiveDuration = 5.0
    parallel: Positive = 4
    action_timeout: PositiveDuration = 600.0
    # host:port of the Prometheus endpoint (e.g. 127.0.0.1:9464); None = no metrics
    metrics: Annotated[str, BeforeValidator(parse_host_port)] | None = None
    # several keepers on one PostgreSQL state (docs/high-availability.md): the leader lease
    lease: PositiveDuration = 30.0  # how long a lease runs without a renewal
    lease_loop: PositiveDuration = 10.0  # seconds between two renewals
    lease_retry: PositiveDuration = 10.0  # how long one state database call may take


class TlsSettings(Section):
    cert: FilePath  # PEM certificate (chain) the web entrance presents
    key: FilePath  # its PEM private key


class WebSettings(Section):
    """The web entrance (docs/web.md): noVNC and a websocket proxy to the balancer."""

    bind: Annotated[str, BeforeValidator(parse_host_port)]
    tls: TlsSettings | None = None  # None: plain HTTP, allowed on a loopback address only


def _default_pools_dir() -> Path:
    local = Path.cwd() / "pools"
    return local if local.is_dir() else Path("/etc/imagepipe/pools")


class Settings(Section):
    """Global settings; every field has a default, so no file is needed."""

    pools_dir: FilePath = Field(default_factory=_default_pools_dir)
    packer_dir: FilePath = Field(default_factory=lambda: Path.cwd() / "packer")
    state_db: FilePath = Path("/var/lib/imagepipe/state.db")
    # the shared state in PostgreSQL (docs/high-availability.md); None: SQLite in state_db
    state: Annotated[str | None, BeforeValidator(parse_state_dsn)] = None
    state_password_file: Annotated[Path | None, BeforeValidator(parse_optional_path)] = None
    registry: FilePath = Path("/var/lib/imagepipe/registry")
    # a git URL the registry is shared through (docs/images.md); None: the registry is local
    registry_remote: Annotated[str | None, BeforeValidator(parse_git_remote)] = None
    registry_fetch_every: PositiveDuration = 30.0  # reads fetch the remote at most this often
    image_store: FilePath = Path("/var/lib/imagepipe/images")
    run_dir: FilePath = Path("/run/imagepipe")
    hypervisor: HypervisorSettings = HypervisorSettings()
    # several libvirt hosts; empty: the one host hypervisor.uri (docs/hosts.md)
    hosts: list[HostSettings] = Field(default_factory=list)
    balancer: BalancerSettings = BalancerSettings()
    keeper: KeeperSettings = KeeperSettings()
    web: WebSettings | None = None  # None: no web entrance
    source: str = "defaults"

    def host_specs(self) -> tuple[HostSpec, ...]:
        """The configured hosts; empty for the single host `hypervisor.uri`."""
        return tuple(h.host_spec() for h in self.hosts)

    @property
    def admin_socket_path(self) -> Path:
        """HAProxy's admin socket: balancer.admin_socket, else run_dir/haproxy.sock."""
        return self.balancer.admin_socket or self.run_dir / "haproxy.sock"

    @property
    def web_balancer_socket(self) -> Path:
        """HAProxy's bind that only the web entrance uses (PROXY protocol): run_dir/web.sock."""
        return self.run_dir / "web.sock"


_PATH_FIELDS = ("pools_dir", "packer_dir", "state_db", "registry", "image_store", "run_dir")


def find_settings_file(
    explicit: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    system: Path | None = None,
) -> Path | None:
    """--config, $IMAGEPIPE_CONFIG, ./imagepipe.yml, /etc/imagepipe/imagepipe.yml; None = defaults.

    A file named explicitly (option or variable) must exist.
    """
    environ = os.environ if env is None else env
    for given, how in (
        (explicit, "--config"),
        (environ.get("IMAGEPIPE_CONFIG"), "IMAGEPIPE_CONFIG"),
    ):
        if given:
            path = expand_user(Path(given), str(given))
            kind = path_kind(path)
            if kind == "missing":
                raise ConfigError(f"settings file given by {how} does not exist", file=str(path))
            if kind != "file":
                raise ConfigError(f"settings file given by {how} is not a file", file=str(path))
            return path
    for candidate in ((cwd or Path.cwd()) / SETTINGS_NAME, system or SYSTEM_SETTINGS):
        if path_kind(candidate) == "file":
            return candidate
    return None


def load_settings(explicit: Path | None = None) -> Settings:
    """The settings from the first file found (see find_settings_file), else the defaults."""
    path = find_settings_file(explicit)
    if path is None:
        settings = Settings()
    else:
        settings = parse_settings(load_file(path), base=path.resolve().parent)
    if settings.balancer.admin_socket is None:
        balancer = settings.balancer.model_copy(update={"admin_socket": settings.admin_socket_path})
        settings = settings.model_copy(update={"balancer": balancer})
    return settings


def parse_settings(doc: Located, *, base: Path) -> Settings:
    """Validate a parsed settings file; relative paths are taken from `base`."""
    issues: list[Issue] = []
    raw = top_mapping(doc, issues)
    if isinstance(raw, dict) and "source" in raw:
        issues.append(unknown_key(doc, ("source",), Settings))
        raw = {k: v for k, v in raw.items() if k != "source"}
    settings = validate(Settings, raw, doc, issues)
    if settings is not None:
        balancer = settings.balancer
        if balancer.driver == "ipvs" and balancer.vip is None:
            issues.append(
                issue_at(
                    doc,
                    ("balancer", "driver"),
                    "the ipvs balancer needs balancer.vip (the virtual address users connect to)",
                )
            )
        issues.extend(_instance_issues(balancer, doc))
        issues.extend(_web_issues(settings, doc))
        keeper = settings.keeper
        if keeper.lease_loop + 2 * keeper.lease_retry > keeper.lease:
            issues.append(
                issue_at(
                    doc,
                    ("keeper", "lease"),
                    f"keeper.lease_loop + 2 * keeper.lease_retry ({keeper.lease_loop:g} + 2 * "
                    f"{keeper.lease_retry:g} = {keeper.lease_loop + 2 * keeper.lease_retry:g}s) "
                    f"must be at most keeper.lease ({keeper.lease:g}s), so a leader that cannot "
                    "renew its lease stops acting before it runs out: raise keeper.lease or "
                    "lower the other two",
                )
            )
        issues.extend(_host_issues(settings, doc))
        if settings.state_password_file is not None and settings.state is None:
            issues.append(
                issue_at(
                    doc,
                    ("state_password_file",),
                    "a password file is for a PostgreSQL state: set state: postgresql://... "
                    "too, or remove this key (the SQLite state_db needs no password)",
                )
            )
    raise_if(issues)
    assert settings is not None
    update: dict[str, Any] = {"source": doc.file}
    for name in _PATH_FIELDS:
        update[name] = _resolve(getattr(settings, name), base)
    if settings.state_password_file is not None:
        update["state_password_file"] = _resolve(settings.state_password_file, base)
    balancer_update: dict[str, Any] = {}
    if settings.balancer.admin_socket is not None:
        balancer_update["admin_socket"] = _resolve(settings.balancer.admin_socket, base)
    if settings.balancer.instances:
        balancer_update["instances"] = tuple(
            i.model_copy(update={"admin_socket": _resolve(i.admin_socket, base)})
            for i in settings.balancer.instances
        )
    if balancer_update:
        update["balancer"] = settings.balancer.model_copy(update=balancer_update)
    if settings.web is not None and settings.web.tls is not None:
        tls = settings.web.tls
        resolved = TlsSettings(cert=_resolve(tls.cert, base), key=_resolve(tls.key, base))
        update["web"] = settings.web.model_copy(update={"tls": resolved})
    return settings.model_copy(update=update)


def _instance_issues(balancer: BalancerSettings, doc: Located) -> list[Issue]:
    """Instances are HAProxy's; each has its own name and admin socket; the single-instance
    admin_socket is not given beside them."""
    if not balancer.instances:
        return []
    issues = []
    where = ("balancer", "instances")
    if balancer.driver != "haproxy":
        issues.append(
            issue_at(
                doc,
                where,
                f"balancer.instances are HAProxy instances; balancer.driver is {balancer.driver}",
            )
        )
    if balancer.admin_socket is not None:
        issues.append(
            issue_at(
                doc,
                ("balancer", "admin_socket"),
                "give each instance its admin_socket under balancer.instances, not "
                "balancer.admin_socket as well",
            )
        )
    names: set[str] = set()
    sockets: set[Path] = set()
    for index, instance in enumerate(balancer.instances):
        if instance.name in names:
            issues.append(
                issue_at(
                    doc,
                    (*where, index, "name"),
                    f"instance name {instance.name} is used twice; give each its own",
                )
            )
        if instance.admin_socket in sockets:
            issues.append(
                issue_at(
                    doc,
                    (*where, index, "admin_socket"),
                    f"admin socket {instance.admin_socket} is used by two instances",
                )
            )
        names.add(instance.name)
        sockets.add(instance.admin_socket)
    issues.extend(_peer_issues(balancer, doc))
    return issues


def _peer_issues(balancer: BalancerSettings, doc: Located) -> list[Issue]:
    """With persistence, each instance of a pair has a peer address of its own, so their
    stick tables replicate and a returning user keeps their desktop across a failover."""
    where = ("balancer", "instances")
    issues = []
    seen: set[str] = set()
    for index, instance in enumerate(balancer.instances):
        if instance.peer is None:
            if balancer.persist != "none" and len(balancer.instances) > 1:
                issues.append(
                    issue_at(
                        doc,
                        (*where, index),
                        f"instance {instance.name} needs peer: ADDRESS:PORT (where its "
                        f"HAProxy shares its stick table) since balancer.persist is "
                        f"{balancer.persist}: without it a user who returns after a failover "
                        "may reach another desktop than the one holding their session",
                    )
                )
            continue
        if instance.peer in seen:
            issues.append(
                issue_at(
                    doc,
                    (*where, index, "peer"),
                    f"peer address {instance.peer} is used by two instances; give each its own",
                )
            )
        seen.add(instance.peer)
    return issues


def _web_issues(settings: Settings, doc: Located) -> list[Issue]:
    """Plain HTTP only on a loopback address; the entrance needs HAProxy (PROXY protocol)."""
    web = settings.web
    if web is None:
        return []
    issues = []
    if settings.balancer.driver != "haproxy":
        issues.append(
            issue_at(
                doc,
                ("web",),
                "the web entrance needs balancer.driver: haproxy (it hands each browser user's "
                f"address to HAProxy with the PROXY protocol), not {settings.balancer.driver}",
            )
        )
    host = web.bind.rpartition(":")[0].strip("[]")
    if web.tls is None and not ipaddress.ip_address(host).is_loopback:
        issues.append(
            issue_at(
                doc,
                ("web", "bind"),
                f"plain HTTP is only served on a loopback address, not {host}: add web.tls "
                "{cert: FILE, key: FILE} or bind to 127.0.0.1",
            )
        )
    return issues


def _host_issues(settings: Settings, doc: Located) -> list[Issue]:
    """Unique host names; a host list only for libvirt (VirtualBox is one host per keeper)."""
    if not settings.hosts:
        return []
    if settings.hypervisor.driver == "virtualbox":
        return [
            issue_at(
                doc,
                ("hosts",),
                "a host list needs hypervisor.driver: libvirt; VirtualBox stays one host per "
                "keeper (pyvbox drives the local VBoxSVC): run one keeper on each VirtualBox "
                "host, or remove 'hosts'",
            )
        ]
    issues = []
    seen: dict[str, int] = {}
    for index, host in enumerate(settings.hosts):
        if host.name in seen:
            issues.append(
                issue_at(
                    doc,
                    ("hosts", index, "name"),
                    f"host {host.name!r} is already defined at hosts[{seen[host.name]}]; "
                    "give each host its own name",
                )
            )
        else:
            seen[host.name] = index
    return issues


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path
