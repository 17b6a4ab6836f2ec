"""Running the web entrance: built from the settings, in the foreground (`imagepipe web`, the
imagepipe-web service) or as a background process the demo starts and `demo --down` stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from imagepipe.config import Settings
from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.log import fields
from imagepipe.pool.model import Endpoint

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def web_url(settings: Settings) -> str:
    """The address a browser opens, from the settings."""
    if settings.web is None:
        raise BadInputError(f"no web entrance in {settings.source}: add web: {{bind: ...}}")
    bind = web_bind(settings)
    host = f"[{bind.host}]" if ":" in bind.host else bind.host
    return f"{'https' if settings.web.tls else 'http'}://{host}:{bind.port}/"


def web_bind(settings: Settings) -> Endpoint:
    """web.bind ("127.0.0.1:6080", "[::1]:6080"; checked when the settings were read)."""
    assert settings.web is not None
    host, _, port = settings.web.bind.rpartition(":")
    return Endpoint(host.removeprefix("[").removesuffix("]"), int(port))


def serve_web(settings: Settings) -> None:
    """Serve the entrance until SIGTERM or SIGINT."""
    from imagepipe.web.entrance import WebEntrance

    web = settings.web
    if web is None:
        raise BadInputError(
            f"no web entrance in {settings.source}: add web: {{bind: 127.0.0.1:6080}} "
            "(and web.tls {cert, key} for any other address)"
        )
    tls = None if web.tls is None else (web.tls.cert, web.tls.key)
    entrance = WebEntrance(bind=web_bind(settings), balancer=settings.web_balancer_socket, tls=tls)

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return: not from its own thread
        threading.Thread(target=entrance.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "web entrance serving",
        extra=fields(url=entrance.url, balancer=str(settings.web_balancer_socket)),
    )
    try:
        entrance.serve_forever()
    finally:
        entrance.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("web entrance stopped")


def pid_file(settings: Settings) -> Path:
    return settings.run_dir / "web.pid"


def running_pid(settings: Settings) -> int | None:
    """The pid of the background entrance for these settings, if it is alive."""
    try:
        pid = int(pid_file(settings).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    ours = (
        b"imagepipe" in cmdline and b"web" in cmdline and str(settings.source).encode() in cmdline
    )
    return pid if ours else None


def start_web_background(settings: Settings, config: Path) -> int:
    """`imagepipe --config CONFIG web` in its own session, outliving the caller (as the
    managed HAProxy does); its log is run_dir/web.log. Returns its pid."""
    pid = running_pid(settings)
    if pid is not None:
        return pid
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "web.log").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagepipe", "--config", str(config), "web"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_file(settings).write_text(f"{process.pid}\n")
    url = web_url(settings)
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(settings):
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                process.kill()
            raise OperationFailedError(
                f"the web entrance did not start on {url}; see {settings.run_dir / 'web.log'}"
            )
        time.sleep(0.1)
    return process.pid


def stop_web_background(settings: Settings) -> bool:
    """Stop the background entrance; False when none was running."""
    pid = running_pid(settings)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        time.sleep(0.05)
    else:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    pid_file(settings).unlink(missing_ok=True)
    return True


def _answers(settings: Settings) -> bool:
    import socket

    assert settings.web is not None
    bind = web_bind(settings)
    try:
        with socket.create_connection((bind.host, bind.port), timeout=1.0):
            return True
    except OSError:
        return False
