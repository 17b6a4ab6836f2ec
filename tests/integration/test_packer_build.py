"""`imagepipe build` with the real Packer 1.6.6: the tiny image under QEMU (TCG), and small
`null`-builder images for failures, interrupts and `--changed`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepipe.images.checksum import sha256_file
from imagepipe.images.registry import Registry
from tests.conftest import require, require_program
from tests.unit.test_cli_startup import run_counting_imports

ROOT = Path(__file__).resolve().parents[2]

# The real entry point (`imagepipe`), which imports only the command it runs.
_CLI = "from imagepipe.cli.app import run; run()"

NULL_IMAGE = """\
description: a null-builder image for tests
builder: "null"
template: main.pkr.hcl.j2
requires: [{program}]
variables: {{greeting: hello}}
artifact: {{files: [out.txt]}}
"""

NULL_TEMPLATE = """\
source "null" "x" {{
  communicator = "none"
}}
build {{
  sources = ["source.null.x"]
  provisioner "shell-local" {{
    inline = {commands}
  }}
}}
"""


def _config(tmp: Path, packer_dir: Path) -> Path:
    path = tmp / "imagepipe.yml"
    path.write_text(
        f"packer_dir: {packer_dir}\nregistry: {tmp / 'registry'}\n"
        f"image_store: {tmp / 'images'}\npools_dir: {tmp / 'pools'}\nstate_db: {tmp / 'st.db'}\n"
    )
    return path


def _cli(config: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLI, "--config", str(config), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _null_image(packer_dir: Path, name: str, commands: list[str], program: str = "sh") -> None:
    folder = packer_dir / name
    folder.mkdir(parents=True)
    (folder / "image.yml").write_text(NULL_IMAGE.format(program=program))
    template = NULL_TEMPLATE.format(commands=json.dumps(commands))
    (folder / "main.pkr.hcl.j2").write_text(template)


def _events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Registry]:
    """One real build of `tiny` (v1), shared by the tests below."""
    require_program("packer")
    require_program("qemu-system-x86_64")
    require(shutil.which("apt-get") is not None, "the tiny guest is built from Debian packages")
    tmp = tmp_path_factory.mktemp("tiny")
    config = _config(tmp, ROOT / "packer")
    started = time.monotonic()
    done = _cli(config, "build", "tiny", "--json")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    events = _events(done.stdout)
    assert {"event": "phase", "phase": "validate", "text": "packer validate"} in [
        {k: v for k, v in e.items() if k != "elapsed"} for e in events
    ]
    assert any(e["event"] == "step" and e["text"] == "Waiting for shutdown..." for e in events)
    assert events[-1]["outcome"] == "built"
    assert events[-1]["version"] == 1
    return config, Registry(tmp / "registry", tmp / "images")


@pytest.mark.real
def test_tiny_builds_for_real_and_its_artifacts_match_the_record(
    tiny: tuple[Path, Registry],
) -> None:
    _, registry = tiny
    record = registry.resolve("tiny", 1)
    assert record.builder == "qemu"
    assert record.packer_version.startswith("1.")
    assert [a.name for a in record.artifacts] == ["disk.qcow2", "vmlinuz", "initrd.img"]
    for artifact in record.artifacts:
        assert sha256_file(Path(record.directory) / artifact.name) == artifact.sha256
    base = record.base_image()
    assert (base.disk, base.kernel, base.initrd) == ("disk.qcow2", "vmlinuz", "initrd.img")
    assert base.cmdline == "console=ttyS0 imagepipe.mode=desktop"
    qemu_img = subprocess.run(
        ["qemu-img", "info", "--output=json", str(base.directory / "disk.qcow2")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(qemu_img.stdout)["format"] == "qcow2"


@pytest.mark.real
def test_an_unchanged_image_is_up_to_date_and_force_builds_the_next_version(
    tiny: tuple[Path, Registry],
) -> None:
    config, registry = tiny
    started = time.monotonic()
    again = _cli(config, "build", "tiny")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "up to date: tiny v1"
    assert time.monotonic() - started < 5
    forced = _cli(config, "build", "tiny", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert _events(forced.stdout)[-1]["version"] == 2
    v2 = registry.resolve("tiny")
    assert (v2.version, v2.parent) == (2, 1)
    assert v2.fingerprint == registry.resolve("tiny", 1).fingerprint


@pytest.mark.real
def test_a_failed_build_registers_nothing_and_points_at_the_log(tmp_path: Path) -> None:
    require_program("packer")
    _null_image(tmp_path / "packer", "broken", ["echo starting", "echo disk full >&2; exit 3"])
    config = _config(tmp_path, tmp_path / "packer")
    done = _cli(config, "build", "broken")
    assert done.returncode == 4
    assert "build of broken failed, nothing registered: Script exited" in done.stderr
    log_path = done.stderr.split("(log: ")[1].split(")")[0]
    assert Path(log_path).is_file()
    assert Registry(tmp_path / "registry", tmp_path / "images").versions("broken") == []


@pytest.mark.real
def test_an_up_to_date_build_loads_no_packer_stream_parser(tmp_path: Path) -> None:
    """An up-to-date build is mostly start-up: it reads no Packer output, so it loads no parser
    for it (benchmarks/bench_build.py times it)."""
    require_program("packer")
    _null_image(tmp_path / "packer", "ok", ["echo hello > out.txt"])
    config = _config(tmp_path, tmp_path / "packer")
    assert _cli(config, "build", "ok").returncode == 0
    printed, modules = run_counting_imports(["--config", str(config), "build", "ok"], ROOT)
    assert printed.strip() == "up to date: ok v1"
    assert "imagepipe.images.packer" in modules  # it did ask for Packer's version
    assert modules & {"imagepipe.images.stream", "git", "imagepipe.pool.model"} == set()


# A line of Packer's debug log (PACKER_LOG=1), e.g. "2026/12/07 06:01:02 [INFO] Packer version: …"
DEBUG_LINE = "[INFO] Packer version"


@pytest.mark.real
def test_packer_log_keeps_what_packer_printed_and_its_debug_log_is_written_only_when_asked(
    tmp_path: Path,
) -> None:
    require_program("packer")
    _null_image(tmp_path / "packer", "broken", ["echo starting", "echo disk full >&2; exit 3"])
    config = _config(tmp_path, tmp_path / "packer")
    plain = subprocess.run(
        [sys.executable, "-c", _CLI, "--config", str(config), "build", "broken"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PACKER_LOG", "PACKER_LOG_PATH")},
    )
    assert plain.returncode == 4
    assert "run again with --debug-log for Packer's debug log" in plain.stderr
    build_dir = Path(plain.stderr.split("(log: ")[1].split(")")[0]).parent
    printed = (build_dir / "packer.log").read_text()
    assert "disk full" in printed  # the script's error, as Packer printed it
    assert ",ui,error," in printed  # Packer's machine-readable stream, line for line
    assert DEBUG_LINE not in printed
    assert not (build_dir / "packer-debug.log").exists()

    debug = _cli(config, "build", "broken", "--debug-log")
    assert debug.returncode == 4
    debug_dir = Path(debug.stderr.split("(log: ")[1].split(")")[0]).parent
    assert f"Packer's debug log: {debug_dir / 'packer-debug.log'}" in debug.stderr
    assert DEBUG_LINE in (debug_dir / "packer-debug.log").read_text()
    assert "disk full" in (debug_dir / "packer.log").read_text()
    assert DEBUG_LINE not in (debug_dir / "packer.log").read_text()


@pytest.mark.real
def test_a_packer_log_in_the_environment_asks_for_the_debug_log_too(tmp_path: Path) -> None:
    """An admin who exports PACKER_LOG=1 (as Packer's own docs say) gets the debug log."""
    require_program("packer")
    _null_image(tmp_path / "packer", "ok", ["echo hello > out.txt"])
    config = _config(tmp_path, tmp_path / "packer")
    done = subprocess.run(
        [sys.executable, "-c", _CLI, "--config", str(config), "build", "ok", "--keep-build-dir"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PACKER_LOG": "1"},
    )
    assert done.returncode == 0, done.stderr
    [build_dir] = (tmp_path / "images" / ".builds").iterdir()
    assert DEBUG_LINE in (build_dir / "packer-debug.log").read_text()
    assert DEBUG_LINE not in (build_dir / "packer.log").read_text()


@pytest.mark.real
def test_changed_builds_what_it_can_and_reports_images_this_host_cannot_build(
    tmp_path: Path,
) -> None:
    require_program("packer")
    _null_image(tmp_path / "packer", "ok", ["echo hi > out.txt"])
    _null_image(tmp_path / "packer", "vbox", ["echo hi > out.txt"], program="no-such-vboxmanage")
    config = _config(tmp_path, tmp_path / "packer")
    first = _cli(config, "build", "--changed", "--json")
    assert first.returncode == 3
    results = {e["image"]: e for e in _events(first.stdout) if e["event"] == "result"}
    assert results["ok"]["outcome"] == "built"
    assert results["vbox"]["outcome"] == "unavailable"
    assert "needs no-such-vboxmanage" in str(results["vbox"]["message"])
    second = _cli(config, "build", "--changed", "--skip-unavailable")
    assert second.returncode == 0
    assert "ok: up-to-date: up to date: ok v1" in second.stdout


@pytest.mark.real
def test_the_windows_templates_render_and_pass_packer_validate(tmp_path: Path) -> None:
    require_program("packer")
    config = _config(tmp_path, ROOT / "packer")
    for image in ("win10", "win10-update"):
        done = _cli(config, "build", image, "--dry-run")
        assert done.returncode == 0, done.stderr
        assert "templates render and validate" in done.stdout


def _live_processes_under(folder: Path) -> list[str]:
    """Processes (not zombies) whose working directory is inside `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if state != "Z" and cwd.startswith(str(folder)):
            found.append(f"{proc.name} {name}")
    return found


@pytest.mark.real
def test_ctrl_c_stops_packer_and_qemu_and_registers_nothing(tmp_path: Path) -> None:
    require_program("packer")
    require_program("qemu-system-x86_64")
    packer_dir = tmp_path / "packer"
    shutil.copytree(ROOT / "packer" / "tiny", packer_dir / "tiny")
    template = packer_dir / "tiny" / "tiny.pkr.hcl.j2"  # a guest that never powers off
    template.write_text(
        template.read_text().replace("imagepipe.mode=build", "imagepipe.mode=desktop")
    )
    config = _config(tmp_path, packer_dir)
    process = subprocess.Popen(
        [sys.executable, "-c", _CLI, "--config", str(config), "build", "tiny", "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if '"Waiting for shutdown..."' in line:
            break
    else:
        pytest.fail(
            f"the build never reached its VM: {process.stderr.read() if process.stderr else ''}"
        )
    builds = tmp_path / "images" / ".builds"
    assert any("qemu" in p for p in _live_processes_under(builds))
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert "nothing was registered" in stderr
    assert _live_processes_under(builds) == []
    assert Registry(tmp_path / "registry", tmp_path / "images").versions("tiny") == []


SECRET_IMAGE = """\
description: an image with a secret
builder: "null"
template: main.pkr.hcl.j2
secrets: {password: TEST_IMAGEPIPE_PASSWORD}
artifact: {files: [out.txt]}
"""

SECRET_TEMPLATE = """\
variable "password" {
  type      = string
  sensitive = true
}
source "null" "x" {
  communicator = "none"
}
build {
  sources = ["source.null.x"]
  provisioner "shell-local" {
    environment_vars = ["PASSWORD=${var.password}"]
    inline           = ["test \\"$PASSWORD\\" = [= password =] && echo ok > out.txt"]
  }
}
"""


@pytest.mark.real
def test_a_secret_reaches_the_build_but_no_argv_log_output_or_record(tmp_path: Path) -> None:
    require_program("packer")
    folder = tmp_path / "packer" / "secret"
    folder.mkdir(parents=True)
    (folder / "image.yml").write_text(SECRET_IMAGE)
    (folder / "main.pkr.hcl.j2").write_text(SECRET_TEMPLATE)
    config = _config(tmp_path, tmp_path / "packer")
    secret = "Sw0rdfish-31337"
    refused = _cli(config, "build", "secret", "--var", f"password={secret}")
    assert refused.returncode == 2
    assert "TEST_IMAGEPIPE_PASSWORD" in refused.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLI,
            "--config",
            str(config),
            "build",
            "secret",
            "--json",
            "--keep-build-dir",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TEST_IMAGEPIPE_PASSWORD": secret},
    )
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    [build_dir] = (tmp_path / "images" / ".builds").iterdir()
    assert secret not in (build_dir / "packer.log").read_text()
    for path in (tmp_path / "registry").rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert secret not in path.read_text(errors="replace")


ANSWER_IMAGE = """\
description: an image whose answer file carries a secret
builder: "null"
template: main.pkr.hcl.j2
render: [answer.xml.j2]
secrets: {password: TEST_IMAGEPIPE_PASSWORD}
artifact: {files: [out.txt]}
"""

ANSWER_FILE = "<Password>[= password | e =]</Password>\n"


def _answer_image(packer_dir: Path, commands: list[str]) -> None:
    folder = packer_dir / "answer"
    folder.mkdir(parents=True)
    (folder / "image.yml").write_text(ANSWER_IMAGE)
    (folder / "answer.xml.j2").write_text(ANSWER_FILE)
    (folder / "main.pkr.hcl.j2").write_text(NULL_TEMPLATE.format(commands=json.dumps(commands)))


@pytest.mark.real
@pytest.mark.parametrize(
    ("ending", "commands", "argv", "code"),
    [
        ("failure", ["test -s answer.xml", "exit 3"], [], 4),
        (
            "success kept on request",
            ["test -s answer.xml", "echo ok > out.txt"],
            ["--keep-build-dir"],
            0,
        ),
        ("ctrl-c", ["test -s answer.xml", "echo waiting", "sleep 60"], [], 130),
    ],
)
def test_a_rendered_file_with_a_secret_is_removed_on_every_exit_and_the_logs_stay(
    tmp_path: Path, ending: str, commands: list[str], argv: list[str], code: int
) -> None:
    require_program("packer")
    _answer_image(tmp_path / "packer", commands)
    config = _config(tmp_path, tmp_path / "packer")
    secret = "Sw0rdfish<&>31337"
    process = subprocess.Popen(
        [sys.executable, "-c", _CLI, "--config", str(config), "build", "answer", "--json", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TEST_IMAGEPIPE_PASSWORD": secret},
    )
    if ending == "ctrl-c":
        assert process.stdout is not None
        for line in process.stdout:
            if "waiting" in line:
                break
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    builds = tmp_path / "images" / ".builds"
    kept = list(builds.iterdir()) if builds.is_dir() else []
    if ending != "ctrl-c":
        [build_dir] = kept
        assert (build_dir / "packer.log").is_file()
        assert (build_dir / "main.pkr.hcl").is_file()
    for build_dir in kept:
        assert not (build_dir / "answer.xml").exists()
        for path in build_dir.rglob("*"):
            if path.is_file():
                assert "Sw0rdfish" not in path.read_text(errors="replace"), path


def _validated(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The validate phase's text of a `build --json` run."""
    return [
        str(e["text"])
        for e in _events(done.stdout)
        if e.get("event") == "phase" and e.get("phase") == "validate"
    ]


@pytest.mark.real
def test_an_unchanged_template_is_validated_once_and_a_changed_one_again(tmp_path: Path) -> None:
    require_program("packer")
    packer_dir = tmp_path / "packer"
    _null_image(packer_dir, "hello", ["echo hi > out.txt"])
    config = _config(tmp_path, packer_dir)
    first = _cli(config, "build", "hello", "--json")
    assert first.returncode == 0, first.stderr
    assert _validated(first) == ["packer validate"]
    cache = tmp_path / "images" / ".packer-validated.json"
    assert cache.stat().st_mode & 0o777 == 0o600
    forced = _cli(config, "build", "hello", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert _validated(forced) == ["packer validate: unchanged, validated before"]
    assert _events(forced.stdout)[-1]["version"] == 2
    # a changed template (here: an attribute Packer rejects) is validated again and stops
    template = packer_dir / "hello" / "main.pkr.hcl.j2"
    template.write_text(template.read_text().replace('communicator = "none"', "bogus = 1"))
    broken = _cli(config, "build", "hello", "--force", "--json")
    assert broken.returncode != 0
    assert "packer validate" in broken.stderr and "bogus" in broken.stderr
    assert [
        r.version for r in Registry(tmp_path / "registry", tmp_path / "images").versions("hello")
    ] == [1, 2]


@pytest.mark.real
def test_a_failed_validation_is_not_remembered_and_stops_every_build(tmp_path: Path) -> None:
    require_program("packer")
    packer_dir = tmp_path / "packer"
    _null_image(packer_dir, "bad", ["echo hi > out.txt"])
    template = packer_dir / "bad" / "main.pkr.hcl.j2"
    template.write_text(template.read_text().replace('communicator = "none"', "bogus = 1"))
    config = _config(tmp_path, packer_dir)
    for _ in range(2):
        done = _cli(config, "build", "bad", "--force")
        assert done.returncode != 0
        assert "packer validate" in done.stderr and "bogus" in done.stderr
    assert not (tmp_path / "images" / ".packer-validated.json").exists()
    assert Registry(tmp_path / "registry", tmp_path / "images").versions("bad") == []


@pytest.mark.real
def test_a_version_records_the_git_commit_and_dirtiness_its_folder_was_built_from(
    tmp_path: Path,
) -> None:
    require_program("packer")
    require_program("git")
    packer_dir = tmp_path / "packer"
    _null_image(packer_dir, "hello", ["echo hi > out.txt"])

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
            cwd=packer_dir,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "hello")
    head = git("rev-parse", "HEAD")
    config = _config(tmp_path, packer_dir)
    assert _cli(config, "build", "hello").returncode == 0
    (packer_dir / "hello" / "notes.txt").write_text("not committed\n")
    assert _cli(config, "build", "hello").returncode == 0
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    clean, dirty = registry.versions("hello")
    assert (clean.source_commit, clean.source_dirty) == (head, False)
    assert (dirty.source_commit, dirty.source_dirty) == (head, True)
