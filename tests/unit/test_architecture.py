"""The shape DESIGN.md and the README promise, checked on the source: the core imports no
adapter, configuration or image code; only the composition root builds adapters; no two
packages of imagepipe import each other, directly or around a longer circle; reading a pool's
state (`imagepipe status`) does not load what only the keeper's passes need.

Imports are read from the syntax tree at any depth (lazy imports inside functions count),
relative ones (`from ..config import x`) resolved against the importing module, and module
paths a file hands to `importlib.import_module` (the CLI's command table) counted as imports.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "imagepipe"
CORE_MAY_IMPORT = ("imagepipe.pool", "imagepipe.errors", "imagepipe.log", "imagepipe.record")
ADAPTER_PACKAGES = ("imagepipe.hypervisors", "imagepipe.balancers", "imagepipe.stores")
COMPOSITION_ROOT = "imagepipe.app.bootstrap"
# adapters whose classes live outside the adapter packages, or are built by their class name:
# built (or opened: SQLiteStore.open_readonly) only by the composition root
ADAPTER_CLASSES = {
    "Registry": "imagepipe.images.registry",
    "Packer": "imagepipe.images.packer",
    "SQLiteStore": "imagepipe.stores.sqlite",
    "PostgresStore": "imagepipe.stores.postgres",
    "DomainImporter": "imagepipe.hypervisors.libvirt.importer",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """`from ..x import y` in imagepipe.a.b -> imagepipe.x."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a module's level 1 is its own package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _calls_import_module(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                return True
    return False


def imports_in(source: str, importer: str, *, is_package: bool = False) -> set[str]:
    """Every imagepipe module `source` (the module `importer`) imports, at any depth."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, is_package)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    if _calls_import_module(tree):  # a table of module paths: each one is imported
        found.update(
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        )
    return {name for name in found if name == "imagepipe" or name.startswith("imagepipe.")}


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def modules(folder: str = "") -> dict[str, Path]:
    return {module_name(p): p for p in sorted((PACKAGE / folder).rglob("*.py"))}


def existing_module(name: str, known: Iterable[str]) -> str | None:
    """The module an imported name is (or is in): imagepipe.config.Settings -> imagepipe.config."""
    names = set(known)
    while name and name not in names:
        name = name.rpartition(".")[0]
    return name or None


def package_of(module: str) -> str:
    """imagepipe.config.pools -> imagepipe.config; imagepipe.units -> imagepipe.units."""
    return ".".join(module.split(".")[:2])


def package_graph(sources: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """package -> the other packages its modules import."""
    graph: dict[str, set[str]] = {}
    for module, imported in sources.items():
        mine = package_of(module)
        edges = graph.setdefault(mine, set())
        for name in imported:
            target = existing_module(name, sources)
            if target is not None and package_of(target) != mine:
                edges.add(package_of(target))
    return graph


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Each package that can reach itself, with one path back to it."""
    found = []
    for start in sorted(graph):
        paths = [[start]]
        seen = {start}
        while paths:
            path = paths.pop(0)
            for nxt in sorted(graph.get(path[-1], ())):
                if nxt == start:
                    found.append([*path, start])
                    paths = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append([*path, nxt])
    return found


def adapter_builds(source: str) -> set[str]:
    """The adapter classes `source` calls (constructs or opens: SQLiteStore.open_readonly)."""
    built = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            func = func.value  # SQLiteStore.open_readonly(...)
        if isinstance(func, ast.Name) and func.id in ADAPTER_CLASSES:
            built.add(func.id)
    return built


# ---- the rules -------------------------------------------------------------------------


def test_the_core_imports_only_itself_errors_log_and_record() -> None:
    offending = {
        name: sorted(i for i in imports_of(path) if not i.startswith(CORE_MAY_IMPORT))
        for name, path in modules("pool").items()
    }
    assert {name: found for name, found in offending.items() if found} == {}


def third_party_imports(source: str) -> set[str]:
    """The top-level packages `source` imports from outside imagepipe, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found - {"imagepipe"}


def test_no_module_loads_pydantic_which_every_command_would_pay_for() -> None:
    """Settings, pool files, image definitions and registry records are read by
    imagepipe/schema.py: pydantic cost each command ~3x a bare Python start (docs/benchmarks.md)."""
    assert third_party_imports("from pydantic import BaseModel\nimport pydantic_core") == {
        "pydantic",
        "pydantic_core",
    }
    users = {
        name: found
        for name, path in modules().items()
        if (found := third_party_imports(path.read_text()) & {"pydantic", "pydantic_core"})
    }
    assert users == {}


def test_only_the_composition_root_imports_adapters_outside_their_own_packages() -> None:
    allowed = {COMPOSITION_ROOT, "imagepipe.doctor"}  # doctor probes each adapter
    users = {
        name
        for name, path in modules().items()
        if not name.startswith(ADAPTER_PACKAGES)
        and any(i.startswith(ADAPTER_PACKAGES) for i in imports_of(path))
    }
    assert users <= allowed, f"adapters imported outside the composition root: {users - allowed}"


def _at_home(adapter: str, module: str) -> bool:
    """Its own module, or its adapter package (stores/copy.py copies one store into another)."""
    home = ADAPTER_CLASSES[adapter]
    if module == home:
        return True
    return module.startswith(ADAPTER_PACKAGES) and package_of(module) == package_of(home)


def test_only_the_composition_root_builds_the_registry_packer_store_and_importer() -> None:
    offending = {}
    for name, path in modules().items():
        if name == COMPOSITION_ROOT:
            continue
        built = {c for c in adapter_builds(path.read_text()) if not _at_home(c, name)}
        if built:
            offending[name] = sorted(built)
    assert offending == {}, f"built outside {COMPOSITION_ROOT}: {offending}"


def test_no_two_packages_of_imagepipe_import_each_other() -> None:
    sources = {name: imports_of(path) for name, path in modules().items()}
    assert circles(package_graph(sources)) == []


def test_the_cli_has_no_import_circle() -> None:
    cli = modules("cli")
    graph = {
        name: {m for i in imports_of(path) if (m := existing_module(i, cli)) and m != name}
        for name, path in cli.items()
    }
    assert circles(graph) == []


def test_no_command_reads_a_module_level_mutable_for_its_options() -> None:
    for name, path in modules("cli").items():
        assert "GLOBALS" not in path.read_text(), f"{name} still reads GLOBALS"


def loaded_by(module: str) -> set[str]:
    """The modules a fresh process has loaded once it imported `module` (this source tree)."""
    probe = f"import json, sys, {module}\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        check=True,
    )
    return set(json.loads(done.stdout))


def test_status_does_not_load_the_planners_actions() -> None:
    # status reads states, targets and sessions from the planner; the actions a pass makes
    # (and the rules and codec that build and journal them) are the keeper's to load
    loaded = loaded_by("imagepipe.cli.status")
    assert "imagepipe.pool.planner.states" in loaded  # the probe did reach the planner
    assert {
        "imagepipe.pool.actions",
        "imagepipe.pool.codec",
        "imagepipe.pool.planner.clones",
    }.isdisjoint(loaded)


# ---- the checks see what they must see ---------------------------------------------------


def test_a_relative_import_in_the_core_is_seen_as_what_it_imports() -> None:
    source = "from ..config import settings\nfrom . import model\nfrom .planner import plan\n"
    found = imports_in(source, "imagepipe.pool.keeper")
    assert {"imagepipe.config", "imagepipe.config.settings", "imagepipe.pool.model"} <= found
    assert "imagepipe.pool.planner.plan" in found
    in_package = imports_in("from .. import errors\n", "imagepipe.pool.planner", is_package=True)
    assert "imagepipe.pool.errors" in in_package
    assert "imagepipe.config" in {i for i in found if not i.startswith(CORE_MAY_IMPORT)}


def test_a_module_path_handed_to_import_module_is_an_import() -> None:
    source = (
        "import importlib\n"
        "COMMANDS = {'build': ('imagepipe.cli.build', 'build')}\n"
        "def load(name):\n"
        "    module, attr = COMMANDS[name]\n"
        "    return getattr(importlib.import_module(module), attr)\n"
    )
    assert "imagepipe.cli.build" in imports_in(source, "imagepipe.cli.app")
    assert imports_in("X = 'imagepipe.cli.build'\n", "imagepipe.cli.app") == set()


def test_a_circle_between_two_packages_is_found() -> None:
    sources = {
        "imagepipe.config.errors": {"imagepipe.images.names"},
        "imagepipe.images.names": set(),
        "imagepipe.images.registry": {"imagepipe.config.yamlsrc.read_text"},
        "imagepipe.config.yamlsrc": set(),
    }
    assert circles(package_graph(sources)) == [
        ["imagepipe.config", "imagepipe.images", "imagepipe.config"],
        ["imagepipe.images", "imagepipe.config", "imagepipe.images"],
    ]


@pytest.mark.parametrize(
    "source",
    [
        "registry = Registry(settings.registry, settings.image_store)",
        "store = SQLiteStore.open_readonly(path)",
        "version = (packer or Packer()).version()",
    ],
)
def test_building_an_adapter_by_hand_is_seen(source: str) -> None:
    assert adapter_builds(source)
