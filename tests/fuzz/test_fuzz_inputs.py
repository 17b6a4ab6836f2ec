"""Fuzzing the readers through the real CLI: mutated pool and settings files, hostile values
in valid files, and random command-line arguments.

Every answer: exit 0, 2 or 3; no traceback; exit 2 names the file; a value a rule forbids
never exits 0; what exits 0 holds only values the rules allow (checked independently on the
--json output).

Quick and seeded by default (CI: a few seconds, the same cases every run). The long profile
explores, with fresh random cases each run:

    IMAGEPIPE_FUZZ=long .venv/bin/python -m pytest -q tests/fuzz --hypothesis-show-statistics
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagepipe.config import load_settings
from imagepipe.errors import ConfigError
from imagepipe.images.registry import NewVersion, Registry
from tests.hostile import check_answer, run, strict_json

REPO = Path(__file__).resolve().parents[2]
POOL_TEXTS = [(REPO / "pools" / n).read_text() for n in ("lab.yml", "classroom.yml")]
SETTINGS_TEXT = (REPO / "imagepipe.example.yml").read_text()

settings.register_profile(
    "fuzz-ci",
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz-long",
    max_examples=3000,
    derandomize=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
FUZZ = settings.get_profile(
    "fuzz-long" if os.environ.get("IMAGEPIPE_FUZZ") == "long" else "fuzz-ci"
)

# Values no rule allows wherever they go (in a valid file, each must give exit 2).
FORBIDDEN: list[tuple[str, str]] = [
    ("name", "Lab"),
    ("name", "lab-"),
    ("name", "'lab\u0663'"),
    ("image", "Tiny"),
    ("image", "''"),
    ("image", "'" + "t" * 100 + "'"),
    ("channel", "Stable"),
    ("channel", "'" + "c" * 100 + "'"),
    ("version", "v" + "9" * 50),
    ("version", "'\u0663'"),
    ("machine", "{memory: 1e400}"),
    ("machine", "{memory: '" + "9" * 300 + "G'}"),
    ("machine", "{memory: .inf}"),
    ("machine", "{cpus: " + "9" * 30 + "}"),
    ("sessions", "{recycle_after: .inf}"),
    ("sessions", "{recycle_after: .nan}"),
    ("sessions", "{recycle_after: 1" + "0" * 400 + "}"),
    ("sessions", "{recycle_after: 99999d}"),
    ("display", "{port_range: '\u0665\u0669\u0660\u0660-5999'}"),
    ("display", "{address: '\u0661\u0662\u0667.0.0.1'}"),
    ("timezone", "'../../etc/passwd'"),
    ("timezone", "'" + "z" * 300 + "'"),
    ("schedule", "[{days: [], from: '07:00', to: '08:00', free: 1}]"),
    ("schedule", "&s [*s]"),
    ("rollout", "{drain_deadline: 1e400}"),
    ("boot_timeout", "!!int x"),
    ("assignments", "{u: " + "9" * 5000 + "}"),
]

HOSTILE_TOKENS = [
    "!!int x",
    "!!float .",
    "!!bool maybe",
    '!!int ""',
    "!!binary AAAA",
    "!!python/none ''",
    "*a",
    "&a [*a]",
    "1e400",
    ".inf",
    "-.inf",
    ".nan",
    "\u0663",
    "\u0665\u0669\u0669\u0669",
    "9" * 5000,
    "1" + "0" * 400,
    "[" * 200,
    "{" * 200,
    "'",
    '"',
    "~",
    "[]",
    "{}",
    "-1",
    "0",
    "\x00",
    "\x1b",
    "\x7f",
    "\x85",
    "\ufffe",
    "\t",
    "---",
    "? [a]",
    "<<: {a: 1}",
    "%YAML 1.1",
]


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="imagepipe-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


mutation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 40)),
    st.tuples(st.just("replace"), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("token"), st.integers(0, 10_000), st.sampled_from(HOSTILE_TOKENS)),
    st.tuples(st.just("duplicate-line"), st.integers(0, 10_000), st.integers(1, 200)),
)


def mutate(text: str, ops: list[tuple[str, int, Any]]) -> bytes:
    data = text.encode()
    for op, at, arg in ops:
        at = at % (len(data) + 1)
        if op == "insert":
            data = data[:at] + arg + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + arg :]
        elif op == "replace":
            data = data[:at] + arg + data[at + len(arg) :]
        elif op == "token":  # a hostile value after the next key's colon
            colon = data.find(b": ", at)
            if colon >= 0:
                end = data.find(b"\n", colon)
                end = len(data) if end < 0 else end
                data = data[: colon + 2] + arg.encode("utf-8", "surrogatepass") + data[end:]
        else:  # a line repeated many times: duplicate keys, long files
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            line = data[start : (len(data) if end < 0 else end) + 1]
            data = data[:start] + line * arg + data[start:]
    return data


@FUZZ
@given(base=st.sampled_from(POOL_TEXTS), ops=st.lists(mutation, min_size=1, max_size=6))
def test_a_mutated_pool_file_is_accepted_only_when_every_value_is_allowed(
    work: Path, base: str, ops: list[tuple[str, int, Any]]
) -> None:
    path = _write(work, "pool.yml", mutate(base, ops))
    answer = run(["pools", "check", "--json", str(path)])
    check_answer(answer, file=str(path))
    if answer.code == 0:
        for pool in strict_json(answer.out):
            assert_pool_is_allowed(pool)


@FUZZ
@given(
    base=st.sampled_from(POOL_TEXTS),
    forbidden=st.sampled_from(FORBIDDEN),
    where=st.integers(0, 1000),
)
def test_a_forbidden_value_in_a_pool_file_never_exits_0(
    work: Path, base: str, forbidden: tuple[str, str], where: int
) -> None:
    key, value = forbidden
    # drop the key (and its block), then put `key: value` before any top-level line
    lines = re.sub(rf"(?m)^{key}:.*\n(?:[ #].*\n?)*", "", base).splitlines(keepends=True)
    tops = [i for i, line in enumerate(lines) if re.match(r"[a-z#]", line)] + [len(lines)]
    at = tops[where % len(tops)]
    text = "".join([*lines[:at], f"{key}: {value}\n", *lines[at:]])
    path = _write(work, "forbidden.yml", text.encode())
    answer = run(["pools", "check", "--json", str(path)])
    check_answer(answer, file=str(path))
    assert answer.code == 2, (text, answer)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=6))
def test_a_mutated_settings_file_is_accepted_only_when_every_value_is_allowed(
    work: Path, ops: list[tuple[str, int, Any]]
) -> None:
    pools = work / "pools"
    pools.mkdir(exist_ok=True)
    (pools / "lab.yml").write_text(POOL_TEXTS[0])
    base = SETTINGS_TEXT.replace("/etc/imagepipe/pools", str(pools))
    path = _write(work, "settings.yml", mutate(base, ops))
    answer = run(["--config", str(path), "pools", "check"])
    check_answer(answer)
    if answer.code == 2:  # names the settings file, or the file it points at that is wrong
        named = re.match(r"imagepipe: error: (.+?):(?:\d+:)? ", answer.error_line)
        assert named is not None, answer
        assert named[1] == str(path) or Path(named[1]).exists(), answer
    if answer.code == 0:
        assert_settings_are_allowed(path)


ARGUMENT = st.one_of(
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        max_size=30,
    ),
    st.sampled_from(["", "tiny", "tiny@", "@", "tiny@latest", "tiny@v1", "stable", "v1", "1"]),
    st.integers(0, 6000).map(lambda n: "tiny@v" + "9" * n),
    st.integers(0, 6000).map(lambda n: "c" * n),
    st.sampled_from(HOSTILE_TOKENS).filter(lambda t: "\x00" not in t),
)


@pytest.fixture(scope="module")
def seeded(work: Path) -> Path:
    """A settings file and a registry holding tiny v1."""
    registry = Registry(work / "registry", work / "images")
    build = work / "build"
    build.mkdir()
    (build / "disk.qcow2").write_text("disk")
    registry.register(
        NewVersion(
            image="tiny",
            fingerprint="fp",
            builder="qemu",
            packer_version="1.6.6",
            files=(build / "disk.qcow2",),
            disk="disk.qcow2",
        )
    )
    config = work / "imagepipe.yml"
    config.write_text(
        f"registry: {work / 'registry'}\nimage_store: {work / 'images'}\n"
        f"pools_dir: {work / 'no-pools'}\nstate_db: {work / 'state.db'}\n"
        f"packer_dir: {work / 'packer'}\nrun_dir: {work / 'run'}\n"
    )
    return config


@FUZZ
@given(
    command=st.sampled_from(
        [
            ["images", "show", "{0}"],
            ["images", "list", "{0}"],
            ["images", "promote", "tiny", "{0}", "--channel", "{1}"],
            ["images", "promote", "{0}", "1", "--channel", "stable"],
            ["images", "revoke", "{0}", "{1}", "--reason", "fuzz"],
            ["images", "rollback", "tiny", "--channel", "{0}"],
            ["images", "prune", "--dry-run", "--keep", "{0}", "{1}"],
            ["build", "{0}", "--dry-run", "--var", "{1}"],
            ["simulate", "{0}", "--profile", "{1}"],
            ["pools", "check", "{0}"],
        ]
    ),
    first=ARGUMENT,
    second=ARGUMENT,
)
def test_random_arguments_get_exit_0_2_or_3_and_no_traceback(
    seeded: Path, command: list[str], first: str, second: str
) -> None:
    argv = [part.replace("{0}", first).replace("{1}", second) for part in command]
    answer = run(["--config", str(seeded), *argv])
    check_answer(answer)


# -- independent checks of what was accepted ---------------------------------------------

_POOL_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CHANNEL = re.compile(r"[a-z][a-z0-9_-]{0,63}")
TEN_YEARS = 10 * 365 * 86400


def assert_pool_is_allowed(pool: dict[str, Any]) -> None:
    assert _POOL_NAME.fullmatch(pool["name"]), pool["name"]
    assert _IMAGE.fullmatch(pool["image"]), pool["image"]
    assert pool["channel"] is None or _CHANNEL.fullmatch(pool["channel"]), pool["channel"]
    assert pool["version"] is None or 1 <= pool["version"] < 10**9
    display = pool["display"]
    assert 1 <= display["port_first"] <= display["port_last"] <= 65535
    assert display["address"].isascii() and display["address"].isprintable()
    for seconds in (
        pool["sessions"]["recycle_after"],
        pool["sessions"]["disconnect_timeout"],
        pool["idle"]["shrink_after"],
        pool["failures"]["backoff"],
        pool["failures"]["cooldown"],
        pool["boot_timeout"],
    ):
        assert math.isfinite(seconds) and 0 <= seconds <= TEN_YEARS
    assert 0 < pool["machine"]["memory"] <= 1024**5
    assert 1 <= pool["size"]["max"] <= 65535
    assert all(rule["days"] for rule in pool["schedule"])
    assert all(0 <= slot < pool["size"]["max"] for slot in pool["assignments"].values())


def assert_settings_are_allowed(path: Path) -> None:
    try:
        loaded = load_settings(path)
    except ConfigError as exc:  # pragma: no cover - the CLI accepted it, so must this
        raise AssertionError(f"the CLI accepted {path}; load_settings refuses: {exc}") from None
    host, _, port = loaded.balancer.bind.rpartition(":")
    assert port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    ipaddress.ip_address(host.strip("[]"))
    assert loaded.balancer.vip is None or ipaddress.ip_address(loaded.balancer.vip)
    assert loaded.hypervisor.uri.isascii() and " " not in loaded.hypervisor.uri
    for seconds in (loaded.keeper.tick, loaded.keeper.action_timeout):
        assert math.isfinite(seconds) and 0 < seconds <= TEN_YEARS
