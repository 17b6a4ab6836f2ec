"""How much imagepipe adds to a Packer build, and how fast an up-to-date build returns.

    .venv/bin/python benchmarks/bench_build.py [--rounds 3]

Measured in the same run, on the `tiny` image (QEMU, TCG):
  1. `imagepipe build tiny --force` (render, validate, prepare, packer build, register)
  2. plain `packer build` of the same rendered template, with the same guest files
  3. `imagepipe build tiny` when nothing changed (fingerprint match, no Packer build)
Goals: overhead ratio (1 / 2) <= 1.1; up-to-date build < 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "from imagepipe.cli.app import run; run()"  # the `imagepipe` entry point


def timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])}… failed:\n{done.stdout}\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        config = work / "imagepipe.yml"
        config.write_text(
            f"packer_dir: {ROOT / 'packer'}\nregistry: {work / 'registry'}\n"
            f"image_store: {work / 'images'}\npools_dir: {work / 'pools'}\n"
            f"state_db: {work / 'state.db'}\n"
        )
        imagepipe = [sys.executable, "-c", CLI, "--config", str(config), "build", "tiny"]
        # byte-code written, as an installed imagepipe has it (the dry run writes it)
        ours_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        kept = work / "kept"
        subprocess.run(
            [*imagepipe, "--dry-run", "--keep-build-dir"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env=ours_env,
        )
        rendered = next((work / "images" / ".builds").iterdir())
        shutil.move(rendered, kept)
        subprocess.run(
            [str(ROOT / "packer/tiny/guest/build-guest.sh"), str(kept / "guest-out")],
            check=True,
            capture_output=True,
        )
        env = {**os.environ, "CHECKPOINT_DISABLE": "1"}
        ours, plain = [], []
        for _ in range(rounds):
            ours.append(timed([*imagepipe, "--force"], ROOT, ours_env))
            shutil.rmtree(kept / "output", ignore_errors=True)
            plain.append(timed(["packer", "build", "-machine-readable", "tiny.pkr.hcl"], kept, env))
        noop = [timed(imagepipe, ROOT, ours_env) for _ in range(rounds)]
        ours_s, plain_s = statistics.median(ours), statistics.median(plain)
        print(f"imagepipe build tiny --force   median {ours_s:6.2f} s  ({rounds} rounds)")
        print(f"plain packer build (same tmpl) median {plain_s:6.2f} s")
        print(f"overhead ratio                 {ours_s / plain_s:6.2f}   (goal <= 1.10)")
        print(
            f"up-to-date build (no-op)       median {statistics.median(noop):6.2f} s  "
            "(goal < 1 s, includes Python start-up)"
        )
    finally:
        for path in sorted(work.rglob("*"), reverse=True):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
