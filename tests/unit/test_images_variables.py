"""Variables: typed like their defaults, unknown names refused, secrets only from the env."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.errors import BadInputError
from imagepipe.images.definition import Image, parse_definition
from imagepipe.images.variables import parse_assignments, resolve_secrets, resolve_variables

YML = """\
description: d
builder: "null"
template: t.j2
variables: {memory: 256, headless: true, iso_url: "file:///x.iso", ratio: 1.5}
secrets: {admin_password: TEST_IMAGEPIPE_ADMIN_PASSWORD}
artifact: {files: [x]}
"""


def _image() -> Image:
    return Image(name="demo", folder=Path("."), definition=parse_definition(YML, "image.yml"))


def test_var_values_take_the_type_of_their_default(tmp_path: Path) -> None:
    var_file = tmp_path / "vars.yml"
    var_file.write_text("memory: 1024\nratio: 2\n")
    values = resolve_variables(
        _image(), parse_assignments(["headless=false", "iso_url=a=b"]), [var_file]
    )
    assert values == {"memory": 1024, "headless": False, "iso_url": "a=b", "ratio": 2.0}


def test_command_line_wins_over_var_file(tmp_path: Path) -> None:
    var_file = tmp_path / "vars.json"
    var_file.write_text('{"memory": 1024}')
    assert resolve_variables(_image(), {"memory": "2048"}, [var_file])["memory"] == 2048


def test_unknown_and_badly_typed_variables_are_refused_with_the_known_names() -> None:
    with pytest.raises(BadInputError, match=r"no variable 'memroy' \(known: headless, iso_url"):
        resolve_variables(_image(), {"memroy": "1"}, [])
    with pytest.raises(BadInputError, match=r"memory='lots': expected a int"):
        resolve_variables(_image(), {"memory": "lots"}, [])
    with pytest.raises(BadInputError, match="expected NAME=VALUE"):
        parse_assignments(["memory"])


def test_a_secret_on_the_command_line_is_refused() -> None:
    with pytest.raises(BadInputError, match="TEST_IMAGEPIPE_ADMIN_PASSWORD"):
        resolve_variables(_image(), {"admin_password": "hunter2"}, [])


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_IMAGEPIPE_ADMIN_PASSWORD", raising=False)
    with pytest.raises(BadInputError, match="set the environment variable"):
        resolve_secrets(_image(), placeholders=False)
    assert resolve_secrets(_image(), placeholders=True) == {
        "admin_password": "<secret:admin_password>"
    }
    monkeypatch.setenv("TEST_IMAGEPIPE_ADMIN_PASSWORD", "s3cret")
    assert resolve_secrets(_image(), placeholders=False) == {"admin_password": "s3cret"}
