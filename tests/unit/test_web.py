"""The web entrance's settings, HAProxy bind and PROXY header: what is refused, what is sent."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from imagepipe.app.web import web_url
from imagepipe.balancers.haproxy.config import HAProxyConfig, render_config
from imagepipe.cli import demo as demo_cli
from imagepipe.config import load_settings
from imagepipe.errors import BadInputError, ConfigError
from imagepipe.pool.model import Endpoint
from imagepipe.web.entrance import served
from imagepipe.web.proxy_header import proxy_v1_header


def settings_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yml"
    path.write_text(text)
    return path


def test_no_web_block_means_no_entrance_and_no_haproxy_bind_for_it(tmp_path: Path) -> None:
    settings = load_settings(settings_file(tmp_path, "run_dir: /srv/run\n"))
    assert settings.web is None
    text = render_config(HAProxyConfig(Endpoint("127.0.0.1", 5999), Path("/srv/run/h.sock")))
    assert "accept-proxy" not in text


def test_a_web_block_gets_its_own_proxy_protocol_bind_on_the_same_backend(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        settings_file(
            tmp_path,
            "run_dir: run\nweb: {bind: 0.0.0.0:443, tls: {cert: tls/c.pem, key: tls/k.pem}}\n",
        )
    )
    assert settings.web is not None and settings.web.tls is not None
    assert settings.web.tls.cert == tmp_path / "tls" / "c.pem"
    assert settings.web_balancer_socket == tmp_path / "run" / "web.sock"
    cfg = HAProxyConfig(
        Endpoint("127.0.0.1", 5999), Path("/r/h.sock"), web_socket=Path("/r/web.sock")
    )
    lines = [line.strip() for line in render_config(cfg).splitlines()]
    web = lines.index("frontend desktops_web")
    assert lines[web + 1] == "bind unix@/r/web.sock mode 600 accept-proxy"
    assert lines[web + 2] == "default_backend desktops"
    assert "bind 127.0.0.1:5999" in lines  # the VNC/RDP users' bind is unchanged


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "web: {bind: 0.0.0.0:8080}\n",
            "s.yml:1: web.bind: plain HTTP is only served on a loopback address, not 0.0.0.0",
        ),
        (
            "web:\n  bind: '[::]:80'\n",
            "s.yml:2: web.bind: plain HTTP is only served on a loopback address, not ::",
        ),
        ("web: {bind: localhost:80}\n", "s.yml:1: web.bind: expected an IP address and port"),
        ("web: {}\n", "s.yml:1: web.bind: required key is missing"),
        (
            "web:\n  bind: 127.0.0.1:80\n  tls: {cert: c.pem}\n",
            "s.yml:3: web.tls.key: required key is missing",
        ),
        ("web: {bind: 127.0.0.1:80, port: 1}\n", "s.yml:1: web.port: unknown key"),
        (
            "balancer: {driver: ipvs, vip: 10.0.0.1}\nweb: {bind: 127.0.0.1:80}\n",
            "s.yml:2: web: the web entrance needs balancer.driver: haproxy",
        ),
    ],
)
def test_a_bad_web_block_is_refused_naming_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_file(tmp_path, text))
    first = str(caught.value).splitlines()[0]
    assert expected in first, str(caught.value)


def test_plain_http_on_a_loopback_address_is_allowed(tmp_path: Path) -> None:
    for bind in ("127.0.0.1:6080", "'[::1]:6080'"):
        settings = load_settings(settings_file(tmp_path, f"web: {{bind: {bind}}}\n"))
        assert settings.web is not None and settings.web.tls is None


def test_the_proxy_header_names_the_browser_user_not_the_entrance() -> None:
    assert (
        proxy_v1_header(("192.0.2.7", 51000), ("127.0.0.1", 6080))
        == b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 6080\r\n"
    )
    assert (
        proxy_v1_header(("2001:db8::7", 51000), ("::1", 443))
        == b"PROXY TCP6 2001:db8::7 ::1 51000 443\r\n"
    )
    # a dual-stack listener sees IPv4 users as mapped addresses: sent as the IPv4 they are
    assert proxy_v1_header(("::ffff:192.0.2.7", 1), ("::", 443)).startswith(
        b"PROXY TCP4 192.0.2.7 0.0.0.0 "
    )
    with pytest.raises(BadInputError):
        proxy_v1_header(("not-an-address", 1), ("127.0.0.1", 2))


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/vnc.html", True),
        ("/vnc_lite.html?x=1", True),
        ("/core/rfb.js", True),
        ("/app/styles/base.css", True),
        ("/utils/novnc_proxy", False),
        ("/core/", False),
        ("/../etc/passwd", False),
        ("/core/%2e%2e/%2e%2e/etc/passwd", False),
        ("/app/.secret", False),
        ("/", False),
        ("/websockify", False),
    ],
)
def test_only_novncs_own_files_are_served(path: str, ok: bool) -> None:
    assert served(path) is ok


def test_the_demo_has_a_loopback_entrance_and_prints_its_url_beside_the_vnc_address(
    tmp_path: Path,
) -> None:
    files = demo_cli.write_demo_files(tmp_path / "demo", load_settings(None))
    settings = load_settings(files.settings)
    assert settings.web is not None and settings.web.tls is None
    out = io.StringIO()

    demo_cli._print_howto(Console(file=out, width=200), files, keeping=True, url=web_url(settings))

    text = out.getvalue()
    assert "VNC viewer to 127.0.0.1:5999" in text
    assert "or open http://127.0.0.1:6080/ in a web browser" in text
