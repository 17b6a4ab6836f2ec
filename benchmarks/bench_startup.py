"""How long the `imagepipe` command takes to start, as a multiple of a bare Python start.

    .venv/bin/python benchmarks/bench_startup.py [--rounds 15]

Measured in the same run, rounds interleaved so a loaded host slows every command alike:
  1. `python -c pass`                        the floor: an interpreter that does nothing
  2. `python -c "import typer, yaml"`         what any command needs before its own code
  3. `imagepipe --help`                      the command table and typer's rich help
  4. `imagepipe status --json`               one pool file, libvirt's test:///default driver
                                             (no daemon), no balancer: start-up, settings,
                                             pool file, one observation, JSON
Goals: 3 and 4 at most 9x the floor (median of the rounds). Byte-code is written (as an
installed imagepipe has it), whatever PYTHONDONTWRITEBYTECODE says, so no run compiles sources.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_build import timed  # runs one command, exits with its output if it fails

POOL = """\
name: lab
image: tiny
size: {initial: 1, free: 1, max: 2}
display: {port_range: 5900-5901}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        (work / "pools").mkdir()
        (work / "pools" / "lab.yml").write_text(POOL)
        config = work / "imagepipe.yml"
        config.write_text(
            f"pools_dir: {work / 'pools'}\nregistry: {work / 'registry'}\n"
            f"image_store: {work / 'images'}\nstate_db: {work / 'state.db'}\n"
            f"run_dir: {work / 'run'}\n"
            "hypervisor: {driver: libvirt, uri: 'test:///default'}\nbalancer: {driver: none}\n"
        )
        entry = [sys.executable, "-m", "imagepipe"]
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import typer, yaml": [sys.executable, "-c", "import typer, yaml"],
            "imagepipe --help": [*entry, "--help"],
            "imagepipe status --json": [*entry, "--config", str(config), "status", "--json"],
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
            goal = "   (goal <= 9x)" if name.startswith("imagepipe") else ""
            print(f"{name:30} median {median * 1000:7.1f} ms  {median / floor:5.1f}x{goal}")
        print(f"({rounds} rounds, interleaved)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
