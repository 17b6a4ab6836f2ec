"""The demo keeper's pid file is a lock: a stale file or a reused pid is never taken for a
running keeper, a second holder is refused, and stopping the holder waits until it let go."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepipe.app.pidlock import holding, stop_holder
from imagepipe.errors import BadInputError

HOLDER = """
import sys, time
from pathlib import Path
from imagepipe.app.pidlock import holding
with holding(Path(sys.argv[1]), str):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_stopping_it_frees_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "keeper.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        assert path.stat().st_mode & 0o777 == 0o600
        refused = holding(path, lambda pid: f"kept by {pid}")
        with pytest.raises(BadInputError, match=f"kept by {holder.pid}"), refused:
            pass
        assert stop_holder(path, "the holder", timeout=30) == holder.pid
        assert holder.wait(timeout=5) != 0  # killed by SIGTERM
        with holding(path, str):
            assert path.read_text() == f"{os.getpid()}\n"
    finally:
        holder.kill()
        holder.wait()


def test_a_pid_file_nobody_holds_is_not_a_running_process(tmp_path: Path) -> None:
    path = tmp_path / "keeper.pid"
    path.write_text(f"{os.getpid()}\n")  # a live pid, but no lock: stale
    started = time.monotonic()
    assert stop_holder(path, "the holder", timeout=30) is None
    assert stop_holder(tmp_path / "none.pid", "the holder", timeout=30) is None
    assert time.monotonic() - started < 5
