"""`main(argv, adapters)` reaches every command's adapters: the `images` commands work on an
injected registry and `build` runs an injected Packer, so neither needs the configured ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters
from imagepipe.cli.app import main
from imagepipe.images.packer import Packer, PackerVersion, RunResult
from imagepipe.images.registry import Registry
from imagepipe.images.stream import PackerEvent, summarize
from tests.unit.test_images_registry import _register

IMAGE = """\
description: an image whose build the fake Packer makes
builder: "null"
template: main.pkr.hcl.j2
variables: {greeting: hello}
artifact: {files: [out.txt]}
"""


@dataclass
class FakePacker(Packer):
    """Packer 1.6.6 that validates anything and builds by writing the artifact file."""

    calls: list[str] = field(default_factory=list)

    def version(self) -> PackerVersion:
        return PackerVersion(1, 6, 6)

    def validate(self, template: Path, env: Mapping[str, str], *, syntax_only: bool) -> bool:
        self.calls.append(f"validate {template.name}")
        return True

    def build(
        self,
        template: Path,
        *,
        env: Mapping[str, str],
        log_path: Path,
        debug_log: Path | None = None,
        only: Sequence[str] = (),
        on_event: Callable[[PackerEvent], None] = lambda _event: None,
    ) -> RunResult:
        self.calls.append(f"build {template.name}")
        (template.parent / "out.txt").write_text(template.read_text())
        return RunResult(0, summarize([]), interrupted=False)


def _settings(tmp_path: Path) -> Path:
    config = tmp_path / "imagepipe.yml"
    config.write_text(
        f"packer_dir: {tmp_path / 'packer'}\nregistry: {tmp_path / 'registry'}\n"
        f"image_store: {tmp_path / 'images'}\npools_dir: {tmp_path / 'pools'}\n"
        f"state_db: {tmp_path / 'state.db'}\nrun_dir: {tmp_path / 'run'}\n"
    )
    return config


def test_images_commands_work_on_an_injected_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = Registry(tmp_path / "other" / "registry", tmp_path / "other" / "images")
    _register(elsewhere, tmp_path, "a")
    argv = ["--config", str(_settings(tmp_path)), "images", "list", "--json"]
    assert main(argv, Adapters(registry=elsewhere)) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["image"], d["version"], d["channels"]) for d in listed] == [("tiny", 1, ["latest"])]
    assert not (tmp_path / "registry").exists()  # the configured registry was never touched


def test_build_runs_the_injected_packer_and_registers_the_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "packer" / "hello"
    folder.mkdir(parents=True)
    (folder / "image.yml").write_text(IMAGE)
    (folder / "main.pkr.hcl.j2").write_text('# says [= greeting =]\nsource "null" "x" {}\n')
    config = _settings(tmp_path)
    packer = FakePacker()
    assert main(["--config", str(config), "build", "hello"], Adapters(packer=packer)) == 0
    assert capsys.readouterr().out.startswith("built hello v1 in ")
    assert packer.calls == ["validate main.pkr.hcl", "build main.pkr.hcl"]
    (record,) = Registry(tmp_path / "registry", tmp_path / "images").versions("hello")
    assert record.packer_version == "1.6.6"
    artifact = Path(record.directory) / "out.txt"
    assert artifact.read_text().startswith("# says hello")
    # the same inputs again: up to date, Packer not run
    assert main(["--config", str(config), "build", "hello"], Adapters(packer=packer)) == 0
    assert capsys.readouterr().out.strip() == "up to date: hello v1"
    assert len(packer.calls) == 2
