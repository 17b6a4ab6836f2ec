"""Desktops in a browser, end to end on real components: `imagepipe keep` (libvirt + QEMU
desktops behind HAProxy, `balancer.persist: source`), `imagepipe web` (noVNC from Debian's
`novnc`, websockify), and headless Chromium driven by selenium, as users would use them.

Each browser is a user on a machine of its own: it reaches the entrance through a relay on
loopback that connects from an address of that user (127.0.0.x), as a user's own machine
would; the entrance, HAProxy and the keeper see only that address.

What the checks prove, and how (no OCR here):
- which desktop a page shows: the noVNC canvas's pixels are compared with a framebuffer grab
  of every desktop of the pool (`virsh screenshot`); the page must match one desktop's screen
  (all but a few pixels: the text cursor blinks) and differ from every other's. The desktops'
  screens differ in the name the tiny guest draws on them (its banner and login prompt), so a
  match says the page shows that desktop's own login screen with its name;
- that keys typed in the page log a user in: the keeper's status shows the user on that
  desktop (the guest agent reports logins on the screen's console);
- that a returning browser gets its own desktop back, and the next user a reset one: the
  canvas matches that desktop again; on the reset desktop the folder the previous user made
  (typed in the page) is gone.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.e2e.harness import (
    Installation,
    PoolFile,
    clone,
    free_ready,
    require_real_host,
    temp_root,
)
from tests.host import URI, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "webe2e"
FREE = 2
MAX = 4
PORTS = (6150, 6157)
RECYCLE_AFTER = 3  # seconds
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NOVNC = Path("/usr/share/novnc/vnc.html")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1024,700",
)
# A page shows a desktop when at most this many pixels differ from its framebuffer: the text
# cursor (9x2 pixels) may blink between the two grabs. Two desktops' login screens differ by
# more: one digit of their names, in the banner and in the prompt, is some 90 pixels.
MATCH = 40
PAGE_WAIT = 90.0
TYPE_DELAY = 0.15  # seconds between keys
FILL_WAIT = 600.0  # the first fill makes a warm parent too; TCG on a shared 2-core host


class WebHost(Installation):
    """The E2E harness's installation, for this module's pool, plus the entrance."""

    web: subprocess.Popen[bytes] | None = None
    web_port: int = 0
    alice_on: str = ""  # the desktop alice logged in on from her browser

    def start_web(self) -> None:
        log = (self.root / "web.log").open("wb")
        self.web = subprocess.Popen(
            [sys.executable, "-m", "imagepipe", "--config", str(self.config), "web"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.web_port), 1),
            ):
                return
            if self.web.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"imagepipe web did not start:\n{self.web_log()}")
            time.sleep(0.2)

    def web_log(self) -> str:
        return (self.root / "web.log").read_text(errors="replace")[-4000:]


class Relay:
    """A user's own machine: a loopback port whose connections reach the entrance from the
    user's address."""

    def __init__(self, target: int, source: str) -> None:
        self.source = source
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inner, _ = self.listener.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", self.target), 10, (self.source, 0))
            except OSError:
                inner.close()
                continue
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        src.settimeout(None)
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@dataclass
class Browser:
    """Headless Chromium with a fresh profile, on a user's machine (its Relay)."""

    relay: Relay
    profile: Path
    driver: Any = None
    shots: list[Path] = field(default_factory=list)

    def open(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.get(f"http://127.0.0.1:{self.relay.port}/")

    def connected(self) -> bool:
        script = "return document.documentElement.classList.contains('noVNC_connected')"
        return bool(self.driver.execute_script(script))

    def canvas(self) -> Any:
        """The noVNC canvas's pixels (the desktop's screen as the page has it)."""
        from PIL import Image

        data = self.driver.execute_script(
            "const c = document.querySelector('#noVNC_container canvas');"
            "return c && c.width > 16 ? c.toDataURL('image/png') : null;"
        )
        if not data:
            return None
        raw = base64.b64decode(data.split(",", 1)[1])
        return Image.open(io.BytesIO(raw)).convert("RGB")

    def type(self, text: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        canvas = self.driver.find_element(By.CSS_SELECTOR, "#noVNC_container canvas")
        canvas.click()  # the keyboard goes to the focused canvas
        for key in text:  # at a typist's pace: a busy TCG guest's keyboard queue is short
            ActionChains(self.driver).send_keys(key).perform()
            time.sleep(TYPE_DELAY)

    def screenshot(self, path: Path) -> Path:
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        return path

    def close(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.quit()
            self.driver = None


def framebuffer(domain: str, into: Path) -> Any:
    """The desktop's screen as QEMU draws it (libvirt's screenshot), or None when the domain
    is not running at this moment (the keeper resets a desktop a closed tab left dirty)."""
    from PIL import Image

    path = into / f"{domain}-{time.monotonic_ns()}.img"
    taken = subprocess.run(
        ["virsh", "-c", URI, "screenshot", domain, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if taken.returncode != 0:
        return None
    with Image.open(path) as image:
        return image.convert("RGB")


def differing(a: Any, b: Any) -> int:
    """How many pixels differ (every pixel when the sizes differ)."""
    from PIL import ImageChops

    if a.size != b.size:
        return int(max(a.size[0] * a.size[1], b.size[0] * b.size[1]))
    diff = ImageChops.difference(a, b).convert("L").point(lambda v: 255 if v > 48 else 0)
    return int(diff.histogram()[255])


@dataclass
class Match:
    desktop: str
    pixels: int  # differing from its framebuffer
    others: dict[str, int]  # differing from each other desktop's


def shown_desktop(host: WebHost, browser: Browser) -> Match:
    """Which desktop's screen the page shows: the one whose framebuffer matches the canvas
    (waits until one does). The running desktops are read anew each round: the keeper may be
    resetting one that a closed tab left dirty."""
    deadline = time.monotonic() + PAGE_WAIT
    last: dict[str, int] = {}
    while time.monotonic() < deadline:
        canvas = browser.canvas() if browser.connected() else None
        if canvas is not None:
            screens = {d: framebuffer(d, host.root) for d in running_desktops(host.status())}
            last = {d: differing(canvas, s) for d, s in screens.items() if s is not None}
            if not last:
                time.sleep(1.0)
                continue
            best = min(last, key=lambda d: last[d])
            if last[best] <= MATCH:
                others = {d: s for d, s in last.items() if d != best}
                return Match(best, last[best], others)
        time.sleep(1.0)
    browser.screenshot(host.root / "no-match.png")
    raise AssertionError(
        f"the page never showed a desktop's screen; pixel differences: {last}\n"
        f"web log:\n{host.web_log()}\nkeeper log:\n{host.keeper_output()}"
    )


def wait_for_listing(host: WebHost, desktop: str, name: str) -> None:
    """Keys reach the guest after `type` returns: wait (on the desktop's serial console, as
    another user) until the command typed in the page has made /home/<name>."""
    deadline = time.monotonic() + PAGE_WAIT
    with host.console(desktop) as console:
        console.login("checker")
        while name not in console.run("ls /home"):
            assert time.monotonic() < deadline, f"/home/{name} never appeared on {desktop}"
            time.sleep(1.0)
        console.logout()


def running_desktops(pool: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pool["clones"] if c["power"] == "running"]


@pytest.fixture(scope="module")
def host() -> Iterator[WebHost]:
    require_real_host("packer", "haproxy")
    for program in (CHROMIUM, CHROMEDRIVER):
        require(Path(program).exists(), f"{program} is missing (apt-get install chromium-driver)")
    require(NOVNC.is_file(), "noVNC is not installed (apt-get install novnc)")
    web_port = free_port()
    h = WebHost(
        temp_root("ipe-web-"),
        PoolFile(POOL, FREE, MAX, PORTS, recycle_after=f"{RECYCLE_AFTER}s"),
        balancer=", persist: source",
        settings=f"web: {{bind: '127.0.0.1:{web_port}'}}\n",
        wait=FILL_WAIT,  # the first fill makes a warm parent too
    )
    h.web_port = web_port
    try:
        h.cli("build", "tiny")
        h.start_keeper()
        h.start_web()
        yield h
    finally:
        if h.web is not None:
            h.web.terminate()
            h.web.wait(timeout=30)
        h.close()


@contextlib.contextmanager
def browsers(host: WebHost, *sources: str) -> Iterator[list[Browser]]:
    relays = [Relay(host.web_port, source) for source in sources]
    opened = [Browser(r, Path(tempfile.mkdtemp(dir=host.root, prefix="chromium-"))) for r in relays]
    try:
        for browser in opened:
            browser.open()
        yield opened
    finally:
        for browser in opened:
            browser.close()
        for relay in relays:
            relay.close()


def test_two_browsers_get_two_desktops_typing_logs_in_and_a_returning_browser_gets_its_own(
    host: WebHost,
) -> None:
    host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    started = time.monotonic()
    with browsers(host, "127.0.0.41", "127.0.0.42") as (first, second):
        mine = shown_desktop(host, first)
        theirs = shown_desktop(host, second)
        assert mine.desktop != theirs.desktop, "two browsers at once share one desktop"
        for match in (mine, theirs):
            assert min(match.others.values()) > MATCH, f"screens too alike to tell: {match}"
        first.screenshot(host.root / "login.png")
        host.wait_for(
            "both browsers' desktops in use",
            lambda p: all(clone(p, d)["state"] == "in_use" for d in (mine.desktop, theirs.desktop)),
        )
        backends = host.haproxy("show table desktops")
        assert "key=127.0.0.41" in backends and "key=127.0.0.42" in backends, backends

        host.alice_on = mine.desktop
        first.type("alice\n")
        host.wait_for(
            f"alice logged in on {mine.desktop}",
            lambda p: "alice" in clone(p, mine.desktop)["users"],
        )
        # no shifted characters: chromedriver's synthetic keys carry no Shift press, and
        # noVNC sends QEMU the physical key (">" would arrive as ".")
        first.type("mkdir /home/alice-was-here; sync\n")
        wait_for_listing(host, mine.desktop, "alice-was-here")
        first.screenshot(host.root / "logged-in.png")
        if os.environ.get("IMAGEPIPE_WEB_SCREENSHOT"):  # docs/img/browser.png is one
            shutil.copy(host.root / "logged-in.png", os.environ["IMAGEPIPE_WEB_SCREENSHOT"])
    print(f"two browsers, login: {time.monotonic() - started:.1f} s")

    # the tab is closed; the same user comes back from the same machine
    with browsers(host, "127.0.0.41") as (again,):
        back = shown_desktop(host, again)
        assert back.desktop == mine.desktop, "a returning browser got another desktop"
        assert clone(host.status(), mine.desktop)["users"] == ["alice"]
        again.type("exit\n")
    print(f"returning browser: {time.monotonic() - started:.1f} s")


def test_the_next_browser_user_gets_a_reset_desktop(host: WebHost) -> None:
    host.wait_for(
        "every desktop free again (alice logged off, her desktop reset)",
        lambda p: (
            len(free_ready(p)) >= FREE
            and all(not c["users"] and c["state"] == "free" for c in p["clones"])
        ),
    )
    with browsers(host, "127.0.0.43") as (third,):
        shown = shown_desktop(host, third)
        host.wait_for(
            f"{shown.desktop} in use", lambda p: clone(p, shown.desktop)["state"] == "in_use"
        )
        third.type("bob\n")
        host.wait_for(
            f"bob logged in on {shown.desktop}",
            lambda p: clone(p, shown.desktop)["users"] == ["bob"],
        )
    assert host.alice_on, "the first test did not log alice in"
    for desktop in sorted({shown.desktop, host.alice_on}):
        with host.console(desktop) as console:
            console.login("carol")
            listing = console.run("ls -a /home")
            assert "alice-was-here" not in listing, f"{desktop} was not reset after alice"
            console.logout()
