"""balancer.instances: a balancer pair in the settings, and the group the keeper builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.app.bootstrap import build_balancer
from imagepipe.balancers.group import BalancerGroup
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.config import load_settings
from imagepipe.errors import ConfigError
from tests.unit.test_config import lines_of, write

PAIR = """\
run_dir: run
balancer:
  driver: haproxy
  bind: 127.0.0.1:5999
  instances:
    - name: lb1
      admin_socket: run/lb1.sock
    - name: lb2
      admin_socket: /srv/lb2/admin.sock
      manage: false
      bind: 127.0.0.2:6000
"""


def test_a_pair_builds_one_group_of_two_haproxy_instances(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "s.yml", PAIR))
    group = build_balancer(settings)
    assert isinstance(group, BalancerGroup)
    (n1, lb1), (n2, lb2) = group.instances()
    assert isinstance(lb1, HAProxyBalancer) and isinstance(lb2, HAProxyBalancer)
    assert (n1, lb1.admin.path, lb1.manage) == ("lb1", tmp_path / "run" / "lb1.sock", True)
    assert (n2, lb2.admin.path, lb2.manage) == ("lb2", Path("/srv/lb2/admin.sock"), False)
    assert str(lb1.config.bind) == "127.0.0.1:5999", "the balancer's bind by default"
    assert str(lb2.config.bind) == "127.0.0.2:6000"
    assert lb1.config_path == tmp_path / "run" / "haproxy-lb1.cfg"
    status_view = build_balancer(settings, manage=False)
    assert isinstance(status_view, BalancerGroup)
    assert not any(b.manage for _, b in status_view.instances() if isinstance(b, HAProxyBalancer))


PEERS = (
    PAIR.replace("  bind: 127.0.0.1:5999\n", "  persist: source\n").replace(
        "      admin_socket: run/lb1.sock\n",
        "      admin_socket: run/lb1.sock\n      peer: 127.0.0.1:10000\n",
    )
    + "      peer: 127.0.0.2:10000\n"
)


def test_a_pair_with_persistence_makes_each_instance_a_peer_of_the_others(
    tmp_path: Path,
) -> None:
    group = build_balancer(load_settings(write(tmp_path, "s.yml", PEERS)))
    assert isinstance(group, BalancerGroup)
    configs = [b.config for _, b in group.instances() if isinstance(b, HAProxyBalancer)]
    assert [c.local_peer for c in configs] == ["lb1", "lb2"]
    for config in configs:
        assert [(p.name, str(p.address)) for p in config.peers] == [
            ("lb1", "127.0.0.1:10000"),
            ("lb2", "127.0.0.2:10000"),
        ]


def test_without_instances_the_balancer_is_one_haproxy_as_before(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "s.yml", "run_dir: run\n"))
    assert isinstance(build_balancer(settings), HAProxyBalancer)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            PAIR.replace("name: lb2", "name: lb1"),
            "s.yml:8: balancer.instances[1].name: instance name lb1 is used twice",
        ),
        (
            PAIR.replace("/srv/lb2/admin.sock", "run/lb1.sock"),
            "s.yml:9: balancer.instances[1].admin_socket: admin socket run/lb1.sock is used by "
            "two instances",
        ),
        (
            PAIR.replace("driver: haproxy", "driver: ipvs\n  vip: 10.0.0.1"),
            "s.yml:6: balancer.instances: balancer.instances are HAProxy instances; "
            "balancer.driver is ipvs",
        ),
        (
            PAIR.replace("  bind: 127.0.0.1:5999\n", "  admin_socket: x.sock\n"),
            "s.yml:4: balancer.admin_socket: give each instance its admin_socket under "
            "balancer.instances",
        ),
        (
            PAIR.replace("name: lb2", "name: LB 2"),
            "s.yml:8: balancer.instances[1].name: expected a short name of lowercase letters",
        ),
        (
            PAIR.replace("      admin_socket: /srv/lb2/admin.sock\n", ""),
            "s.yml:8: balancer.instances[1].admin_socket: required key is missing",
        ),
        (
            PAIR.replace("manage: false", "manged: false"),
            "s.yml:10: balancer.instances[1].manged: unknown key; did you mean 'manage'?",
        ),
        (
            PAIR.replace("bind: 127.0.0.2:6000", "bind: lb2:6000"),
            "s.yml:11: balancer.instances[1].bind: expected an IP address and port",
        ),
        (
            PAIR.replace("/srv/lb2/admin.sock", "10.0.0.12:9999"),
            "s.yml:9: balancer.instances[1].admin_socket: expected the path of HAProxy's admin "
            "socket on this machine, got the network address '10.0.0.12:9999'",
        ),
        (
            PAIR.replace("/srv/lb2/admin.sock", "ipv4@lb2.example:9999"),
            "s.yml:9: balancer.instances[1].admin_socket: expected the path of HAProxy's admin "
            "socket on this machine",
        ),
        (
            PAIR.replace("  bind: 127.0.0.1:5999\n", "  persist: source\n"),
            "s.yml:6: balancer.instances[0]: instance lb1 needs peer: ADDRESS:PORT",
        ),
        (
            PEERS.replace("127.0.0.2:10000", "127.0.0.1:10000"),
            "s.yml:13: balancer.instances[1].peer: peer address 127.0.0.1:10000 is used by two",
        ),
    ],
)
def test_a_bad_instance_is_refused_naming_file_line_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "s.yml", text)
    with pytest.raises(ConfigError) as caught:
        load_settings(Path("s.yml"))
    assert lines_of(caught.value)[0].startswith(expected), str(caught.value)
