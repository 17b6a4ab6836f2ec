"""Run `imagepipe ARGS…` with tracemalloc on, dumping a snapshot of the Python heap every
INTERVAL seconds into DIR as NNNN.snap (bench_soak_real.py --tracemalloc reads them):

    python benchmarks/_traced_keeper.py DIR INTERVAL --config imagepipe.yml keep

A debugging aid: tracemalloc makes the process slower and bigger, so a traced run's figures
are not the keeper's.
"""

from __future__ import annotations

import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 10  # frames kept per allocation: enough to see who called the allocating code


def dump_every(directory: Path, interval: float) -> None:
    ignore = tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__)
    n = 0
    while True:
        time.sleep(interval)
        snapshot = tracemalloc.take_snapshot().filter_traces([ignore])
        partial = directory / f"{n:04d}.snap.partial"
        snapshot.dump(str(partial))
        partial.rename(directory / f"{n:04d}.snap")  # a reader never sees half a snapshot
        n += 1


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} DIR INTERVAL IMAGEPIPE-ARGS…")
    directory, interval = Path(sys.argv[1]), float(sys.argv[2])
    directory.mkdir(parents=True, exist_ok=True)
    sys.argv = ["imagepipe", *sys.argv[3:]]
    tracemalloc.start(FRAMES)
    threading.Thread(target=dump_every, args=(directory, interval), daemon=True).start()
    runpy.run_module("imagepipe", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
