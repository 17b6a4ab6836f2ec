"""How long the `imagepipe` command takes to start, as a multiple of a bare Python start.

    .venv/bin/python benchmarks/bench_startup.py [--rounds 15] [--instructions]

Measured in the same run, rounds interleaved so a loaded host slows every command alike:
  1. `python -c pass`                        the floor: an interpreter that does nothing
  2. `python -c "import typer, yaml"`         what any command needs before its own code
  3. `imagepipe --help`                      the command table and typer's rich help
  4. `imagepipe status --json`               one pool file, libvirt's test:///default driver
                                             (no daemon), no balancer: start-up, settings,
                                             pool file, one observation, JSON
  5. the same with 3 desktops                libvirt's test driver on a node file of three
                                             running clones (their sessions unreadable there,
                                             so the clone rules are not run)
Goals: 3 and 4 at most 9x the floor (median of the rounds). Byte-code is written (as an
installed imagepipe has it), whatever PYTHONDONTWRITEBYTECODE says, so no run compiles sources.
`--instructions` also counts the instructions each command executes once (valgrind's
cachegrind, when installed): the same ratios, whatever else the host is doing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_build import timed  # runs one command, exits with its output if it fails

POOL = """\
name: lab
image: tiny
size: {initial: 1, free: 1, max: 3}
display: {port_range: 5900-5902}
"""
CLONE = """\
  <domain type='test'>
    <name>lab-{slot}</name><memory>262144</memory><vcpu>1</vcpu><os><type>hvm</type></os>
    <metadata><imagepipe:clone xmlns:imagepipe="https://imagepipe.dev/xmlns/clone/1" pool="lab"
      image="tiny" version="1" slot="{slot}" mode="linked" base="/nonexistent/disk.qcow2"
      start="boot"/></metadata>
    <devices><graphics type='vnc' port='{port}' listen='127.0.0.1'/></devices>
  </domain>
"""


def settings(work: Path, name: str, uri: str) -> Path:
    path = work / name
    path.write_text(
        f"pools_dir: {work / 'pools'}\nregistry: {work / 'registry'}\n"
        f"image_store: {work / 'images'}\nstate_db: {work / 'state.db'}\n"
        f"run_dir: {work / 'run'}\n"
        f"hypervisor: {{driver: libvirt, uri: '{uri}'}}\nbalancer: {{driver: none}}\n"
    )
    return path


def instructions(argv: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Instructions `argv` executes (valgrind's cachegrind, no cache simulation)."""
    valgrind = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
    ]
    done = subprocess.run(
        [*valgrind, *argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"valgrind {' '.join(argv[:4])}… failed:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--instructions", action="store_true", help="count them (valgrind)")
    args = parser.parse_args()
    rounds = args.rounds
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        (work / "pools").mkdir()
        (work / "pools" / "lab.yml").write_text(POOL)
        config = settings(work, "imagepipe.yml", "test:///default")
        node = work / "node.xml"
        node.write_text(
            "<node>\n"
            + "".join(CLONE.format(slot=i, port=5900 + i) for i in range(3))
            + "</node>\n"
        )
        three = settings(work, "three.yml", f"test://{node}")
        entry = [sys.executable, "-m", "imagepipe"]
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import typer, yaml": [sys.executable, "-c", "import typer, yaml"],
            "imagepipe --help": [*entry, "--help"],
            "imagepipe status --json": [*entry, "--config", str(config), "status", "--json"],
            "  with 3 desktops": [*entry, "--config", str(three), "status", "--json"],
        }
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for argv in commands.values():  # warm the file cache and write the byte-code once
            timed(argv, work, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, argv in commands.items():
                times[name].append(timed(argv, work, env))
        floor = statistics.median(times["python -c pass"])
        for name, samples in times.items():
            median = statistics.median(samples)
            goal = "   (goal <= 9x)" if name.startswith(("imagepipe", "  ")) else ""
            print(f"{name:30} median {median * 1000:7.1f} ms  {median / floor:5.1f}x{goal}")
        print(f"({rounds} rounds, interleaved)")
        if args.instructions and shutil.which("valgrind"):
            counts = {name: instructions(argv, work, env) for name, argv in commands.items()}
            for name, count in counts.items():
                ratio = count / counts["python -c pass"]
                print(f"{name:30} {count / 1e6:8.1f} M instructions  {ratio:5.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
