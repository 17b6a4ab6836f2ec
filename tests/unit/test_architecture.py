"""The shape DESIGN.md and the README promise, checked on the source: the core imports no
adapter, configuration or image code; only the composition root knows the adapters; the CLI
has no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "imagepipe"
CORE_MAY_IMPORT = ("imagepipe.pool", "imagepipe.errors", "imagepipe.log")
ADAPTERS = ("imagepipe.hypervisors", "imagepipe.balancers", "imagepipe.stores")


def imports_of(path: Path) -> set[str]:
    """Every imagepipe module a file imports, at any depth (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("imagepipe")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(folder: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((PACKAGE / folder).rglob("*.py"))}


def test_the_core_imports_only_itself_errors_and_log() -> None:
    offending = {
        name: sorted(i for i in imports_of(path) if not i.startswith(CORE_MAY_IMPORT))
        for name, path in modules("pool").items()
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_only_the_composition_root_imports_adapters_outside_their_own_packages() -> None:
    allowed = {"imagepipe.app.bootstrap", "imagepipe.doctor"}  # doctor probes each adapter
    users = {
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if not module_name(path).startswith(ADAPTERS)
        and any(i.startswith(ADAPTERS) for i in imports_of(path))
    }
    assert users <= allowed, f"adapters imported outside the composition root: {users - allowed}"


def test_the_cli_has_no_import_circle() -> None:
    cli = modules("cli")
    graph = {
        name: {i for i in imports_of(path) if i in cli and i != name} for name, path in cli.items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert circles == []


def test_no_command_reads_a_module_level_mutable_for_its_options() -> None:
    for name, path in modules("cli").items():
        assert "GLOBALS" not in path.read_text(), f"{name} still reads GLOBALS"
