"""Running machines of the simulated VirtualBox as real QEMU guests (what VBoxHeadless is).

A launched machine boots the tiny image under QEMU (TCG): its disk is the machine's current
differencing medium (a qcow2 overlay), its VNC display listens on the machine's VRDE port
(TCP/Address:TCP/Ports), and:

- QMP's VNC_CONNECTED / VNC_DISCONNECTED events drive the VRDE server's state
  (Host.vrde_client: VRDEServerInfo, OnVRDEServerInfoChanged, /VirtualBox/HostInfo/VRDP/*);
- the guest agent's guest-get-users, polled once a second (as VBoxService in a guest does),
  feeds /VirtualBox/GuestInfo/OS/LoggedInUsers[List] (Host.guest_users);
- saveState migrates the guest's state to the saved-state file and the next launch restores
  it (-incoming); the power button is ACPI (system_powerdown); powerDown ends QEMU;
- an online snapshot pauses the guest, switches its disk to a new overlay
  (blockdev-snapshot-sync), migrates its state to the snapshot's state file and resumes it;
- what the Guest Additions' VBoxService does in a real guest: after a restore from a saved
  state it sets the guest's clock (`--timesync-set-on-restore`, on by default), and it reports
  the logged-in users; what a script in the image waiting on `VBoxControl guestproperty wait
  /imagepipe/identity/*` does: it gives the guest the name set there. Both are done through
  the tiny guest's agent (guest-set-time, imagepipe-set-identity).

    host = vboxsim.start(home, process_factory=QemuProcess)
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.vboxsim import codes as C
from tests.vboxsim.api import Host, MachineData

AGENT_PORT = "org.qemu.guest_agent.0"
IDENTITY_PROPERTY = "/imagepipe/identity/hostname"


# The DMI system strings a machine's firmware takes from its extra data (VirtualBox's
# VBoxInternal/Devices/<pcbios|efi>/0/Config/DmiSystem*) and QEMU's -smbios type=1 fields.
_DMI_SYSTEM = {"DmiSystemVendor": "manufacturer", "DmiSystemProduct": "product",
               "DmiSystemVersion": "version"}  # fmt: skip


def smbios_args(data: MachineData) -> list[str]:
    """QEMU's -smbios for the DMI extra data the machine's firmware (BIOS or EFI) reads, as
    VirtualBox's firmware puts them in the SMBIOS system table; `string:` is CFGM's marker of
    a string value."""
    device = "pcbios" if data.firmware_type == C.FIRMWARE_BIOS else "efi"
    fields = []
    for key, field in _DMI_SYSTEM.items():
        value = data.extra.get(f"VBoxInternal/Devices/{device}/0/Config/{key}")
        if value:
            value = value.removeprefix("string:").replace(",", ",,")
            fields.append(f"{field}={value}")
    return ["-smbios", ",".join(["type=1", *fields])] if fields else []


class QemuProcess:
    def __init__(self, host: Host, machine: MachineData) -> None:
        self.host, self.machine = host, machine
        self.dir = Path(tempfile.mkdtemp(prefix="vbs-", dir="/tmp"))  # short: unix sockets
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: socket.socket | None = None
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cmd_lock = threading.Lock()
        self._quit = threading.Event()
        self._guest_shutdown = False
        self._agent_commands: queue.Queue[dict[str, Any]] = queue.Queue()

    @property
    def console_path(self) -> Path:
        return self.dir / "console"

    def start(self, restore_from: Path | None) -> None:
        try:
            self._start(restore_from)
        except BaseException:
            self.kill()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _start(self, restore_from: Path | None) -> None:
        data = self.machine
        if data.disk is None or data.boot.kernel is None:
            raise RuntimeError(f"machine {data.name} has no disk or kernel to boot")
        address = data.vrde_properties.get("TCP/Address", "127.0.0.1") or "127.0.0.1"
        port = int(data.vrde_properties.get("TCP/Ports", "5900"))
        if data.vrde_enabled and port < 5900:
            raise RuntimeError(f"VRDE port {port} is below 5900, which QEMU's VNC cannot use")
        vnc = f"{address}:{port - 5900}" if data.vrde_enabled else "none"
        argv = [
            "qemu-system-x86_64", "-name", data.name, "-machine", "q35,accel=tcg",
            "-nodefaults", "-no-user-config",
            "-m", str(max(data.memory_mb, 64)), "-smp", str(data.cpus),
            "-kernel", str(data.boot.kernel), "-initrd", str(data.boot.initrd),
            "-append", data.boot.cmdline,
            "-drive", f"file={data.disk.location},if=virtio,format=qcow2,id=disk0",
            "-chardev", f"socket,id=con,path={self.console_path},server=on,wait=off",
            "-serial", "chardev:con",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=qga,path={self.dir / 'agent'},server=on,wait=off",
            "-device", f"virtserialport,chardev=qga,name={AGENT_PORT}",
            "-qmp", f"unix:{self.dir / 'qmp'},server=on,wait=off",
            "-vnc", vnc, "-vga", "std", "-display", "none",
        ]  # fmt: skip
        argv += smbios_args(data)
        if restore_from is not None:
            argv += ["-incoming", f"exec:cat {restore_from}"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._qmp = self._connect(self.dir / "qmp")
        self._qmp.sendall(b'{"execute":"qmp_capabilities"}\n')
        threading.Thread(target=self._read_qmp, daemon=True).start()
        self._replies.get(timeout=30)
        if restore_from is not None:
            self._wait_migration("inmigrate")
            self.command("cont")
            # VBoxService --timesync-set-on-restore: the guest wakes at the saved time
            now = time.time_ns()
            self._agent_commands.put({"execute": "guest-set-time", "arguments": {"time": now}})
        threading.Thread(target=self._watch, daemon=True).start()
        threading.Thread(target=self._poll_agent, daemon=True).start()

    def _connect(self, path: Path) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"QEMU exited: {err.strip()[-400:]}")
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(path))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _read_qmp(self) -> None:
        assert self._qmp is not None
        with contextlib.suppress(OSError):  # QEMU exited
            for line in self._qmp.makefile("rb"):
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "event" in message:
                    self._event(message)
                elif "return" in message or "error" in message:
                    self._replies.put(message)

    def _event(self, message: dict[str, Any]) -> None:
        name = message["event"]
        client = message.get("data", {}).get("client", {})
        if name == "VNC_INITIALIZED":
            self.host.vrde_client(self.machine, client.get("host"))
        elif name == "VNC_DISCONNECTED":
            self.host.vrde_client(self.machine, None)
        elif name == "SHUTDOWN" and message.get("data", {}).get("guest"):
            self._guest_shutdown = True

    def command(self, execute: str, **arguments: Any) -> dict[str, Any]:
        with self._cmd_lock:
            if self._qmp is None:
                return {}
            request = {"execute": execute, **({"arguments": arguments} if arguments else {})}
            try:
                self._qmp.sendall(json.dumps(request).encode() + b"\n")
                return self._replies.get(timeout=30)
            except (OSError, queue.Empty):
                return {}

    def _wait_migration(self, running: str) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"QEMU exited: {err.strip()[-400:]}")
            status = self.command("query-migrate").get("return", {}).get("status")
            if status == "completed" or (running == "inmigrate" and status is None):
                status_reply = self.command("query-status").get("return", {})
                if status_reply.get("status") not in (None, "inmigrate"):
                    return
            if status == "failed":
                raise RuntimeError("QEMU could not save or restore the machine's state")
            time.sleep(0.1)
        raise RuntimeError("QEMU took too long to save or restore the machine's state")

    def _watch(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self._quit.set()
        self.host.process_ended(self.machine, self._guest_shutdown)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _poll_agent(self) -> None:
        """What VBoxService does in a real guest: report the logged-in users (and pass on the
        commands queued for the guest)."""
        sync = 0
        first = True
        while first or not self._quit.wait(1.0):
            first = False
            try:
                with socket.socket(socket.AF_UNIX) as agent:
                    agent.settimeout(2)
                    agent.connect(str(self.dir / "agent"))
                    reader = agent.makefile("rb")
                    while not self._quit.is_set():
                        sync += 1
                        agent.sendall(
                            b'\xff{"execute":"guest-sync","arguments":{"id":%d}}\n' % sync
                        )
                        while json.loads(reader.readline().strip(b"\xff")).get("return") != sync:
                            pass
                        self._send_queued(agent, reader)
                        agent.sendall(b'{"execute":"guest-get-users"}\n')
                        reply = json.loads(reader.readline())
                        users = sorted({u["user"] for u in reply.get("return", [])})
                        self.host.guest_users(self.machine, users)
                        if self._quit.wait(1.0):
                            return
            except (OSError, ValueError):
                continue

    def _send_queued(self, agent: socket.socket, reader: Any) -> None:
        while True:
            try:
                request = self._agent_commands.get_nowait()
            except queue.Empty:
                return
            try:
                agent.sendall(json.dumps(request).encode() + b"\n")
                json.loads(reader.readline())
            except (OSError, ValueError):
                self._agent_commands.put(request)  # the next connection sends it
                raise

    def guest_property(self, name: str, value: str) -> None:
        if name == IDENTITY_PROPERTY and value:
            command = {"execute": "imagepipe-set-identity", "arguments": {"hostname": value}}
            self._agent_commands.put(command)

    def snapshot(self, state: Path, disk: Path) -> None:
        """An online snapshot: paused, the disk switched to `disk` (an overlay on the current
        one), the state saved to `state`, running again."""
        was_running = self.command("query-status").get("return", {}).get("running", False)
        self.command("stop")
        reply = self.command(
            "blockdev-snapshot-sync",
            device="disk0",
            **{"snapshot-file": str(disk), "format": "qcow2", "mode": "existing"},
        )
        if "error" in reply or not reply:
            raise RuntimeError(f"QEMU could not switch to the new disk: {reply.get('error')}")
        self.command("migrate", uri=f"exec:cat > {state}")
        self._wait_migration("active")
        if was_running:
            self.command("cont")

    def power_button(self) -> None:
        self.command("system_powerdown")

    def kill(self) -> None:
        self._quit.set()
        if self.proc is not None and self.proc.poll() is None:
            self.command("quit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pause(self) -> None:
        self.command("stop")

    def resume(self) -> None:
        self.command("cont")

    def save(self, path: Path) -> None:
        self.command("stop")
        self.command("migrate", uri=f"exec:cat > {path}")
        self._wait_migration("active")
        self._guest_shutdown = True
        self.kill()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
