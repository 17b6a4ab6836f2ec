"""Settings (imagepipe.yml): where they are found, what they hold, how they are checked."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagepipe.config.errors import Issue, issue_at, raise_if, top_mapping, validate
from imagepipe.config.values import (
    duration,
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
    positive,
    positive_duration,
    size_with_unit,
)
from imagepipe.errors import ConfigError
from imagepipe.schema import (
    Section,
    bounded,
    choice,
    flag,
    key,
    list_of,
    optional,
    replace,
    section,
    tuple_of,
    whole,
)
from imagepipe.yamlsrc import Located, expand_user, load_file, path_kind

if TYPE_CHECKING:  # not for reading settings: `build` never loads the pool model
    from imagepipe.pool.model import HostSpec

SYSTEM_SETTINGS = Path("/etc/imagepipe/imagepipe.yml")
SETTINGS_NAME = "imagepipe.yml"


class HypervisorSettings(Section):
    driver: str = key(choice("libvirt", "virtualbox"), default="libvirt")
    uri: str = key(parse_uri, default="qemu:///system")


class HostCapacity(Section):
    desktops: int | None = key(optional(positive), default=None)  # None: no limit
    # memory its desktops may be given, with a unit
    memory: int | None = key(optional(size_with_unit), default=None)


class HostSettings(Section):
    """One libvirt host of a keeper that spans several (docs/hosts.md)."""

    name: str = key(parse_pool_name)
    uri: str = key(parse_libvirt_uri)
    address: str = key(parse_ip_address)  # the balancer reaches it here
    capacity: HostCapacity = key(section(HostCapacity), default=HostCapacity())
    labels: list[str] = key(list_of(parse_pool_name), default_factory=list)

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

    name: str = key(parse_instance_name)
    # its admin socket: a unix socket on this machine (another machine's: forwarded here)
    admin_socket: Path = key(parse_admin_socket)
    manage: bool | None = key(optional(flag), default=None)  # None: balancer.manage
    bind: str | None = key(optional(parse_host_port), default=None)  # None: balancer.bind
    # where it exchanges stick-table entries with the other instances (HAProxy peers);
    # needed by each instance when balancer.persist is not none
    peer: str | None = key(optional(parse_host_port), default=None)


IPVS_SCHEDULERS = (
    "wlc",
    "lc",
    "rr",
    "wrr",
    "sed",
    "nq",
    "sh",
    "dh",
    "lblc",
    "lblcr",
    "fo",
    "ovf",
    "mh",
)


class BalancerSettings(Section):
    driver: str = key(choice("haproxy", "ipvs", "none"), default="haproxy")
    bind: str = key(parse_host_port, default="127.0.0.1:5999")
    # None: load_settings fills in run_dir/haproxy.sock
    admin_socket: Path | None = key(parse_optional_admin_socket, default=None)
    manage: bool = key(flag, default=True)
    balance: str = key(choice("leastconn", "first"), default="leastconn")
    # haproxy: a returning user reaches the desktop with their session (docs/rollouts.md)
    persist: str = key(choice("none", "source", "rdp-cookie"), default="none")
    persist_expire: float = key(positive_duration, default=8 * 3600.0)
    vip: str | None = key(parse_optional_vip, default=None)
    port: int = key(whole(ge=1, le=65535), default=3389)
    # ipvs (docs/ipvs.md): how the kernel picks, reaches and keeps a user's desktop
    scheduler: str = key(choice(*IPVS_SCHEDULERS), default="wlc")
    # NAT, or direct routing on the same L2
    forward: str = key(choice("masq", "droute"), default="masq")
    persistence: float = key(bounded(duration, le=31 * 86400), default=0.0)  # ipvsadm -p; 0 = off
    ipvs_names_file: Path | None = key(parse_optional_path, default=None)
    # set net.ipv4.vs.expire_nodest_conn / _quiescent_template
    ipvs_sysctls: bool = key(flag, default=True)
    # haproxy: several instances kept in step (a pair behind a VRRP address); empty: one,
    # at admin_socket
    instances: tuple[BalancerInstance, ...] = key(tuple_of(section(BalancerInstance)), default=())


class KeeperSettings(Section):
    tick: float = key(positive_duration, default=5.0)
    parallel: int = key(positive, default=4)
    action_timeout: float = key(positive_duration, default=600.0)
    # host:port of the Prometheus endpoint (e.g. 127.0.0.1:9464); None = no metrics
    metrics: str | None = key(optional(parse_host_port), default=None)
    # several keepers on one PostgreSQL state (docs/high-availability.md): the leader lease
    lease: float = key(positive_duration, default=30.0)  # how long a lease runs unrenewed
    lease_loop: float = key(positive_duration, default=10.0)  # seconds between two renewals
    # how long one state database call may take
    lease_retry: float = key(positive_duration, default=10.0)


class TlsSettings(Section):
    cert: Path = key(parse_path)  # PEM certificate (chain) the web entrance presents
    key: Path = key(parse_path)  # its PEM private key


class WebSettings(Section):
    """The web entrance (docs/web.md): noVNC and a websocket proxy to the balancer."""

    bind: str = key(parse_host_port)
    # None: plain HTTP, allowed on a loopback address only
    tls: TlsSettings | None = key(optional(section(TlsSettings)), default=None)


def _default_pools_dir() -> Path:
    local = Path.cwd() / "pools"
    return local if local.is_dir() else Path("/etc/imagepipe/pools")


class Settings(Section):
    """Global settings; every field has a default, so no file is needed."""

    pools_dir: Path = key(parse_path, default_factory=_default_pools_dir)
    packer_dir: Path = key(parse_path, default_factory=lambda: Path.cwd() / "packer")
    state_db: Path = key(parse_path, default=Path("/var/lib/imagepipe/state.db"))
    # the shared state in PostgreSQL (docs/high-availability.md); None: SQLite in state_db
    state: str | None = key(parse_state_dsn, default=None)
    state_password_file: Path | None = key(parse_optional_path, default=None)
    registry: Path = key(parse_path, default=Path("/var/lib/imagepipe/registry"))
    # a git URL the registry is shared through (docs/images.md); None: the registry is local
    registry_remote: str | None = key(parse_git_remote, default=None)
    # reads fetch the remote at most this often
    registry_fetch_every: float = key(positive_duration, default=30.0)
    image_store: Path = key(parse_path, default=Path("/var/lib/imagepipe/images"))
    run_dir: Path = key(parse_path, default=Path("/run/imagepipe"))
    hypervisor: HypervisorSettings = key(section(HypervisorSettings), default=HypervisorSettings())
    # several libvirt hosts; empty: the one host hypervisor.uri (docs/hosts.md)
    hosts: list[HostSettings] = key(list_of(section(HostSettings)), default_factory=list)
    balancer: BalancerSettings = key(section(BalancerSettings), default=BalancerSettings())
    keeper: KeeperSettings = key(section(KeeperSettings), default=KeeperSettings())
    web: WebSettings | None = key(optional(section(WebSettings)), default=None)  # None: none
    source: str = "defaults"  # the file the settings came from (set here, not in a file)

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
        balancer = replace(settings.balancer, admin_socket=settings.admin_socket_path)
        settings = replace(settings, balancer=balancer)
    return settings


def parse_settings(doc: Located, *, base: Path) -> Settings:
    """Validate a parsed settings file; relative paths are taken from `base`."""
    issues: list[Issue] = []
    settings = validate(Settings, top_mapping(doc, issues), doc, issues)
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
            replace(i, admin_socket=_resolve(i.admin_socket, base))
            for i in settings.balancer.instances
        )
    if balancer_update:
        update["balancer"] = replace(settings.balancer, **balancer_update)
    if settings.web is not None and settings.web.tls is not None:
        tls = settings.web.tls
        resolved = TlsSettings(cert=_resolve(tls.cert, base), key=_resolve(tls.key, base))
        update["web"] = replace(settings.web, tls=resolved)
    return replace(settings, **update)


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
