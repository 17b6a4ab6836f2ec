"""Pool files and settings: good files load, bad ones are refused with file:line: key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagepipe import config
from imagepipe.config import (
    ConfigIssues,
    find_settings_file,
    load_pool_file,
    load_pools,
    load_settings,
)
from imagepipe.errors import EXIT_BAD_INPUT, ConfigError
from imagepipe.pool.model import CloneMode, OnLogoff, ScheduleRule, Standby

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
name: lab
image: tiny
"""


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative file names in messages (pools/p.yml) are relative to tmp_path."""
    monkeypatch.chdir(tmp_path)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def pool_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, "pools/p.yml", text)
    with pytest.raises(ConfigError) as caught:
        load_pool_file(Path("pools/p.yml"))
    assert path.exists()
    return caught.value


def lines_of(error: ConfigError) -> list[str]:
    return str(error).splitlines()


# --- good pool files -------------------------------------------------------------------


def test_the_example_pools_load_with_their_documented_values() -> None:
    specs = {s.name: s for s in load_pools([REPO / "pools"])}
    lab = specs["lab"]
    assert (lab.image, lab.channel, lab.version) == ("tiny", "latest", None)
    assert (lab.initial, lab.free, lab.max) == (2, 2, 4)
    assert (lab.port_first, lab.port_last, lab.recycle_after) == (5900, 5909, 60.0)
    room = specs["classroom"]
    assert (room.image, room.channel, room.standby) == ("win10", "stable", Standby.SUSPEND)
    assert (room.port_first, room.port_last) == (5100, 5199)
    assert room.schedule[0] == ScheduleRule(
        days=frozenset(range(5)), start_minute=7 * 60, end_minute=12 * 60, free=10
    )
    assert room.assignments == {"teacher": 0, "assistant": 1}
    assert room.timezone == "Europe/Berlin"
    assert room.drain_deadline == 8 * 3600


def test_a_minimal_pool_gets_the_defaults(tmp_path: Path) -> None:
    spec = load_pool_file(write(tmp_path, "lab.yml", MINIMAL))
    assert spec.channel == "latest" and spec.version is None
    assert spec.clone is CloneMode.LINKED and spec.on_logoff is OnLogoff.RESET
    assert (spec.initial, spec.free, spec.max) == (1, 1, 5)
    assert spec.memory == 256 * 1024**2
    assert spec.drain_deadline is None
    assert spec.source.endswith("lab.yml")


def test_every_key_of_a_full_pool_file_reaches_the_pool_spec(tmp_path: Path) -> None:
    spec = load_pool_file(
        write(
            tmp_path,
            "full.yml",
            """\
            name: office-2
            image: win10
            version: v7
            clone: full
            size: {initial: 0, free: 2, max: 6}
            machine: {cpus: 4, memory: 4G}
            display: {port_range: 6000-6009, address: 10.0.0.5}
            sessions: {on_logoff: keep, recycle_after: 90s, disconnect_timeout: 1h30m}
            idle: {shrink_after: 1d, standby: suspend}
            timezone: America/New_York
            schedule:
              - {days: [sat, sun], from: "12:00", to: "24:00", free: 0}
              - {days: fri-mon, from: "08:00", to: "09:00", free: 1}
            assignments: {1001: 5}
            failures: {max: 2, backoff: 1m, cooldown: 1h}
            boot_timeout: 2m
            rollout: {drain_deadline: none}
            """,
        )
    )
    assert (spec.name, spec.version, spec.channel, spec.clone) == (
        "office-2",
        7,
        None,
        CloneMode.FULL,
    )
    assert (spec.cpus, spec.memory) == (4, 4 * 1024**3)
    assert (spec.port_first, spec.port_last, spec.display_address) == (6000, 6009, "10.0.0.5")
    assert (spec.on_logoff, spec.recycle_after, spec.disconnect_timeout) == (
        OnLogoff.KEEP,
        90.0,
        5400.0,
    )
    assert (spec.shrink_after, spec.standby) == (86400.0, Standby.SUSPEND)
    assert spec.schedule == (
        ScheduleRule(days=frozenset({5, 6}), start_minute=720, end_minute=1440, free=0),
        ScheduleRule(days=frozenset({4, 5, 6, 0}), start_minute=480, end_minute=540, free=1),
    )
    assert spec.assignments == {"1001": 5}
    assert (spec.max_failures, spec.retry_backoff, spec.breaker_cooldown) == (2, 60.0, 3600.0)
    assert (spec.boot_timeout, spec.drain_deadline) == (120.0, None)


def test_unquoted_times_and_yaml_1_1_words_stay_text(tmp_path: Path) -> None:
    spec = load_pool_file(
        write(
            tmp_path,
            "p.yml",
            """\
            name: lab
            image: tiny
            schedule:
              - {days: weekdays, from: 07:30, to: 18:00, free: 1}
            idle: {standby: none}
            """,
        )
    )
    assert spec.schedule[0].start_minute == 7 * 60 + 30
    assert spec.standby is Standby.NONE


# --- bad pool files: every message names file:line: key ----------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: lab\nimage: tiny\nsessions:\n  recycle_after: 1 minute\n",
            "pools/p.yml:4: sessions.recycle_after: expected a duration such as 90s, 1m, 2h, "
            "1h30m or 1d, got '1 minute'",
        ),
        (
            "name: lab\nimage: tiny\nsessions:\n  recycle_afer: 1m\n",
            "pools/p.yml:4: sessions.recycle_afer: unknown key; did you mean 'recycle_after'?",
        ),
        (
            "name: lab\nimage: tiny\nimgae: x\n",
            "pools/p.yml:3: imgae: unknown key; did you mean 'image'?",
        ),
        (
            "name: lab\nimage: tiny\nsize:\n  free: two\n",
            "pools/p.yml:4: size.free: expected a whole number, got 'two'",
        ),
        (
            "name: lab\nimage: tiny\nclone: linkd\n",
            "pools/p.yml:3: clone: expected 'linked' or 'full', got 'linkd'",
        ),
        (
            "name: lab\nimage: tiny\nsessions: {on_logoff: logout}\n",
            "pools/p.yml:3: sessions.on_logoff: expected 'reset', 'keep' or 'delete', got 'logout'",
        ),
        ("image: tiny\n", "pools/p.yml:1: name: required key is missing"),
        (
            "name: Lab 1\nimage: tiny\n",
            "pools/p.yml:1: name: expected a name of up to 32 lowercase letters",
        ),
        (
            "name: lab\nimage: tiny\nmachine:\n  memory: lots\n",
            "pools/p.yml:4: machine.memory: expected a size such as 512M, 4G or 2048 (bytes), "
            "got 'lots'",
        ),
        (
            "name: lab\nimage: tiny\nmachine:\n  memory: 512\n",
            "pools/p.yml:4: machine.memory: 512 bytes is too little memory (at least 32M); "
            "write units, e.g. 512M or 4G",
        ),
        (
            "name: lab\nimage: tiny\nmachine: {cpus: 0}\n",
            "pools/p.yml:3: machine.cpus: must be at least 1, got 0",
        ),
        (
            "name: lab\nimage: tiny\nsize: 5\n",
            "pools/p.yml:3: size: expected a mapping of keys, got 5",
        ),
        (
            "name: lab\nimage: tiny\nsize:\n  initial: 6\n  max: 5\n",
            "pools/p.yml:4: size.initial: initial 6 is more than size.max 5",
        ),
        (
            "name: lab\nimage: tiny\nsize:\n  free: 6\n  max: 5\n",
            "pools/p.yml:4: size.free: free 6 is more than size.max 5",
        ),
        (
            "name: lab\nimage: tiny\nsize: {max: 5}\ndisplay: {port_range: 5900-5902}\n",
            "pools/p.yml:3: size.max: max 5 does not fit display.port_range 5900-5902, which "
            "has room for 3 desktops; widen the port range or lower size.max",
        ),
        (
            "name: lab\nimage: tiny\ndisplay:\n  port_range: 5999-5900\n",
            "pools/p.yml:4: display.port_range: the first port must not be above the last",
        ),
        (
            "name: lab\nimage: tiny\ndisplay:\n  port_range: 5900..5999\n",
            "pools/p.yml:4: display.port_range: expected a port range such as 5900-5999",
        ),
        (
            "name: lab\nimage: tiny\ndisplay:\n  port_range: 70000-70010\n",
            "pools/p.yml:4: display.port_range: ports must be between 1 and 65535",
        ),
        (
            "name: lab\nimage: tiny\nchannel: stable\nversion: 3\n",
            "pools/p.yml:4: version: give either channel or version, not both",
        ),
        (
            "name: lab\nimage: tiny\nversion: latest\n",
            "pools/p.yml:3: version: expected a version number such as 3 or v3, got 'latest'",
        ),
        (
            "name: lab\nimage: tiny\ntimezone: Europe/Berln\n",
            "pools/p.yml:3: timezone: unknown time zone 'Europe/Berln'; expected an IANA name",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - days: mon-funday\n    from: '07:00'\n"
            "    to: '18:00'\n    free: 1\n",
            "pools/p.yml:4: schedule[0].days: expected days such as mon-fri, sat,sun, weekdays "
            "or daily, got 'mon-funday'",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - days: mon\n    from: 7am\n"
            "    to: '18:00'\n    free: 1\n",
            'pools/p.yml:5: schedule[0].from: expected a time of day such as "07:00" or '
            "\"18:30\", got '7am'",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - days: mon\n    from: '25:00'\n"
            "    to: '26:00'\n    free: 1\n",
            "pools/p.yml:5: schedule[0].from: expected a time of day",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - days: mon\n    from: '18:00'\n"
            "    to: '07:00'\n    free: 1\n",
            "pools/p.yml:6: schedule[0].to: must be later than 'from' (split a rule that crosses "
            "midnight in two)",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - {days: mon, from: '07:00', to: '08:00', "
            "free: 9}\n",
            "pools/p.yml:4: schedule[0].free: free 9 is more than size.max 5",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - {days: mon-fri, from: '07:00', to: '12:00', "
            "free: 2}\n  - {days: fri, from: '11:00', to: '13:00', free: 3}\n",
            "pools/p.yml:5: schedule[1]: overlaps schedule[0] on fri",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - {days: mon, from: '07:00', to: '08:00'}\n",
            "pools/p.yml:4: schedule[0].free: required key is missing",
        ),
        (
            "name: lab\nimage: tiny\nschedule:\n  - {days: mon, from: '07:00', to: '08:00', "
            "free: 1, form: '09:00'}\n",
            "pools/p.yml:4: schedule[0].form: unknown key; did you mean 'from'?",
        ),
        (
            "name: lab\nimage: tiny\nassignments:\n  alice: 1\n  bob: 5\n",
            "pools/p.yml:5: assignments.bob: slot 5 is outside the pool: slots are 0 to 4 "
            "(size.max 5)",
        ),
        (
            "name: lab\nimage: tiny\nassignments:\n  alice: 1\n  bob: 1\n",
            "pools/p.yml:5: assignments.bob: slot 1 is already assigned to 'alice'",
        ),
        (
            "name: lab\nimage: tiny\nrollout:\n  drain_deadline: soon\n",
            "pools/p.yml:4: rollout.drain_deadline: expected a duration such as 90s",
        ),
        (
            "name: lab\nimage: tiny\nfailures: {max: 0}\n",
            "pools/p.yml:3: failures.max: must be at least 1, got 0",
        ),
        (
            "name: lab\nimage: tiny\nidle:\n  standby: sleep\n",
            "pools/p.yml:4: idle.standby: expected 'none' or 'suspend', got 'sleep'",
        ),
        (
            "name: lab\nimage: tiny\nname: lab2\n",
            "pools/p.yml:3: name: duplicate key (first given on line 1)",
        ),
        (
            "name: lab\nimage: [tiny\n",
            "pools/p.yml:3: malformed YAML:",  # the wording is libyaml's or PyYAML's
        ),
        ("- name: lab\n", "pools/p.yml:1: expected a mapping of keys, got a list"),
    ],
)
def test_a_bad_pool_file_is_refused_naming_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    error = pool_error(tmp_path, text)
    assert lines_of(error)[0].startswith(expected), str(error)
    assert error.exit_code == EXIT_BAD_INPUT


def test_all_errors_of_a_file_are_reported_together(tmp_path: Path) -> None:
    error = pool_error(
        tmp_path,
        """\
        name: lab
        image: tiny
        clone: linkd
        sessions:
          recycle_after: soon
        idle: {shrink_aftr: 2h}
        """,
    )
    assert isinstance(error, ConfigIssues)
    assert lines_of(error) == [
        "pools/p.yml:3: clone: expected 'linked' or 'full', got 'linkd' (and 2 more below)",
        "pools/p.yml:5: sessions.recycle_after: expected a duration such as 90s, 1m, 2h, "
        "1h30m or 1d, got 'soon'",
        "pools/p.yml:6: idle.shrink_aftr: unknown key; did you mean 'shrink_after'?",
    ]
    assert (error.file, error.line, error.key) == ("pools/p.yml", 3, "clone")


def test_an_unknown_key_with_no_close_match_lists_the_valid_keys(tmp_path: Path) -> None:
    error = pool_error(tmp_path, "name: lab\nimage: tiny\nidle: {zzz: 1}\n")
    assert (
        str(error) == "pools/p.yml:3: idle.zzz: unknown key; valid keys here: shrink_after, standby"
    )


def test_an_empty_pool_file_asks_for_its_name_and_image(tmp_path: Path) -> None:
    error = pool_error(tmp_path, "")
    assert lines_of(error)[:2] == [
        "pools/p.yml:1: name: required key is missing (and 1 more below)",
        "pools/p.yml:1: image: required key is missing",
    ]


# --- several pools together ------------------------------------------------------------


def test_two_pools_with_the_same_name_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "pools/a.yml", "name: lab\nimage: tiny\ndisplay: {port_range: 5000-5009}\n")
    write(tmp_path, "pools/b.yml", "# copy\nname: lab\nimage: tiny\n")
    with pytest.raises(ConfigError) as caught:
        load_pools([Path("pools")])
    assert str(caught.value) == (
        "pools/b.yml:2: name: pool 'lab' is already defined in pools/a.yml:1"
    )


def test_pools_with_overlapping_port_ranges_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "pools/a.yml", "name: a\nimage: tiny\ndisplay: {port_range: 5000-5009}\n")
    write(tmp_path, "pools/b.yml", "name: b\nimage: tiny\ndisplay:\n  port_range: 5005-5020\n")
    with pytest.raises(ConfigError) as caught:
        load_pools([Path("pools")])
    assert str(caught.value) == (
        "pools/b.yml:4: display.port_range: ports 5005-5020 overlap pool 'a' (5000-5009, "
        "pools/a.yml:1); give each pool its own range"
    )


def test_errors_of_several_files_are_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "pools/a.yml", "name: a\nimage: tiny\nclone: copy\n")
    write(tmp_path, "pools/b.yaml", "name: b\nimage: tiny\nsize: {max: 0}\n")
    write(tmp_path, "pools/notes.txt", "not a pool")
    with pytest.raises(ConfigError) as caught:
        load_pools([Path("pools")])
    assert [line.split(":")[0] for line in lines_of(caught.value)] == [
        "pools/a.yml",
        "pools/b.yaml",
    ]


def test_pools_in_separate_port_ranges_load_in_file_order(tmp_path: Path) -> None:
    write(tmp_path, "pools/b.yml", "name: b\nimage: tiny\ndisplay: {port_range: 5010-5019}\n")
    write(tmp_path, "pools/a.yml", "name: a\nimage: tiny\ndisplay: {port_range: 5000-5009}\n")
    assert [s.name for s in load_pools([tmp_path / "pools"])] == ["a", "b"]


def test_a_missing_pool_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such pool file or directory"):
        load_pools([tmp_path / "nope"])


# --- settings --------------------------------------------------------------------------


def test_no_settings_file_gives_working_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGEPIPE_CONFIG", raising=False)
    monkeypatch.setattr(config.settings, "SYSTEM_SETTINGS", tmp_path / "absent.yml")
    settings = load_settings(None)
    assert settings.source == "defaults"
    assert settings.state_db == Path("/var/lib/imagepipe/state.db")
    assert settings.pools_dir == Path("/etc/imagepipe/pools")
    assert settings.hypervisor.driver == "libvirt"
    assert settings.hypervisor.uri == "qemu:///system"
    assert settings.balancer.bind == "127.0.0.1:5999"
    assert settings.balancer.admin_socket == Path("/run/imagepipe/haproxy.sock")
    assert (settings.keeper.tick, settings.keeper.parallel) == (5.0, 4)


def test_a_local_pools_folder_is_the_default_pools_dir(tmp_path: Path) -> None:
    (tmp_path / "pools").mkdir()
    settings = load_settings(write(tmp_path, "imagepipe.yml", "{}\n"))
    assert settings.pools_dir == tmp_path / "pools"


def test_relative_paths_in_a_settings_file_are_taken_from_its_folder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "etc/imagepipe.yml",
        """\
        pools_dir: pools
        state_db: ../var/state.db
        run_dir: /tmp/run
        balancer: {admin_socket: sock/admin.sock}
        keeper: {tick: 2s, action_timeout: 1h}
        """,
    )
    settings = load_settings(path)
    assert settings.pools_dir == tmp_path / "etc" / "pools"
    assert settings.state_db == tmp_path / "etc" / ".." / "var" / "state.db"
    assert settings.run_dir == Path("/tmp/run")
    assert settings.balancer.admin_socket == tmp_path / "etc" / "sock" / "admin.sock"
    assert (settings.keeper.tick, settings.keeper.action_timeout) == (2.0, 3600.0)
    assert settings.source == str(path)


def test_the_admin_socket_defaults_to_the_run_dir(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "s.yml", "run_dir: /srv/run\n"))
    assert settings.admin_socket_path == Path("/srv/run/haproxy.sock")
    assert settings.balancer.admin_socket == Path("/srv/run/haproxy.sock")


def test_the_example_settings_file_loads() -> None:
    settings = load_settings(REPO / "imagepipe.example.yml")
    assert settings.packer_dir == REPO / "packer"
    assert settings.balancer.balance == "leastconn"
    assert settings.keeper.action_timeout == 600.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "hypervisor:\n  driver: vmware\n",
            "s.yml:2: hypervisor.driver: expected 'libvirt' or 'virtualbox', got 'vmware'",
        ),
        (
            "balancer:\n  drvier: ipvs\n",
            "s.yml:2: balancer.drvier: unknown key; did you mean 'driver'?",
        ),
        (
            "balancer:\n  driver: ipvs\n",
            "s.yml:2: balancer.driver: the ipvs balancer needs balancer.vip",
        ),
        (
            "balancer: {bind: 5999}\n",
            "s.yml:1: balancer.bind: expected an IP address and port such as 127.0.0.1:5999",
        ),
        (
            "balancer: {manage: maybe}\n",
            "s.yml:1: balancer.manage: expected true or false, got 'maybe'",
        ),
        ("keeper:\n  tick: 0s\n", "s.yml:2: keeper.tick: must be more than 0"),
        ("keeper:\n  parallel: many\n", "s.yml:2: keeper.parallel: expected a whole number"),
        ("state_db: 3\n", "s.yml:1: state_db: expected a path, got 3"),
        (
            "run_dir: r\nstate: mysql://ip@db/ip\n",
            "s.yml:2: state: expected a URL such as postgresql://imagepipe@db.example:5432/",
        ),
        ("state: postgresql://db.example/ip\n", "s.yml:1: state: expected a URL such as"),
        ("state: postgresql://ip@db.example\n", "s.yml:1: state: expected a URL such as"),
        (
            "state: postgresql://ip:pw-1@db.example/ip\n",
            "s.yml:1: state: the URL has a password (postgresql://ip:***@db.example/ip); put",
        ),
        (
            "state_password_file: pw\n",
            "s.yml:1: state_password_file: a password file is for a PostgreSQL state",
        ),
        ("source: x\n", "s.yml:1: source: unknown key"),
        ("pool_dir: x\n", "s.yml:1: pool_dir: unknown key; did you mean 'pools_dir'?"),
        ("[1, 2]\n", "s.yml:1: expected a mapping of keys, got a list"),
    ],
)
def test_a_bad_settings_file_is_refused_naming_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    write(tmp_path, "s.yml", text)
    with pytest.raises(ConfigError) as caught:
        load_settings(Path("s.yml"))
    assert lines_of(caught.value)[0].startswith(expected), str(caught.value)


def test_a_postgresql_state_and_its_password_file_are_read_from_the_settings(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "s.yml",
        "state: postgresql://ip@db.example:5433/ip?sslmode=verify-full\n"
        "state_password_file: secret/pw\n",
    )
    settings = load_settings(tmp_path / "s.yml")
    assert settings.state == "postgresql://ip@db.example:5433/ip?sslmode=verify-full"
    assert settings.state_password_file == tmp_path / "secret" / "pw"


def test_settings_are_found_in_the_documented_order(tmp_path: Path) -> None:
    explicit = write(tmp_path, "explicit.yml", "{}")
    from_env = write(tmp_path, "env.yml", "{}")
    system = write(tmp_path, "etc/imagepipe.yml", "{}")
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {"IMAGEPIPE_CONFIG": str(from_env)}
    assert find_settings_file(explicit, env=env, cwd=cwd, system=system) == explicit
    assert find_settings_file(None, env=env, cwd=cwd, system=system) == from_env
    assert find_settings_file(None, env={}, cwd=cwd, system=system) == system
    local = write(cwd, "imagepipe.yml", "{}")
    assert find_settings_file(None, env={}, cwd=cwd, system=system) == local
    assert find_settings_file(None, env={}, cwd=tmp_path, system=tmp_path / "none.yml") is None


def test_a_settings_file_named_explicitly_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settings file given by --config does not exist"):
        find_settings_file(tmp_path / "missing.yml", env={})
    with pytest.raises(ConfigError, match="given by IMAGEPIPE_CONFIG does not exist"):
        find_settings_file(None, env={"IMAGEPIPE_CONFIG": str(tmp_path / "gone.yml")})
