"""The drivers' shape, checked on the source: each hypervisor and balancer is a folder of its
own that imports no other driver's folder (what they share is hypervisors/common.py or
balancers/addresses.py), no driver module reaches into another object's private members, and
no two driver modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "imagepipe"
DRIVER_ROOTS = ("hypervisors", "balancers")
# pyvbox's own members the VirtualBox driver has to call (its generated API lacks 7.x's
# createMachine arguments and reads MachineState through 6.1's enum; `_i` is a null check)
PYVBOX_PRIVATE = {"_call", "_get_attr", "_i"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def driver_modules() -> dict[str, Path]:
    return {
        module_name(p): p for root in DRIVER_ROOTS for p in sorted((PACKAGE / root).rglob("*.py"))
    }


def imports_of(path: Path, name: str) -> set[str]:
    """The imagepipe modules a file imports (relative and lazy imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {i for i in found if i.startswith("imagepipe.")}


def folder_of(name: str) -> str | None:
    """imagepipe.hypervisors.libvirt.parents -> imagepipe.hypervisors.libvirt; None for the
    shared modules beside the folders."""
    parts = name.split(".")
    if len(parts) >= 4 and (PACKAGE / parts[1] / parts[2]).is_dir():
        return ".".join(parts[:3])
    return None


def test_every_driver_is_a_folder_of_its_own() -> None:
    folders = {f"{root}/{p.name}" for root in DRIVER_ROOTS for p in (PACKAGE / root).iterdir()
               if p.is_dir() and p.name != "__pycache__"}  # fmt: skip
    assert folders == {
        "hypervisors/libvirt",
        "hypervisors/virtualbox",
        "balancers/haproxy",
        "balancers/ipvs",
    }
    for folder in folders:
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
        assert (PACKAGE / folder / "checks.py").is_file(), f"{folder} has no host checks"


def test_no_driver_imports_another_drivers_folder() -> None:
    modules = driver_modules()
    crossing = {
        name: sorted(
            i for i in imports_of(path, name) if folder_of(i) not in (None, folder_of(name))
        )
        for name, path in modules.items()
    }
    assert {name: found for name, found in crossing.items() if found} == {}


def test_no_driver_module_reaches_into_another_objects_private_members() -> None:
    reaching: dict[str, list[str]] = {}
    for name, path in driver_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if private and owner not in ("self", "cls") and node.attr not in PYVBOX_PRIVATE:
                reaching.setdefault(name, []).append(f"{owner or '...'}.{node.attr}")
    assert reaching == {}


def test_no_two_driver_modules_import_each_other() -> None:
    modules = driver_modules()
    graph = {
        name: {i for i in imports_of(path, name) if i in modules and i != name}
        for name, path in modules.items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in graph[start]
        )

    assert sorted(name for name in graph if reaches(name, name, {name})) == []
