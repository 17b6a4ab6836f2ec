"""`imagepipe simulate --chart FILE`: the simulated day drawn with matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from imagepipe.cli.app import main

POOL = "name: lab\nimage: win10\nsize: {initial: 2, free: 2, max: 40}\n"
STORM = ["--profile", "morning-storm", "--users", "25", "--start", "boot"]
SERIES = ("desktops in use", "free and ready", "starting", "users waiting", "logins per 5 min")


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "lab.yml"
    path.write_text(POOL)
    return path


def simulate(pool: Path, *options: str) -> int:
    return main(["simulate", str(pool), *STORM, *options])


def test_png_chart_is_a_png_image_of_the_day(pool: Path, tmp_path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    chart = tmp_path / "day.png"
    assert simulate(pool, "--chart", str(chart)) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(chart) as image:
        image.verify()
        width, height = image.size
    assert width >= 800 and height >= 800  # readable, not a thumbnail


def test_svg_chart_has_a_panel_per_policy_and_every_series_in_its_legends(
    pool: Path, tmp_path: Path
) -> None:
    chart = tmp_path / "compare.svg"
    assert simulate(pool, "--compare", "original", "--compare", "fixed", "--chart", str(chart)) == 0
    svg = chart.read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for label in SERIES:
        assert label in svg
    for policy in ("imagepipe", "original", "fixed"):
        assert f"{policy}: " in svg  # its own panel, titled with its instant share
    assert "Idle desktop-hours so far" in svg and "had to wait" in svg
    assert "time of day (UTC)" in svg and "08:00" in svg  # times of day along the bottom


def test_days_are_labelled_by_weekday_and_html_embeds_the_svg(pool: Path, tmp_path: Path) -> None:
    chart = tmp_path / "week.html"
    assert simulate(pool, "--days", "2", "--chart", str(chart)) == 0
    page = chart.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "2 simulated days" in page and "Mon " in page and "Tue " in page


def test_drawing_a_chart_changes_no_figure(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate(pool, "--compare", "original", "--json") == 0
    plain = json.loads(capsys.readouterr().out)
    chart = tmp_path / "day.svg"
    assert simulate(pool, "--compare", "original", "--json", "--chart", str(chart)) == 0
    assert json.loads(capsys.readouterr().out) == plain


@pytest.mark.parametrize("name", ["day.pdf", "day", "day.png.txt"])
def test_unknown_chart_extension_exits_2_and_writes_nothing(
    pool: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "out" / name
    chart.parent.mkdir()
    assert simulate(pool, "--chart", str(chart)) == 2
    err = capsys.readouterr().err
    assert ".png, .svg, .html" in err and "--chart" in err
    assert list(chart.parent.iterdir()) == []


def test_chart_without_matplotlib_exits_3_saying_how_to_install_it(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    chart = tmp_path / "day.png"
    assert simulate(pool, "--chart", str(chart)) == 3
    assert "imagepipe[charts]" in capsys.readouterr().err
    assert not chart.exists()


def test_simulate_without_chart_does_not_import_matplotlib(pool: Path) -> None:
    import subprocess

    script = (
        "import sys\n"
        "from imagepipe.cli.app import main\n"
        f"code = main(['simulate', {str(pool)!r}, '--profile', 'steady', '--json'])\n"
        "assert code == 0, code\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported without --chart'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
