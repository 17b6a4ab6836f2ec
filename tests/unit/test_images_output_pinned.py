"""What the registry writes and the fingerprint hashes, pinned byte for byte.

Existing registries must read and write unchanged, and a changed fingerprint makes every
image rebuild, so a change to how records or definitions are dumped must show up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagepipe.cli.images import _doc
from imagepipe.images import registry as registry_module
from imagepipe.images.definition import Image, parse_definition
from imagepipe.images.fingerprint import fingerprint
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.images.templates import RenderedFile

AT = "2026-01-02T03:04:05+00:00"
REPO_PACKER = Path(__file__).resolve().parents[2] / "packer"

RECORD_V1 = """\
{
  "artifacts": [
    {
      "name": "disk.qcow2",
      "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
      "size": 5
    },
    {
      "name": "vmlinuz",
      "sha256": "6923dd1bc0460082c5d55a831908c24a282860b7f1cd6c2b79cf1bc8857c639c",
      "size": 6
    }
  ],
  "builder": "qemu",
  "cmdline": "console=ttyS0",
  "created_at": "2026-01-02T03:04:05+00:00",
  "directory": "STORE/tiny/v1",
  "disk": "disk.qcow2",
  "fingerprint": "fp-one",
  "image": "tiny",
  "initrd": "initrd.img",
  "kernel": "vmlinuz",
  "packer_version": "1.11.2",
  "parent": 4,
  "snapshot": "tiny-v1",
  "source_commit": "0123456789abcdef0123456789abcdef01234567",
  "source_dirty": true,
  "status": "active",
  "status_at": null,
  "status_reason": null,
  "variables": {
    "accelerator": "tcg",
    "fast": false,
    "memory": 256,
    "ratio": 1.5
  },
  "version": 1,
  "vm": "tiny-base"
}
"""

STATE = """\
{
  "changes": [
    {
      "at": "2026-01-02T03:04:05+00:00",
      "reason": "bad kernel",
      "status": "revoked",
      "version": 2
    },
    {
      "at": "2026-01-02T03:04:05+00:00",
      "reason": "old",
      "status": "pruned",
      "version": 1
    }
  ],
  "channels": {
    "latest": [
      {
        "at": "2026-01-02T03:04:05+00:00",
        "by": "build",
        "version": 1
      },
      {
        "at": "2026-01-02T03:04:05+00:00",
        "by": "build",
        "version": 2
      },
      {
        "at": "2026-01-02T03:04:05+00:00",
        "by": "revoke",
        "version": 1
      }
    ],
    "stable": [
      {
        "at": "2026-01-02T03:04:05+00:00",
        "by": "promote",
        "version": 1
      },
      {
        "at": "2026-01-02T03:04:05+00:00",
        "by": "promote",
        "version": 2
      },
      {
        "at": "2026-01-02T03:04:05+00:00",
        "by": "revoke",
        "version": 1
      }
    ]
  }
}
"""

# `images show --json` keeps the records' field order (not sorted)
SHOWN_V1 = (
    '{"image": "tiny", "version": 1, "created_at": "2026-01-02T03:04:05+00:00", '
    '"fingerprint": "fp-one", "builder": "qemu", "packer_version": "1.11.2", '
    '"source_commit": "0123456789abcdef0123456789abcdef01234567", "source_dirty": true, '
    '"parent": 4, "directory": "STORE/tiny/v1", "artifacts": [{"name": "disk.qcow2", '
    '"size": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}, '
    '{"name": "vmlinuz", "size": 6, '
    '"sha256": "6923dd1bc0460082c5d55a831908c24a282860b7f1cd6c2b79cf1bc8857c639c"}], '
    '"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", '
    '"cmdline": "console=ttyS0", "vm": "tiny-base", "snapshot": "tiny-v1", '
    '"variables": {"accelerator": "tcg", "fast": false, "memory": 256, "ratio": 1.5}, '
    '"status": "pruned", "status_reason": "old", "status_at": "2026-01-02T03:04:05+00:00", '
    '"channels": ["latest", "stable"]}'
)


def _files(folder: Path, contents: dict[str, str]) -> tuple[Path, ...]:
    folder.mkdir(parents=True)
    for name, content in contents.items():
        (folder / name).write_text(content)
    return tuple(folder / name for name in contents)


def _fill_registry(registry: Registry, tmp_path: Path) -> None:
    """Every record field set; every kind of channel move and status change."""
    registry.register(
        NewVersion(
            image="tiny",
            fingerprint="fp-one",
            builder="qemu",
            packer_version="1.11.2",
            files=_files(tmp_path / "b1", {"disk.qcow2": "hello", "vmlinuz": "kernel"}),
            source_commit="0123456789abcdef0123456789abcdef01234567",
            source_dirty=True,
            parent=4,
            disk="disk.qcow2",
            kernel="vmlinuz",
            initrd="initrd.img",
            cmdline="console=ttyS0",
            vm="tiny-base",
            snapshot="tiny-v1",
            variables=(("memory", 256), ("ratio", 1.5), ("fast", False), ("accelerator", "tcg")),
        )
    )
    registry.promote("tiny", 1, "stable")
    registry.register(
        NewVersion(
            image="tiny",
            fingerprint="fp-two",
            builder="qemu",
            packer_version="1.11.2",
            files=_files(tmp_path / "b2", {"disk.qcow2": "two"}),
        )
    )
    registry.promote("tiny", 2, "stable")
    registry.revoke("tiny", 2, "bad kernel")
    registry.prune("tiny", 1, "old")


@pytest.fixture
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(registry_module, "now_iso", lambda: AT)
    _fill_registry(Registry(tmp_path / "registry", tmp_path / "images"), tmp_path)
    return tmp_path


def _text(path: Path, tmp_path: Path) -> str:
    return path.read_text().replace(str(tmp_path / "images"), "STORE")


def test_a_record_and_a_state_are_written_as_before(filled: Path) -> None:
    images = filled / "registry" / "images" / "tiny"
    assert _text(images / "versions" / "v0001.json", filled) == RECORD_V1
    assert _text(images / "state.json", filled) == STATE


def test_records_read_back_merged_with_their_status_show_as_before(filled: Path) -> None:
    registry = Registry(filled / "registry", filled / "images")
    v1 = registry.resolve("tiny", 1)
    shown = json.dumps(_doc(v1, ["latest", "stable"])).replace(str(filled / "images"), "STORE")
    assert shown == SHOWN_V1
    assert [(m.version, m.by) for m in registry.channels("tiny")["stable"]] == [
        (1, "promote"),
        (2, "promote"),
        (1, "revoke"),
    ]


def test_files_written_again_from_what_was_read_are_unchanged(filled: Path) -> None:
    """A write after a read (a new registry object, nothing cached) keeps what was there."""
    images = filled / "registry" / "images" / "tiny"
    before = (images / "versions" / "v0001.json").read_text()
    registry = Registry(filled / "registry", filled / "images")
    disk = _files(filled / "b3", {"disk.qcow2": "three"})
    registry.register(
        NewVersion(image="tiny", fingerprint="fp-3", builder="qemu", packer_version="1", files=disk)
    )
    registry.promote("tiny", 3, "canary")
    assert (images / "versions" / "v0001.json").read_text() == before
    state = json.loads((images / "state.json").read_text())
    pinned = json.loads(STATE)
    assert state["changes"] == pinned["changes"]
    assert state["channels"]["stable"] == pinned["channels"]["stable"]
    assert state["channels"]["latest"][:-1] == pinned["channels"]["latest"]
    assert list(state["channels"]) == ["canary", "latest", "stable"]


FULL_DEFINITION = """\
description: every key set
builder: qemu
template: main.pkr.hcl.j2
render: [Autounattend.xml.j2, meta.j2]
copy: [scripts, files/a.txt]
prepare: guest/build.sh
requires: [qemu-system-x86_64, qemu-img]
variables: {memory: 256, ratio: 0.5, fast: true, accelerator: tcg}
secrets: {admin_password: IMAGEPIPE_ADMIN_PASSWORD}
registers_as: full
validate_without_requires: syntax-only
parent: {image: base, channel: stable}
artifact:
  files: [output/disk.qcow2, guest-out/vmlinuz]
  disk: disk.qcow2
  kernel: vmlinuz
  initrd: initrd.img
  cmdline: console=ttyS0
  vm: "[= vm_name =]"
  snapshot: "v[= image_version =]"
"""


def _fingerprint_of(definition_text: str, empty: Path) -> str:
    """The fingerprint with only the definition varying: an empty folder, fixed inputs."""
    definition = parse_definition(definition_text, "image.yml")
    image = Image(name="pinned", folder=empty, definition=definition)
    rendered = [RenderedFile(path="main.pkr.hcl", sha256="0" * 64)]
    return fingerprint(image, rendered, {"memory": 256, "fast": True}, "1.11.2", 3)


def test_the_fingerprint_of_a_definition_with_every_key_is_as_before(tmp_path: Path) -> None:
    assert _fingerprint_of(FULL_DEFINITION, tmp_path) == (
        "7606faf68b37dac81644f397a9c11d16e5a740a5b56cc1ce748ec06d8d1b21df"
    )


def test_the_fingerprint_of_the_tiny_definition_is_as_before(tmp_path: Path) -> None:
    """Changes when packer/tiny/image.yml is edited (and then every tiny build is new)."""
    text = (REPO_PACKER / "tiny" / "image.yml").read_text()
    assert (
        _fingerprint_of(text, tmp_path)
        == "ffd01b64db3e8dc2f974f0541c6d11c9ba2d819c6428cd371184af6ecd8dea53"
    )
