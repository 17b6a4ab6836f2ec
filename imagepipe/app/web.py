"""Running the web entrance: built from the settings, in the foreground (`imagepipe web`, the
imagepipe-web service) or as a background process the demo starts and `demo --down` stops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from imagepipe.app.pidlock import holder, holding, stop_holder
from imagepipe.config import Settings
from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.log import fields
from imagepipe.pool.model import Endpoint
from imagepipe.private import private_dir

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
    with holding(pid_file(settings), _already_serving(settings)):
        entrance = WebEntrance(
            bind=web_bind(settings), balancer=settings.web_balancer_socket, tls=tls
        )

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


def _already_serving(settings: Settings) -> Callable[[int | None], str]:
    def message(pid: int | None) -> str:
        return f"a web entrance for {settings.source} runs already (pid {pid})"

    return message


def pid_file(settings: Settings) -> Path:
    """Locked by the running entrance, with its pid in it (imagepipe.app.pidlock)."""
    return settings.run_dir / "web.pid"


def start_web_background(settings: Settings, config: Path) -> int:
    """`imagepipe --config CONFIG web` in its own session, outliving the caller (as the
    managed HAProxy does); its log is run_dir/web.log. Returns its pid; an entrance that
    already runs for these settings is left as it is."""
    running = holder(pid_file(settings))
    if running is not None:
        return running
    if _answers(settings):
        raise OperationFailedError(
            f"another program listens on {web_url(settings)}: stop it, or change web.bind "
            f"in {settings.source}"
        )
    private_dir(settings.run_dir)
    with (settings.run_dir / "web.log").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagepipe", "--config", str(config), "web"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(settings):
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                process.kill()
            raise OperationFailedError(
                f"the web entrance did not start on {web_url(settings)}; "
                f"see {settings.run_dir / 'web.log'}"
            )
        time.sleep(0.1)
    return process.pid


def stop_web_background(settings: Settings) -> bool:
    """Stop the entrance serving these settings; False when none was running."""
    pid = stop_holder(pid_file(settings), "the web entrance", timeout=STOP_TIMEOUT)
    return pid is not None


def _answers(settings: Settings) -> bool:
    import socket

    assert settings.web is not None
    bind = web_bind(settings)
    try:
        with socket.create_connection((bind.host, bind.port), timeout=1.0):
            return True
    except OSError:
        return False
