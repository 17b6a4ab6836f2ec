"""Settings `hosts:` and a pool's `hosts:`: several libvirt hosts, checked with file:line: key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagepipe.config import load_pool_file, load_pools, load_settings
from imagepipe.errors import ConfigError
from imagepipe.pool.model import HostSpec

HOSTS = """\
hosts:
  - name: h1
    uri: qemu+tls://h1.example.org/system
    address: 10.0.0.1
    capacity: {desktops: 20, memory: 64G}
    labels: [gpu]
  - name: h2
    uri: qemu+ssh://root@h2/system?keyfile=/etc/imagepipe/id
    address: fd00::2
"""


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def settings_error(tmp_path: Path, text: str) -> str:
    (tmp_path / "s.yml").write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as caught:
        load_settings(Path("s.yml"))
    return str(caught.value)


def test_a_host_list_loads_with_capacity_labels_and_addresses(tmp_path: Path) -> None:
    (tmp_path / "s.yml").write_text(HOSTS)
    hosts = load_settings(Path("s.yml")).host_specs()
    assert hosts == (
        HostSpec(
            name="h1",
            uri="qemu+tls://h1.example.org/system",
            address="10.0.0.1",
            max_desktops=20,
            max_memory=64 * 1024**3,
            labels=("gpu",),
        ),
        HostSpec(
            name="h2",
            uri="qemu+ssh://root@h2/system?keyfile=/etc/imagepipe/id",
            address="fd00::2",
            max_desktops=None,
            max_memory=None,
            labels=(),
        ),
    )


def test_no_host_list_is_the_single_host_of_hypervisor_uri(tmp_path: Path) -> None:
    (tmp_path / "s.yml").write_text("hypervisor: {uri: 'qemu:///system'}\n")
    settings = load_settings(Path("s.yml"))
    assert settings.host_specs() == ()
    assert settings.hypervisor.uri == "qemu:///system"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HOSTS + "  - name: h1\n    uri: qemu+tcp://10.0.0.3/system\n    address: 10.0.0.3\n",
            "s.yml:10: hosts[2].name: host 'h1' is already defined at hosts[0]",
        ),
        (
            "hosts:\n  - {name: h1, uri: 'http://h1/', address: 10.0.0.1}\n",
            "s.yml:2: hosts[0].uri: expected a libvirt URI such as qemu+tls://",
        ),
        (
            "hosts:\n  - {name: h1, uri: 'qemu+tls://h1/system', address: h1.example.org}\n",
            "s.yml:2: hosts[0].address: expected an IP address",
        ),
        (
            "hosts:\n  - name: h1\n    uri: qemu+tls://h1/system\n    address: 10.0.0.1\n"
            "    capacity: {memory: 64}\n",
            "s.yml:5: hosts[0].capacity.memory: expected a size with its unit such as 64G",
        ),
        (
            "hosts:\n  - {name: h1, uri: 'qemu+tls://h1/system', address: 10.0.0.1, cpus: 4}\n",
            "s.yml:2: hosts[0].cpus: unknown key",
        ),
        (
            "hypervisor: {driver: virtualbox}\n" + HOSTS,
            "s.yml:2: hosts: a host list needs hypervisor.driver: libvirt; VirtualBox stays one "
            "host per keeper (pyvbox drives the local VBoxSVC)",
        ),
    ],
)
def test_a_bad_host_list_is_refused_naming_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = settings_error(tmp_path, text)
    assert message.splitlines()[0].startswith(expected), message


def test_a_pool_names_its_hosts_and_labels(tmp_path: Path) -> None:
    (tmp_path / "p.yml").write_text("name: lab\nimage: tiny\nhosts: [h1, 'label:gpu']\n")
    spec = load_pool_file(Path("p.yml"))
    assert spec.hosts == ("h1", "label:gpu")
    gpu = HostSpec("h3", "qemu+tcp://h3/system", "10.0.0.3", None, None, ("gpu",))
    plain = HostSpec("h2", "qemu+tcp://h2/system", "10.0.0.2", None, None, ())
    assert spec.may_use(gpu) and not spec.may_use(plain)


def test_a_bad_pool_host_is_refused_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "p.yml").write_text("name: lab\nimage: tiny\nhosts:\n  - 'label:'\n")
    with pytest.raises(ConfigError) as caught:
        load_pool_file(Path("p.yml"))
    assert str(caught.value).startswith("p.yml:4: hosts[0]: expected a host name"), str(
        caught.value
    )


def test_a_pool_naming_a_host_or_label_the_settings_lack_is_refused_at_its_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.yml").write_text(HOSTS)
    hosts = load_settings(Path("s.yml")).host_specs()
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "p.yml").write_text(
        "name: lab\nimage: tiny\nhosts:\n  - h1\n  - h7\n  - 'label:ssd'\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_pools([Path("pools")], hosts)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("pools/p.yml:5: hosts[1]: no host named 'h7' in the settings")
    assert lines[1].startswith("pools/p.yml:6: hosts[2]: no host has the label 'ssd'")
    assert load_pools([Path("pools")]) and load_pools([Path("pools")], None)  # unchecked
    with pytest.raises(ConfigError) as single:
        load_pools([Path("pools")], ())
    assert "the settings have no 'hosts:' list" in str(single.value)
