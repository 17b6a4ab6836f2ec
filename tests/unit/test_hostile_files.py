"""Pool and settings files written by a careless editor, a bad template or a malicious
colleague: each is refused with one line naming the file and line, exit 2, quickly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.hostile import check_answer, run, strict_json

POOL = "name: lab\nimage: tiny\n"  # lines 1-2; every case below adds line 3 on
ARABIC_5900 = "\u0665\u0669\u0660\u0660"  # 5900 in Arabic-Indic digits
ARABIC_5999 = "\u0665\u0669\u0669\u0669"


def bomb(levels: int = 9, fan: int = 10) -> str:
    """The "billion laughs": `levels` levels of `fan` aliases each."""
    lines = ['l0: &l0 ["lol"]']
    for level in range(1, levels + 1):
        refs = ", ".join([f"*l{level - 1}"] * fan)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


# (case, text after the valid first two lines, the line named, words the message holds)
POOL_CASES = [
    ("nul", "channel: a\x00b\n", 3, "control character U+0000"),
    ("escape", "channel: \x1b[31mred\n", 3, "control character U+001B"),
    ("delete", "channel: a\x7f\n", 3, "control character U+007F"),
    ("form-feed", "\x0c\n", 3, "control character U+000C"),
    ("non-character", "channel: \ufffe\n", 3, "control character U+FFFE"),
    ("c1-control", "channel: a\x9b\n", 3, "control character U+009B"),
    ("next-line", "channel: a\x85\n", 3, "control character U+0085"),
    ("escaped-nul", 'channel: "a\\0b"\n', 3, "control character U+0000 in a value"),
    ("escaped-surrogate", 'channel: "\\ud800"\n', 3, "malformed YAML"),
    ("int-tag-word", "size: {max: !!int abc}\n", 3, "'abc' is not a valid !!int"),
    ("float-tag-dot", "size: {max: !!float .}\n", 3, "'.' is not a valid !!float"),
    ("bool-tag-maybe", "size: {max: !!bool maybe}\n", 3, "'maybe' is not a valid !!bool"),
    ("int-tag-empty", 'size: {max: !!int ""}\n', 3, "'' is not a valid !!int"),
    ("python-tag", "size: !!python/object:os.system x\n", 3, "tag !!python/object:os.system"),
    ("binary-tag", "size: !!binary AAAA\n", 3, "tag !!binary is not allowed"),
    ("set-tag", "size: !!set {a}\n", 3, "tag !!set is not allowed"),
    ("huge-int", "size: {max: " + "9" * 5000 + "}\n", 3, "5000 characters is too large"),
    ("huge-int-key", "assignments: {" + "9" * 5000 + ": 1}\n", 3, "too large"),
    ("int-over-64-bits", "assignments: {u: " + "9" * 30 + "}\n", 3, "fit in 64 bits"),
    ("long-text-for-a-number", "assignments: {u: '" + "9 " * 3000 + "'}\n", 3, "characters)"),
    ("long-unknown-key", "? " + "k" * 5000 + "\n: 1\n", 3, "unknown key"),
    ("deep-mappings", "x: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n", 3, "nested"),
    ("deep-lists", "x: " + "[" * 1000 + "]" * 1000 + "\n", 3, "nest"),
    ("deep-blocks", "".join("  " * i + f"k{i}:\n" for i in range(300)), 35, "nested more"),
    ("self-alias", "schedule: &a [*a]\n", 3, "the alias *a is inside the value it names"),
    ("alias-bomb", bomb(), 7, "more than 20000 values"),
    ("alias-key", "a: &k [1]\n? *k\n: 1\n", 4, "keys must be plain words"),
    ("unknown-alias", "channel: *nowhere\n", 3, "unknown alias *nowhere"),
    ("duration-overflow", "sessions: {recycle_after: 1" + "0" * 400 + "}\n", 3, "too large"),
    ("duration-overflow-unit", "sessions: {recycle_after: 1" + "0" * 400 + "s}\n", 3, "duration"),
    ("duration-inf", "sessions: {recycle_after: .inf}\n", 3, ".inf is not a finite number"),
    ("duration-1e400", "sessions: {recycle_after: 1e400}\n", 3, "not a finite number"),
    ("duration-nan", "sessions: {recycle_after: .nan}\n", 3, ".nan is not a finite number"),
    ("duration-10-years", "idle: {shrink_after: 5000d}\n", 3, "at most 10 years"),
    ("boot-timeout-1e308", "boot_timeout: 1e308\n", 3, "at most 10 years"),
    ("drain-inf", "rollout: {drain_deadline: .inf}\n", 3, "not a finite number"),
    ("size-overflow", "machine: {memory: " + "9" * 300 + "G}\n", 3, "size"),
    ("size-1e400", "machine: {memory: 1e400}\n", 3, "not a finite number"),
    ("size-petabytes", "machine: {memory: 9999T}\n", 3, "at most 1024T"),
    (
        "arabic-port-range",
        'display: {port_range: "\u0665\u0669\u0660\u0660-\u0665\u0669\u0660\u0665"}\n',
        3,
        "port range",
    ),
    ("arabic-address", 'display: {address: "\u0661\u0662\u0667.0.0.1"}\n', 3, "display.address"),
    ("arabic-version", "version: \u0663\n", 3, "version number"),
    ("thousand-digit-version", "version: v" + "9" * 1000 + "\n", 3, "at most 9"),
    (
        "arabic-time",
        "schedule: [{days: mon, from: '\u0660\u0667:00', to: '18:00', free: 1}]\n",
        3,
        "time",
    ),
    ("empty-days", "schedule: [{days: [], from: '07:00', to: '18:00', free: 1}]\n", 3, "never"),
    ("long-timezone", "timezone: " + "a" * 5000 + "\n", 3, "unknown time zone"),
    ("timezone-path", "timezone: ../../etc/passwd\n", 3, "unknown time zone"),
    ("timezone-folder", "timezone: Europe\n", 3, "unknown time zone"),
    ("second-document", "---\nname: other\n", 3, "more than one YAML document"),
    ("channel-uppercase", "channel: Stable\n", 3, "not a channel name"),
    ("channel-thousands", "channel: " + "a" * 5000 + "\n", 3, "not a channel name"),
    ("trailing-newline-name", 'channel: "stable\\n"\n', 3, "not a channel name"),
]


@pytest.mark.parametrize(
    ("case", "text", "line", "words"), POOL_CASES, ids=[c[0] for c in POOL_CASES]
)
def test_a_hostile_pool_file_gets_one_line_naming_file_and_line(
    tmp_path: Path, case: str, text: str, line: int, words: str
) -> None:
    path = tmp_path / f"{case}.yml"
    path.write_text(POOL + text, encoding="utf-8", errors="surrogatepass")
    started = time.perf_counter()
    answer = run(["pools", "check", str(path)])
    assert time.perf_counter() - started < 2
    check_answer(answer, file=str(path))
    assert answer.code == 2, answer
    assert answer.error_line.startswith(f"imagepipe: error: {path}:{line}:"), answer.err
    assert words in answer.err, answer.err


@pytest.mark.parametrize(
    ("case", "text", "words"),
    [
        ("image-uppercase", "name: lab\nimage: Tiny\n", "registered image names are lowercase"),
        ("image-empty", "name: lab\nimage: ''\n", "the image name is empty"),
        ("image-slash", "name: lab\nimage: a/../b\n", "not an image name"),
        ("name-arabic-digit", "name: lab\u0663\nimage: tiny\n", "expected a name"),
    ],
)
def test_names_follow_the_registry_rules(tmp_path: Path, case: str, text: str, words: str) -> None:
    path = tmp_path / f"{case}.yml"
    path.write_text(text)
    answer = run(["pools", "check", str(path)])
    check_answer(answer, file=str(path))
    assert answer.code == 2 and words in answer.err, answer.err


def test_bytes_that_are_not_utf8_are_refused_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"name: lab\nimage: tiny\nchannel: caf\xe9\n")
    answer = run(["pools", "check", str(path)])
    check_answer(answer, file=str(path))
    assert (
        answer.error_line
        == f"imagepipe: error: {path}:3: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    )


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.yml"
    path.write_bytes(bytes(range(256)) * 8)
    answer = run(["pools", "check", str(path)])
    check_answer(answer, file=str(path))
    assert answer.code == 2


def test_a_file_over_one_mebibyte_is_refused_by_size_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yml"
    path.write_text(POOL + "#" + "x" * (1024 * 1024))
    answer = run(["pools", "check", str(path)])
    assert answer.code == 2
    assert "the limit is 1048576 bytes" in answer.error_line


@pytest.mark.parametrize(
    "text",
    [
        "a: [" + ",".join(["1"] * 300_000) + "]\n",  # ~600 KiB of values
        "".join(f"k{i}: v\n" for i in range(90_000)),  # ~900 KiB of keys
        "a: &a [" + ",".join(["1"] * 1000) + "]\n" + "".join(f"b{i}: *a\n" for i in range(20_000)),
        POOL + "description: " + "x" * 1_000_000 + "\n",
    ],
    ids=["flow-values", "block-keys", "alias-fanout", "long-text"],
)
def test_a_file_under_one_mebibyte_is_checked_in_well_under_a_second(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "large.yml"
    path.write_text(text)
    assert path.stat().st_size < 1024 * 1024
    # CPU time of this process, not wall time: the bound is about the work a hostile file
    # makes (an alias fan-out or a quadratic scan would take minutes), not about how busy
    # the machine running the suite is
    started = time.process_time()
    answer = run(["pools", "check", str(path)])
    assert time.process_time() - started < 1.0
    check_answer(answer, file=str(path))
    assert answer.code == 2


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_pool_path_that_is_not_a_regular_file_is_refused_without_waiting(
    tmp_path: Path, kind: str
) -> None:
    if kind == "fifo":
        path = tmp_path / "pipe.yml"
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif kind == "folder":
        path = tmp_path / "pools"
        (path / "folder.yml").mkdir(parents=True)
    else:
        path = Path("/dev/zero")
    answer = run(["pools", "check", str(path)])
    check_answer(answer)
    assert answer.code == 2
    assert "not a regular file" in answer.err or "folder" in answer.err


@pytest.mark.parametrize(
    "argv",
    [
        ["pools", "check", "x" * 5000],
        ["pools", "check", "/".join(["y" * 200] * 30)],
        ["--config", "z" * 5000, "pools", "check"],
        ["simulate", "p" * 5000, "--profile", "morning-storm"],
    ],
    ids=["pool-name", "pool-path", "config", "simulate"],
)
def test_paths_the_file_system_refuses_by_length_get_one_line(argv: list[str]) -> None:
    answer = run(argv)
    check_answer(answer)
    assert answer.code == 2
    assert "long" in answer.error_line and "the limit is" in answer.error_line
    assert len(answer.error_line) < 400


def test_a_settings_file_with_an_unknown_home_folder_is_refused() -> None:
    answer = run(["--config", "~no-such-user-here/imagepipe.yml", "pools", "check"])
    check_answer(answer)
    assert answer.code == 2 and "home folder" in answer.err


SETTINGS_CASES = [
    (
        "bind-arabic-port",
        'balancer: {bind: "127.0.0.1:\u0665\u0669\u0669\u0669"}\n',
        "balancer.bind",
    ),
    ("bind-hostname", "balancer: {bind: 'localhost:5999'}\n", "balancer.bind"),
    ("bind-port-zero", "balancer: {bind: '127.0.0.1:0'}\n", "balancer.bind"),
    ("bind-no-port", "balancer: {bind: '127.0.0.1'}\n", "balancer.bind"),
    ("vip-arabic", "balancer: {driver: ipvs, vip: '10.0.0.\u0665'}\n", "balancer.vip"),
    ("vip-hostname", "balancer: {driver: ipvs, vip: desktops}\n", "balancer.vip"),
    ("port-arabic", "balancer: {port: \u0663\u0663\u0668\u0669}\n", "balancer.port"),
    ("uri-space", "hypervisor: {uri: 'qemu:///system extra'}\n", "hypervisor.uri"),
    ("uri-non-ascii", "hypervisor: {uri: 'q\u00e9mu:///system'}\n", "hypervisor.uri"),
    ("tick-inf", "keeper: {tick: .inf}\n", "keeper.tick"),
    ("tick-overflow", "keeper: {tick: 1" + "0" * 400 + "}\n", "keeper.tick"),
    ("parallel-huge", "keeper: {parallel: " + "9" * 100 + "}\n", "keeper.parallel"),
    ("pools-dir-long", "pools_dir: " + "d" * 5000 + "\n", "pools_dir"),
    ("state-db-long-name", "state_db: /tmp/" + "s" * 300 + "\n", "state_db"),
    ("self-alias", "hypervisor: &h {uri: *h}\n", "inside the value"),
    ("control", "run_dir: /run/\x1bimagepipe\n", "control character"),
]


@pytest.mark.parametrize(
    ("case", "text", "words"), SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES]
)
def test_a_hostile_settings_file_gets_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, text: str, words: str
) -> None:
    monkeypatch.chdir(tmp_path)  # ./pools is the default pools_dir
    settings = tmp_path / f"{case}.yml"
    settings.write_text(text)
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL)
    answer = run(["--config", str(settings), "pools", "check"])
    check_answer(answer, file=str(settings))
    assert answer.code == 2, answer
    assert answer.error_line.startswith(f"imagepipe: error: {settings}:1:"), answer.err
    assert words in answer.err, answer.err


def test_pools_check_json_never_holds_infinity(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text(POOL + "sessions: {recycle_after: 3650d}\nboot_timeout: 1e8\n")
    answer = run(["pools", "check", "--json", str(path)])
    assert answer.code == 0, answer
    [pool] = strict_json(answer.out)
    assert pool["sessions"]["recycle_after"] == 3650 * 86400
