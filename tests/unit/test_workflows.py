"""The CI workflows under .github/workflows/ have never run on GitHub: actionlint (with
shellcheck for their `run:` scripts) checks them here, as GitHub would read them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import require, require_program

REPO = Path(__file__).resolve().parents[2]


def actionlint() -> str:
    beside_python = Path(sys.executable).with_name("actionlint")
    found = str(beside_python) if beside_python.exists() else shutil.which("actionlint")
    require(found is not None, "actionlint is not installed (pip install -e .[dev])")
    assert found is not None
    return found


def lint(*files: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [actionlint(), "-no-color", *map(str, files)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_workflow_passes_actionlint_and_shellcheck() -> None:
    require_program("shellcheck")  # without it actionlint skips the run: scripts silently
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows

    result = lint(*workflows)

    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_does_catch_a_broken_workflow(tmp_path: Path) -> None:
    """The check above means something: a typo'd key and an unknown runner label are found."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: push\njobs:\n  test:\n    runs-on: [self-hosted, gpu-farm]\n"
        "    steps:\n      - uses: actions/checkout@v5\n        wth: {depth: 1}\n"
    )

    result = lint(broken, cwd=tmp_path)

    assert result.returncode == 1
    assert 'label "gpu-farm" is unknown' in result.stdout
    assert '"wth"' in result.stdout


def _jobs() -> dict[str, dict[str, object]]:
    jobs: dict[str, dict[str, object]] = {}
    for workflow in sorted((REPO / ".github" / "workflows").glob("*.yml")):
        doc = yaml.safe_load(workflow.read_text())
        for name, job in doc["jobs"].items():
            jobs[f"{workflow.name}:{name}"] = job
    return jobs


def test_the_test_job_runs_on_debian_12_in_a_container_that_can_run_libvirt_and_qemu() -> None:
    job = _jobs()["ci.yml:test"]
    container = job.get("container")
    assert isinstance(container, dict), "the test job runs in a container"
    assert container["image"] == "debian:12"
    assert "--privileged" in str(container.get("options", "")).split()
    steps = job["steps"]
    assert isinstance(steps, list)
    assert any(step.get("run", "").strip() == "./.ci/run" for step in steps)


def test_every_job_on_a_github_hosted_machine_runs_in_debian_12() -> None:
    """The scripts support Debian 12 only; a hosted machine (Ubuntu) just hosts the container.
    Self-hosted runners are Debian 12 machines (docs: what a self-hosted runner needs)."""
    for name, job in _jobs().items():
        labels = job["runs-on"]
        hosted = "self-hosted" not in (labels if isinstance(labels, list) else [labels])
        if hosted:
            container = job.get("container")
            image = container.get("image") if isinstance(container, dict) else container
            assert image == "debian:12", f"{name} runs on {labels} outside Debian 12"
