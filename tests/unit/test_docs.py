"""The README and docs/ say what the code does: links resolve, the commands table names commands
and options the CLI has, the configuration reference names exactly the keys the settings and
pool-file models accept (with their defaults), and no tracker numbers leak into product docs."""

from __future__ import annotations

import itertools
import re
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagepipe import schema
from imagepipe.cli.app import main
from imagepipe.config.pools import PoolFile, load_pool_file
from imagepipe.config.settings import Settings, load_settings
from imagepipe.config.values import parse_duration, parse_port_range, parse_size
from imagepipe.schema import Section

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (code shows program output, not links)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text()).splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _section(page: Path, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    text = page.read_text()
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append([c.strip() for c in cells])
    return rows[1:]  # the header


def _code_spans(cell: str) -> list[str]:
    return [s.replace("\\|", "|") for s in re.findall(r"`([^`]+)`", cell)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_in_the_docs_reaches_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_docs_name_no_tracker_issue_numbers(page: Path) -> None:
    found = [
        f"line {n}: {line.strip()}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        # "rollout #3" is the product's own numbering of rollouts
        if re.search(r"\bissues?\s*#?\d|(?<!rollout )(?<![\w&/])#\d+\b", line, re.I)
    ]
    assert not found, f"{page.relative_to(ROOT)}: " + "; ".join(found)


TOP = ("imagepipe/", "tests/", "benchmarks/", "scripts/", "packer/", "docs/", ".github/", ".ci/")
PACKAGE = ("pool/", "app/", "cli/", "config/", "images/", "hypervisors/", "balancers/", "sim/")


def _named_files(text: str) -> list[str]:
    """Repository paths named in inline code: `imagepipe/pool/store.py`, `planner/forecast.py`
    (inside the package), `bench_soak.py` (anywhere); not patterns (`test_ipvs_*.py`,
    `<pool>.yml`) nor files on the host (`/etc/…`)."""
    names = []
    for span in re.findall(r"`([^`\n]+)`", _prose(text)):
        for word in span.split():
            word = word.rstrip(",.:;)").lstrip("(")
            if re.search(r"[*<>{}$…]|^/|^~|://", word):
                continue
            word = re.sub(r":\d+$", "", word)  # file:line in an error message
            pathlike = word.endswith("/") or re.search(r"\.\w+(?:::\w+)?$", word)
            in_repo = bool(pathlike) and word.startswith(TOP + PACKAGE)
            if in_repo or re.fullmatch(r"[\w.-]+\.(?:py|sh)", word):
                names.append(word)
    return names


def _exists(name: str) -> bool:
    name, _, test = name.partition("::")
    if test:  # a test in a module: the module defines it
        return _exists(name) and f"def {test}(" in (ROOT / name).read_text()
    if name.startswith(TOP):
        return (ROOT / name).exists()
    if name.startswith(PACKAGE):
        return (ROOT / "imagepipe" / name).exists() or (ROOT / "imagepipe/pool" / name).exists()
    return any(ROOT.glob(f"**/{name}"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_repository_file_the_docs_name_exists(page: Path) -> None:
    missing = sorted({n for n in _named_files(page.read_text()) if not _exists(n)})
    assert not missing, f"{page.relative_to(ROOT)} names files that are not there: {missing}"


def _commands_table() -> list[tuple[tuple[str, ...], list[str]]]:
    """(command words, options) for every command the README's commands table names."""
    found: list[tuple[tuple[str, ...], list[str]]] = []
    words: list[str] = []
    for row in _table_rows(_section(ROOT / "README.md", "## Commands")):
        for span in _code_spans(row[0]):
            tokens = span.split()
            if tokens[0] == "imagepipe":
                tokens = tokens[1:]
            if not tokens[0].startswith("-"):
                word = re.compile(r"[a-z][a-z/|-]*")
                words = list(itertools.takewhile(word.fullmatch, tokens))
            options = re.findall(r"(?<![\w-])--[a-z][a-z-]*", span)
            for combo in itertools.product(*(re.split(r"[/|]", w) for w in words)):
                found.append((combo, options))
    return found


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([*argv, "--help"])
    return code, capsys.readouterr().out


def test_every_command_and_option_in_the_readme_commands_table_exists_in_the_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    rows = _commands_table()
    assert len({words for words, _ in rows}) >= 20, rows
    missing = []
    for words, options in rows:
        code, out = _help(list(words), capsys)
        if code != 0:
            missing.append(f"imagepipe {' '.join(words)} (exit {code})")
            continue
        missing += [f"imagepipe {' '.join(words)} {o}" for o in options if o not in out]
    assert not missing, missing


def test_the_global_options_the_readme_names_exist(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = _section(ROOT / "README.md", "## Commands")
    line = next(p for p in text.split("\n\n") if p.startswith("Global options"))
    options = re.findall(r"--[a-z][a-z-]*", line)
    assert options
    code, out = _help([], capsys)
    assert code == 0
    assert [o for o in options if o not in out] == []


def _command_uses() -> list[tuple[str, str, bool]]:
    """(where, command line, typed in a shell) for every `imagepipe …` the pages show: inline
    code, lines of shell blocks, `$ imagepipe …` lines of any block (not a screen's text)."""
    uses: list[tuple[str, str, bool]] = []
    for page in PAGES:
        text = page.read_text()
        where = page.relative_to(ROOT).as_posix()
        for span in re.findall(r"`([^`\n]+)`", _prose(text)):
            uses.append((where, span, False))
        for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            for line in block.group(2).splitlines():
                shell = block.group(1) in ("sh", "console") or line.startswith("$ ")
                uses += [(where, line.removeprefix("$ "), True)] if shell else []
    found: list[tuple[str, str, bool]] = []
    for where, text, shell in uses:
        for part in re.split(r";|&&|\|\||\s#\s", text):
            match = re.match(r"\s*(?:\S*/)?imagepipe(?:\s+(?:--config|-c)\s+\S+)?\s+(.*)", part)
            if match:
                found.append((where, match.group(1).replace("\\|", "|"), shell))
    return found


def test_every_imagepipe_command_line_in_the_docs_uses_commands_and_options_that_exist(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    commands = {words for words, _ in _commands_table()}
    helps: dict[tuple[str, ...], tuple[int, str]] = {}
    wrong = []
    uses = _command_uses()
    assert len(uses) >= 50
    for where, line, shell in uses:
        tokens = line.split()
        words = tuple(itertools.takewhile(re.compile(r"[a-z][a-z-]*").fullmatch, tokens[:2]))
        command = next((words[:n] for n in (2, 1) if words[:n] in commands), None)
        if command is None:
            if shell and words and words[0] not in {c[0] for c in commands}:
                wrong.append(f"{where}: imagepipe {line}: no such command")
            continue
        if command not in helps:
            helps[command] = _help(list(command), capsys)
        out = helps[command][1]
        options = re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)
        wrong += [f"{where}: imagepipe {line}: no option {o}" for o in options if o not in out]
    assert not wrong, wrong


def _fields(model: type[Section], prefix: str = "") -> dict[str, schema.Key]:
    """Every key a file may hold: dotted names of the model's leaves, with their defaults."""
    keys: dict[str, schema.Key] = {}
    for field in schema.fields(model):
        key = prefix + field.name
        nested = field.section
        if nested is not None and not any(f.required for f in schema.fields(nested)):
            keys.update(_fields(nested, key + "."))
            continue
        keys[key] = field
    return keys


def _every_key(model: type[Section], prefix: str = "") -> set[str]:
    """Every dotted key a file may spell, sections and the keys inside optional sections
    (`web`, `web.bind`, `web.tls.cert`) included."""
    keys = set()
    for field in schema.fields(model):
        key = prefix + field.name
        keys.add(key)
        if field.holds is not None:
            keys |= _every_key(field.holds, key + ".")
    return keys


def _reference(page: str, heading: str) -> dict[str, str]:
    """key → default cell of the reference table under `heading`."""
    rows = _table_rows(_section(ROOT / "docs" / page, heading))
    return {_code_spans(row[0])[0]: row[2] for row in rows}


SETTINGS_NOT_KEYS = {"source"}  # where the settings came from; refused in a file


def test_the_settings_reference_names_every_settings_key_and_no_other() -> None:
    documented = set(_reference("configuration.md", "## Settings file"))
    model = set(_fields(Settings)) - SETTINGS_NOT_KEYS
    assert sorted(documented - model) == [], "documented but not in the settings model"
    assert sorted(model - documented) == [], "in the settings model but not documented"


def test_the_pool_file_reference_names_every_pool_key_and_no_other() -> None:
    documented = set(_reference("configuration.md", "## Pool files"))
    model = set(_fields(PoolFile))
    assert sorted(documented - model) == [], "documented but not in the pool-file model"
    assert sorted(model - documented) == [], "in the pool-file model but not documented"


def _pool_channel_default() -> Any:
    """What a pool file without `channel` or `version` follows (the field itself is None)."""
    return schema.read(PoolFile, {"name": "lab", "image": "tiny"}).pool_spec("lab.yml").channel


EFFECTIVE_DEFAULTS = {"channel": _pool_channel_default}


def _same_default(cell: str, default: Any) -> bool | None:
    """Whether a reference's default cell states `default`; None: not a plain value to compare."""
    spans = _code_spans(cell)
    if "<" in cell:  # worked out from other keys (`<run_dir>/haproxy.sock`): not the field's own
        return None
    plain = re.sub(r"\s*\((?:off|none)\)$", "", cell)
    if len(spans) != 1 or plain != f"`{spans[0]}`":
        return None
    text = spans[0]
    if isinstance(default, Enum):
        default = default.value
    if default is None:
        return text in ("null", "none")
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, tuple):
        return parse_port_range(text) == default
    if isinstance(default, Path):
        return text == str(default)
    if isinstance(default, float):
        return parse_duration(text) == default
    if isinstance(default, int):
        return (int(text) if text.isdigit() else parse_size(text)) == default
    return bool(text == default)


@pytest.mark.parametrize(
    ("page", "heading", "model"),
    [
        ("configuration.md", "## Settings file", Settings),
        ("configuration.md", "## Pool files", PoolFile),
    ],
)
def test_the_configuration_reference_states_the_defaults_the_models_have(
    page: str, heading: str, model: type[Section]
) -> None:
    fields = _fields(model)
    wrong = []
    compared = 0
    for key, cell in _reference(page, heading).items():
        field = fields[key]
        if field.required or field.factory is not None:
            continue
        effective = EFFECTIVE_DEFAULTS.get(key)
        same = _same_default(cell, effective() if effective else field.default)
        if same is None:
            continue
        compared += 1
        if not same:
            wrong.append(f"{key}: documented {cell}, the model says {field.default!r}")
    assert compared >= 10
    assert not wrong, wrong


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if p.name != "contracts.md"],  # that page speaks Python, not files
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_every_dotted_settings_or_pool_key_the_docs_name_exists(page: Path) -> None:
    """`balancer.bind`, `size.free`: a key written anywhere is one the files accept."""
    keys = _every_key(Settings) | _every_key(PoolFile)
    sections = {k.split(".")[0] for k in keys if "." in k}
    wrong = set()
    for span in re.findall(r"`([^`\n]+)`", _prose(page.read_text())):
        for key in re.findall(r"(?<![\w./-])[a-z_]+(?:\.[a-z_]+)+(?![\w/(-])", span):
            if key.split(".")[0] in sections and not re.search(r"\.(py|md|ya?ml)$", key):
                wrong |= set() if key in keys else {key}
    assert not wrong, f"{page.relative_to(ROOT)}: no such key: {sorted(wrong)}"


SETTINGS_TOP = set(schema.keys(Settings)) - SETTINGS_NOT_KEYS
POOL_TOP = set(schema.keys(PoolFile))


def _yaml_examples() -> list[tuple[str, str]]:
    """(page:line, YAML) of every example made only of settings keys or only of pool keys."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            top = set(yaml.safe_load(m.group(1)))
            if top <= SETTINGS_TOP or top <= POOL_TOP:
                where = (
                    f"{page.relative_to(ROOT).as_posix()}:{text[: m.start()].count(chr(10)) + 2}"
                )
                found.append((where, m.group(1)))
    return found


def test_the_docs_show_settings_and_pool_file_examples() -> None:
    assert len(_yaml_examples()) >= 4


@pytest.mark.parametrize(("where", "example"), _yaml_examples(), ids=lambda v: v.split("\n")[0])
def test_every_settings_or_pool_file_example_in_the_docs_is_accepted(
    where: str, example: str, tmp_path: Path
) -> None:
    """A YAML example made of settings keys is a settings file imagepipe accepts; one made of
    pool-file keys (with a name and an image added when it shows only a part) is a valid pool."""
    top = set(yaml.safe_load(example))
    path = tmp_path / "example.yml"
    if top <= SETTINGS_TOP:
        path.write_text(example)
        load_settings(path)
    else:
        needed = {"name": "lab", "image": "tiny"}
        path.write_text("".join(f"{k}: {v}\n" for k, v in needed.items() if k not in top) + example)
        load_pool_file(path)


def test_the_metrics_the_docs_name_are_the_metrics_the_keeper_serves() -> None:
    served = set(
        re.findall(r'"(imagepipe_[a-z_]+)"', (ROOT / "imagepipe/app/metrics.py").read_text())
    )
    assert len(served) >= 10
    named = set()
    for page in PAGES:
        for name in re.findall(r"\bimagepipe_[a-z_]+", page.read_text()):
            named.add(re.sub(r"_(total|bucket|sum|count|created)$", "", name))
    assert sorted(named - served) == [], "named in the docs, not served"
    assert sorted(served - named) == [], "served, not in the docs"
