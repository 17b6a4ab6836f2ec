"""An IPVS director test machine: Debian's cloud kernel (which has ip_vs) booted under QEMU
(TCG, direct kernel boot) from the initramfs packer/ipvs-director/build-director.sh makes.

    files = build_director(tmp)            # vmlinuz + initrd.img (cached after the first run)
    with Director.boot(files, workdir) as director:
        director.runner.run(["ipvsadm", "-S", "-n"])   # runs inside the machine, as root
        director.frontend                  # 127.0.0.1:PORT on this host -> the VIP's port
        director.desktop_host              # how the machine reaches this host's loopback

Network: two QEMU user-mode networks and nothing else. Clients on this host reach the VIP
through a port forward on 127.0.0.1; the machine reaches real servers listening on this
host's 127.0.0.1 at 10.0.3.2. No other address is ever a target. The machine is started and
killed by PID.
"""

from __future__ import annotations

import base64
import itertools
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from imagepipe.balancers.ipvs.runner import CommandResult
from imagepipe.pool.model import Endpoint
from tests.host import free_port

REPO = Path(__file__).resolve().parent.parent
BUILD_DIRECTOR = REPO / "packer" / "ipvs-director" / "build-director.sh"
VIP = "10.0.2.100"  # on the machine's eth0; QEMU forwards the frontend port here
VIP_PORT = 3389
DESKTOP_HOST = "10.0.3.2"  # this host's loopback, seen from the machine's eth1


@dataclass(frozen=True)
class DirectorFiles:
    kernel: Path
    initrd: Path


def build_director(outdir: Path) -> DirectorFiles:
    """Run build-director.sh into outdir (cached in $IMAGEPIPE_CACHE after the first run)."""
    done = subprocess.run(
        [str(BUILD_DIRECTOR), str(outdir)], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"build-director.sh exited {done.returncode}: {done.stderr.strip()}")
    return DirectorFiles(outdir / "vmlinuz", outdir / "initrd.img")


class AgentRunner:
    """A CommandRunner that runs each command inside the machine through its serial agent."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.calls = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        with self._lock:
            self.calls += 1
            return self._request(tuple(argv), stdin, self.timeout)

    def wait_ready(self, timeout: float) -> None:
        """Ask until the agent answers (it starts once the machine has booted)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                try:
                    self._request(("true",), None, 0.5)
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"the director's agent did not answer in {timeout} s"
                        ) from None

    def close(self) -> None:
        self._sock.close()

    def _request(self, argv: tuple[str, ...], stdin: str | None, timeout: float) -> CommandResult:
        rid = f"r{next(self._ids)}"
        command = base64.b64encode(shlex.join(argv).encode()).decode()
        data = base64.b64encode((stdin or "").encode()).decode()
        self._sock.sendall(f"{rid} {command} {data}\n".encode())
        end = f"@@END {rid} ".encode()
        deadline = time.monotonic() + timeout
        while True:
            at = self._buffer.find(end)
            if at >= 0:
                stop = self._buffer.find(b"\n", at)
                if stop >= 0:
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the director's agent to {shlex.join(argv)}")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError("the director's agent closed its serial port")
            self._buffer += chunk
        reply, self._buffer = self._buffer[: stop + 1], self._buffer[stop + 1 :]
        text = reply.decode("ascii", "replace").replace("\r", "")
        out_at = text.rfind(f"@@OUT {rid}\n")
        err_at = text.find(f"@@ERR {rid}\n", out_at)
        end_at = text.find(f"@@END {rid} ", err_at)
        if min(out_at, err_at, end_at) < 0:
            raise ConnectionError(f"garbled reply from the director's agent: {text[-200:]!r}")
        stdout = _decode(text[out_at + len(f"@@OUT {rid}\n") : err_at])
        stderr = _decode(text[err_at + len(f"@@ERR {rid}\n") : end_at])
        code = int(text[end_at + len(f"@@END {rid} ") :].strip())
        return CommandResult(argv, code, stdout, stderr)


def _decode(lines: str) -> str:
    return base64.b64decode("".join(lines.split())).decode("utf-8", "replace")


class Director:
    """One running director machine."""

    def __init__(self, process: subprocess.Popen[bytes], workdir: Path, frontend: Endpoint):
        self.process = process
        self.workdir = workdir
        self.frontend = frontend
        self.vip = Endpoint(VIP, VIP_PORT)
        self.desktop_host = DESKTOP_HOST
        self.runner = AgentRunner(workdir / "agent.sock")
        self.boot_seconds = 0.0

    @classmethod
    def boot(cls, files: DirectorFiles, workdir: Path, *, timeout: float = 120.0) -> Director:
        workdir.mkdir(parents=True, exist_ok=True)
        frontend = Endpoint("127.0.0.1", free_port())
        sock = workdir / "agent.sock"
        sock.unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-m", "256",
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(files.kernel),
            "-initrd", str(files.initrd),
            "-append", f"console=ttyS0 panic=-1 quiet imagepipe.vip={VIP}/24",
            "-serial", f"file:{workdir / 'console.log'}",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-serial", "chardev:agent",
            "-netdev",
            f"user,id=front,net=10.0.2.0/24,"
            f"hostfwd=tcp:127.0.0.1:{frontend.port}-{VIP}:{VIP_PORT}",
            "-device", "virtio-net-pci,netdev=front",
            "-netdev", "user,id=back,net=10.0.3.0/24",
            "-device", "virtio-net-pci,netdev=back",
        ]  # fmt: skip
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if process.poll() is not None:
                    err = process.stderr.read().decode() if process.stderr else ""
                    raise RuntimeError(f"qemu exited {process.returncode}: {err.strip()}")
                if time.monotonic() > deadline:
                    raise TimeoutError("qemu did not create the agent socket")
                time.sleep(0.02)
            director = cls(process, workdir, frontend)
            director.runner.wait_ready(timeout)
        except BaseException:
            _kill(process)
            raise
        director.boot_seconds = time.monotonic() - started
        return director

    def run(self, *argv: str) -> CommandResult:
        """Run a command inside the machine; fail the test if it fails."""
        result = self.runner.run(argv)
        assert result.ok, result.describe()
        return result

    def console(self) -> str:
        path = self.workdir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.runner.close()
        _kill(self.process)

    def __enter__(self) -> Director:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Kill our QEMU by its PID and reap it."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
