"""`packer/<image>/image.yml`: what an image is, validated, with file:line errors.

description: Tiny busybox desktop for tests and the demo
builder: qemu                      # the Packer builder type
template: tiny.pkr.hcl.j2          # main Packer template (rendered by Jinja2)
render: [Autounattend.xml.j2]      # other templates, rendered next to it
copy: [scripts]                    # plain files or folders copied into the build directory
prepare: guest/build-guest.sh      # run as [script, <build dir>/guest-out] before Packer
requires: [qemu-system-x86_64]     # programs the build needs on this host
variables: {memory: 256}           # defaults; --var/--var-file override, unknown names fail
secrets: {admin_password: IMAGEPIPE_WIN10_ADMIN_PASSWORD}   # name -> environment variable
registers_as: win10                # default: the folder name
parent: {image: win10, channel: latest}   # update builds: the version they start from
artifact:
  files: [output/disk.qcow2, guest-out/vmlinuz, guest-out/initrd.img]
  disk: disk.qcow2
  kernel: vmlinuz
  initrd: initrd.img
  cmdline: "console=ttyS0 imagepipe.mode=desktop"
  vm: "[= vm_name =]"             # VirtualBox base VM (rendered like a template)
  snapshot: "v[= image_version =]"
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from imagepipe import names, schema
from imagepipe.errors import BadInputError, ConfigError
from imagepipe.yamlsrc import format_path, load_text, path_kind, read_text

DEFINITION_FILE = "image.yml"
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

ScalarValue = str | int | float | bool


def _registry_name(rule: Callable[[str], str | None]) -> Callable[[object], str]:
    """Text that follows one of the registry's naming rules (names.image_error, ...)."""

    def read_name(value: object) -> str:
        name = schema.text(value)
        error = rule(name)
        if error is not None:
            raise ValueError(error)
        return name

    return read_name


def _template(value: object) -> str:
    name = schema.text(value)
    if not name.endswith(".j2"):
        raise ValueError(f"template {name!r} must end in .j2")
    return name


def _named_by_identifiers(
    reader: Callable[[object], dict[str, Any]],
) -> Callable[[object], dict[str, Any]]:
    """A mapping read by `reader` whose keys are variable names (Packer's and the shell's)."""

    def read_named(value: object) -> dict[str, Any]:
        found = reader(value)
        for name in found:
            if not _VARIABLE.fullmatch(name):
                raise ValueError(
                    f"variable name {name!r} must be a letter or _ then letters, digits, _"
                )
        return found

    return read_named


_image_name = _registry_name(names.image_error)
_words = schema.tuple_of(schema.text)
_maybe_text = schema.optional(schema.text)


class ParentRef(schema.Section):
    """The registered version an update build starts from."""

    image: str = schema.key(_image_name)
    channel: str = schema.key(_registry_name(names.channel_error), default="latest")


class ArtifactSpec(schema.Section):
    """Which build outputs become the version, and how a hypervisor boots them."""

    # globs in the build directory; may be empty for a VM
    files: tuple[str, ...] = schema.key(_words, default=())
    disk: str | None = schema.key(_maybe_text, default=None)
    kernel: str | None = schema.key(_maybe_text, default=None)
    initrd: str | None = schema.key(_maybe_text, default=None)
    cmdline: str | None = schema.key(_maybe_text, default=None)
    vm: str | None = schema.key(_maybe_text, default=None)
    snapshot: str | None = schema.key(_maybe_text, default=None)


class ImageDefinition(schema.Section):
    """A validated image.yml (plus where it came from). The fields' order and keys are what
    the build's fingerprint hashes."""

    description: str = schema.key(schema.text)
    builder: str = schema.key(schema.text)
    template: str = schema.key(_template)
    render: tuple[str, ...] = schema.key(schema.tuple_of(_template), default=())
    copy_files: tuple[str, ...] = schema.key(_words, default=(), name="copy")
    prepare: str | None = schema.key(_maybe_text, default=None)
    requires: tuple[str, ...] = schema.key(_words, default=())
    variables: dict[str, ScalarValue] = schema.key(
        _named_by_identifiers(schema.mapping_of(schema.scalar)), default_factory=dict
    )
    secrets: dict[str, str] = schema.key(
        _named_by_identifiers(schema.mapping_of(schema.text)), default_factory=dict
    )
    registers_as: str | None = schema.key(schema.optional(_image_name), default=None)
    # How `packer validate` runs on a host without `requires` (e.g. CI without VirtualBox):
    # virtualbox-vm asks VBoxManage about the VM while validating, so it needs syntax-only.
    validate_without_requires: Literal["full", "syntax-only"] = schema.key(
        schema.choice("full", "syntax-only"), default="full"
    )
    parent: ParentRef | None = schema.key(schema.optional(schema.section(ParentRef)), default=None)
    artifact: ArtifactSpec = schema.key(schema.section(ArtifactSpec))

    @property
    def templates(self) -> tuple[str, ...]:
        return (self.template, *self.render)

    def output_name(self, template: str) -> str:
        """The rendered file's name: the template's, without `.j2`."""
        return template.removesuffix(".j2")


class Image(schema.Section):
    """An image folder: its name, where it lives, and its definition (made by load_image,
    not read from a file: its fields have no key)."""

    name: str
    folder: Path
    definition: ImageDefinition

    @property
    def registers_as(self) -> str:
        return self.definition.registers_as or self.name

    @property
    def definition_file(self) -> Path:
        return self.folder / DEFINITION_FILE


def list_images(packer_dir: Path) -> list[str]:
    """Names of the image folders (those holding an image.yml), sorted."""
    if not packer_dir.is_dir():
        return []
    return sorted(p.parent.name for p in packer_dir.glob(f"*/{DEFINITION_FILE}"))


def load_image(packer_dir: Path, name: str) -> Image:
    """Load and validate `packer_dir/<name>/image.yml`. BadInputError when unknown or wrong."""
    error = names.image_error(name)
    if error is not None:
        raise BadInputError(error)
    folder = packer_dir / name
    path = folder / DEFINITION_FILE
    if path_kind(path) != "file":
        known = ", ".join(list_images(packer_dir)) or "none"
        raise BadInputError(f"unknown image {name!r} in {packer_dir} (images: {known})")
    definition = parse_definition(read_text(path), str(path))
    image = Image(name=name, folder=folder, definition=definition)
    keys: list[tuple[str | int, ...]] = [("template",)]
    keys += [("render", i) for i in range(len(definition.render))]
    for key, template in zip(keys, definition.templates, strict=True):
        outside = _leaves_folder(folder, template)
        if outside:
            raise _entry_error(image, key, outside)
        if not (folder / template).is_file():
            raise ConfigError(f"template {template} does not exist", file=str(path), key="template")
    if definition.prepare and not (folder / definition.prepare).is_file():
        raise ConfigError(
            f"prepare script {definition.prepare} does not exist", file=str(path), key="prepare"
        )
    copy_sources(image)
    return image


@dataclass(frozen=True)
class CopiedFile:
    """A plain file `copy:` brings into the build: where it is read and where it goes."""

    source: Path  # inside the image folder, links resolved
    relative: PurePosixPath  # its place in the build directory (no `..`, not absolute)


def copy_sources(image: Image) -> list[CopiedFile]:
    """Every plain file the `copy:` entries bring into the build, confined to the image folder:
    an entry that is absolute, climbs with `..`, or reaches (itself or any file or link under
    it) outside the folder through a symbolic link is refused with image.yml's file, line and
    key. Checked when the image is loaded and again right before copying."""
    root = image.folder.resolve()
    files: list[CopiedFile] = []
    for index, name in enumerate(image.definition.copy_files):
        key = ("copy", index)
        outside = _leaves_folder(image.folder, name)
        if outside:
            raise _entry_error(image, key, outside)
        source = image.folder / name
        if not source.exists():
            raise _entry_error(image, key, f"{name} does not exist")
        found = [source]
        if source.is_dir() and not source.is_symlink():
            for top, dirs, names in os.walk(source):
                dirs.sort()
                found += [Path(top, entry) for entry in sorted(dirs + names)]
        for path in found:
            relative = PurePosixPath(path.relative_to(image.folder).as_posix())
            real = path.resolve()
            if not real.is_relative_to(root):
                raise _entry_error(
                    image, key, f"{relative} is a link to {real}, outside the image folder {root}"
                )
            if real.is_file():
                files.append(CopiedFile(real, relative))
    return files


def _leaves_folder(folder: Path, name: str) -> str | None:
    """Why `name` (a path in image.yml) is not a plain path inside the image folder, or None."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return f"{name} is outside the image folder {folder} (give a path inside it, without ..)"
    real = (folder / name).resolve()
    if not real.is_relative_to(folder.resolve()):
        return f"{name} leads to {real}, outside the image folder {folder.resolve()}"
    return None


def _entry_error(image: Image, key: tuple[str | int, ...], message: str) -> ConfigError:
    source = str(image.definition_file)
    line = load_text(read_text(image.definition_file), source).line_of(key)
    return ConfigError(message, file=source, line=line, key=format_path(key))


def parse_definition(text: str, source: str) -> ImageDefinition:
    """Validate image.yml text; errors name source:line and the key. The YAML is read with
    the configuration reader's limits (size, depth, aliases, tags: see imagepipe/yamlsrc.py)."""
    doc = load_text(text, source)
    if not isinstance(doc.data, dict):
        raise ConfigError("expected a mapping of settings (description, builder, ...)", file=source)
    try:
        definition = schema.read(ImageDefinition, doc.data)
    except schema.Invalid as exc:
        path, message = exc.problems[0]
        raise ConfigError(
            message, file=source, line=doc.line_of(path), key=format_path(path) or None
        ) from None
    if not definition.artifact.files and not definition.artifact.vm:
        raise ConfigError(
            "needs files (a disk) or a vm (a VirtualBox base VM)",
            file=source,
            line=doc.line_of(("artifact",)),
            key="artifact",
        )
    return definition
