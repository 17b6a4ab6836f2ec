"""Hostile command-line arguments and the other files imagepipe reads (registry, state
database, traces, image definitions, --var files): one line, exit 2 or 3, nothing changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imagepipe.errors import BadInputError, ConfigError
from imagepipe.images.definition import Image, parse_definition
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.images.variables import parse_assignments, resolve_variables
from tests.hostile import Answer, check_answer, run

ARABIC_3 = "\u0663"
SIMULATE = ["simulate", "pools/lab.yml", "--profile", "morning-storm"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A settings file over an empty tmp folder: registry, store, pools, state database."""
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text("name: lab\nimage: tiny\n")
    (tmp_path / "imagepipe.yml").write_text(
        f"registry: {tmp_path / 'registry'}\nimage_store: {tmp_path / 'images'}\n"
        f"pools_dir: {tmp_path / 'pools'}\nstate_db: {tmp_path / 'state.db'}\n"
        f"run_dir: {tmp_path / 'run'}\npacker_dir: {tmp_path / 'packer'}\n"
        "balancer: {driver: none}\n"
    )
    return tmp_path


def imagepipe(site: Path, *argv: str) -> Answer:
    return run(["--config", str(site / "imagepipe.yml"), *argv])


def seed(site: Path) -> Registry:
    registry = Registry(site / "registry", site / "images")
    build = site / "build"
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
    return registry


def registry_head(site: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(site / "registry"), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["images", "show", "tiny@v" + "9" * 5000], "versions have at most 9"),
        (["images", "show", "tiny@" + "9" * 1000], "versions have at most 9"),
        (["images", "show", f"tiny@v{ARABIC_3}"], "not a channel name"),
        (["images", "show", "tiny@" + "c" * 5000], "not a channel name"),
        (["images", "promote", "tiny", "v" + "1" * 3000, "--channel", "stable"], "at most 9"),
        (["images", "revoke", "tiny", "v" + "1" * 3000, "--reason", "x"], "at most 9"),
        (["images", "promote", "tiny", "1", "--channel", "s" * 5000], "not a channel name"),
        (["images", "promote", "tiny", "1", "--channel", "Stable"], "not a channel name"),
        (["images", "promote", "tiny", "1", "--channel", ""], "the channel name is empty"),
        (["images", "rollback", "tiny", "--channel", "x" * 5000], "not a channel name"),
        (["images", "list", ""], "the image name is empty"),
        (["images", "list", "Tiny"], "not an image name"),
        (["images", "show", ""], "the image name is empty"),
        (["images", "show", "@v1"], "the image name is empty"),
        (["images", "show", "t" * 5000], "not an image name"),
        (["images", "prune", "--keep", "1", ""], "the image name is empty"),
        (["images", "prune", "--keep", "-1"], "--keep must be 0 or more"),
        (["images", "import", "tiny", "--from-vm", ""], "the VM name is empty"),
        (["images", "import", "tiny", "--from-vm", "v\x1b[2J"], "not a VM name"),
        (["images", "import", "tiny", "--from-vm", "v" * 5000], "not a VM name"),
        (["images", "import", "Tiny", "--from-vm", "base"], "not an image name"),
        (["build", "", "--dry-run"], "the image name is empty"),
        (["build", "Tiny", "--dry-run"], "not an image name"),
        (
            ["simulate", "pools/lab.yml", "--profile", "morning-storm", "--users", "9" * 12],
            "--users",
        ),
        (
            ["simulate", "pools/lab.yml", "--profile", "morning-storm", "--latency", "boot=1e400"],
            "",
        ),
    ],
)
def test_hostile_arguments_are_refused_and_change_nothing(
    site: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], words: str
) -> None:
    monkeypatch.chdir(site)
    seed(site)
    before = registry_head(site)
    answer = imagepipe(site, *argv)
    check_answer(answer)
    assert answer.code == 2, answer
    assert words in answer.error_line, answer.err
    assert len(answer.error_line) < 400
    assert registry_head(site) == before


def test_an_empty_image_name_is_not_all_images_for_prune(site: Path) -> None:
    seed(site)
    answer = imagepipe(site, "images", "prune", "--keep", "0", "")
    assert answer.code == 2
    assert (site / "images" / "tiny" / "v1" / "disk.qcow2").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[" * 100_000, "is corrupt"),
        (b'{"version": NaN}', "NaN is not a number JSON allows"),
        (b'{"version": 1e999}', "corrupt"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b'{"version": ' + b"9" * 5000 + b"}", "corrupt"),
        (b"{}" + b" " * (1024 * 1024), "the limit is 1048576 bytes"),
        (b"[]", "expected a JSON object"),
        (b'{"a": "\x1b"}', "control character"),
    ],
)
def test_a_corrupt_registry_file_is_named_in_one_line(
    site: Path, content: bytes, words: str
) -> None:
    seed(site)
    record = site / "registry" / "images" / "tiny" / "versions" / "v0001.json"
    record.write_bytes(content)
    answer = imagepipe(site, "images", "list")
    check_answer(answer)
    assert answer.code == 2, answer
    assert "registry file" in answer.error_line and str(record) in answer.error_line
    assert words in answer.error_line, answer.err


@pytest.mark.parametrize(
    "content",
    [b"garbage" * 100, b"SQLite format 3\x00" + bytes(range(256)) * 20, b"\x00" * 4096],
    ids=["text", "sqlite-header-then-noise", "zeros"],
)
@pytest.mark.parametrize(
    "argv", [["status"], ["status", "--json"], ["images", "prune", "--keep", "1"]]
)
def test_a_state_database_that_is_not_one_gives_exit_3(
    site: Path, content: bytes, argv: list[str]
) -> None:
    (site / "state.db").write_bytes(content)
    answer = imagepipe(site, *argv)
    check_answer(answer)
    assert answer.code == 3, answer
    assert "state.db" in answer.error_line and "state_db" in answer.error_line
    assert (site / "state.db").read_bytes() == content


TRACES = [
    ("nul", "u,08:00,1h\nv\x00,08:00,1h\n", "2: control character U+0000"),
    ("huge-field", "u,08:00," + "1" * 200_000 + "\n", "not a CSV file"),
    ("arabic-time", "u,\u0660\u0668:00,1h\n", "1: login_time"),
    ("inf-time", "u,inf,1h\n", "1: login_time"),
    ("1e400-time", "u,1e400,1h\n", "1: login_time"),
    ("after-midnight", "u,90000,1h\n", "within the day"),
    ("hour-25", "u,25:00,1h\n", "1: login_time"),
    ("endless-session", "u,08:00,1000000h\n", "1: session_length"),
    ("two-day-session", "u,08:00,48h\n", "at most a day"),
    ("long-user", "u" * 300 + ",08:00,1h\n", "1: user"),
]


@pytest.mark.parametrize(("case", "text", "words"), TRACES, ids=[t[0] for t in TRACES])
def test_a_hostile_trace_is_refused_with_its_line(
    site: Path, case: str, text: str, words: str
) -> None:
    trace = site / f"{case}.csv"
    trace.write_text(text)
    answer = run(["simulate", str(site / "pools" / "lab.yml"), "--trace", str(trace)])
    check_answer(answer, file=str(trace))
    assert answer.code == 2
    assert words in answer.error_line, answer.err


def test_a_trace_of_random_bytes_is_refused(site: Path) -> None:
    trace = site / "noise.csv"
    trace.write_bytes(bytes(range(256)) * 4)
    answer = run(["simulate", str(site / "pools" / "lab.yml"), "--trace", str(trace)])
    check_answer(answer, file=str(trace))
    assert answer.code == 2


DEFINITION = """\
description: d
builder: "null"
template: t.j2
variables: {memory: 256, ratio: 1.5, name: x}
artifact: {files: [x]}
"""


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: &a [*a]\n", "inside the value it names"),
        ("description: \x1b\n", "control character"),
        (DEFINITION + "registers_as: Tiny\n", "not an image name"),
        (DEFINITION + "parent: {image: tiny, channel: " + "c" * 100 + "}\n", "not a channel"),
        (DEFINITION.replace("256", "!!int abc"), "not a valid !!int"),
    ],
)
def test_a_hostile_image_definition_names_its_file(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_definition(text, "packer/tiny/image.yml")
    assert str(caught.value).startswith("packer/tiny/image.yml:")
    assert words in str(caught.value)


def _image() -> Image:
    return Image(name="demo", folder=Path("."), definition=parse_definition(DEFINITION, "i.yml"))


@pytest.mark.parametrize(
    ("pair", "words"),
    [
        (f"memory={ARABIC_3}", "expected a int"),
        ("memory=" + "9" * 50, "expected a int"),
        ("memory=" + "9" * 5000, "at most 4096 characters"),
        ("ratio=inf", "expected a float"),
        ("ratio=nan", "expected a float"),
        ("ratio=1e999", "expected a float"),
        ("name=a\x1bb", "control character"),
        ("name=" + "x" * 5000, "at most 4096 characters"),
        ("bad name=1", "a variable name"),
    ],
)
def test_hostile_var_values_are_refused(pair: str, words: str) -> None:
    with pytest.raises(BadInputError) as caught:
        resolve_variables(_image(), parse_assignments([pair]), [])
    assert words in str(caught.value)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("memory: &a [*a]\n", "inside the value it names"),
        ("memory: [1, 2]\n", "expected a single value"),
        ("memory: .inf\n", "not a finite number"),
    ],
)
def test_a_hostile_var_file_names_its_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    var_file = tmp_path / "vars.yml"
    var_file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        resolve_variables(_image(), {}, [var_file])
    assert str(caught.value).startswith(f"{var_file}:1:")
    assert words in str(caught.value)


def test_no_command_prints_a_traceback_for_a_fifo_given_as_a_file(site: Path) -> None:
    fifo = site / "pipe"
    os.mkfifo(fifo)
    for argv in (
        ["pools", "check", str(fifo)],
        ["--config", str(fifo), "pools", "check"],
        ["simulate", str(site / "pools" / "lab.yml"), "--trace", str(fifo)],
    ):
        answer = run(argv)
        check_answer(answer)
        assert answer.code == 2, (argv, answer)
