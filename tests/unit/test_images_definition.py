"""image.yml validation and template rendering: mistakes name the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.errors import BadInputError, ConfigError
from imagepipe.images.definition import list_images, load_image, parse_definition
from imagepipe.images.templates import render_image, secret_outputs

REPO_PACKER = Path(__file__).resolve().parents[2] / "packer"

GOOD = """\
description: test image
builder: "null"
template: main.pkr.hcl.j2
variables:
  memory: 256
artifact:
  files: [out.txt]
"""


def _image(tmp_path: Path, yml: str, template: str) -> Path:
    folder = tmp_path / "packer" / "demo"
    folder.mkdir(parents=True)
    (folder / "image.yml").write_text(yml)
    (folder / "main.pkr.hcl.j2").write_text(template)
    return tmp_path / "packer"


def test_a_wrong_key_in_image_yml_names_file_line_and_key() -> None:
    text = GOOD.replace("  files: [out.txt]", "  files: [out.txt]\n  colour: red")
    with pytest.raises(ConfigError) as err:
        parse_definition(text, "packer/demo/image.yml")
    assert str(err.value).startswith("packer/demo/image.yml:8: artifact.colour:")


def test_a_misspelt_key_is_answered_with_the_key_meant() -> None:
    text = GOOD.replace("  files: [out.txt]", "  fles: [out.txt]")
    with pytest.raises(ConfigError) as err:
        parse_definition(text, "image.yml")
    assert str(err.value) == "image.yml:7: artifact.fles: unknown key; did you mean 'files'?"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("memory: 256", "memory: [1]"), "image.yml:5: variables.memory: expected text, a number"),
        (("artifact:", "render: [a.j2, b.txt]\nartifact:"), "image.yml:6: render[1]: template"),
        (("artifact:", "copy: [1]\nartifact:"), "image.yml:6: copy[0]: expected text, got 1"),
        (("description: test image\n", ""), "image.yml:1: description: required key is missing"),
        (("files: [out.txt]", "files: []"), "image.yml:6: artifact: needs files (a disk) or a vm"),
    ],
)
def test_a_wrong_value_names_its_entry_and_line(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_definition(GOOD.replace(*change), "image.yml")
    assert str(err.value).startswith(expected)


def test_the_definition_keeps_what_the_file_gives() -> None:
    text = GOOD.replace("  memory: 256", "  a: 1\n  b: 1.0\n  c: true\n  d: x")
    definition = parse_definition(text + "copy: [scripts]\nparent: {image: base}\n", "i.yml")
    assert definition.copy_files == ("scripts",)
    assert definition.variables == {"a": 1, "b": 1.0, "c": True, "d": "x"}
    assert [type(v) for v in definition.variables.values()] == [int, float, bool, str]
    assert definition.parent is not None and definition.parent.channel == "latest"
    assert definition.artifact.files == ("out.txt",)


def test_a_template_not_ending_in_j2_is_refused_with_its_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_definition(GOOD.replace("main.pkr.hcl.j2", "main.pkr.hcl"), "image.yml")
    assert "image.yml:3: template" in str(err.value)
    assert "must end in .j2" in str(err.value)


def test_broken_yaml_gives_its_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_definition("description: [unclosed\nbuilder: x\n", "image.yml")
    assert "image.yml:" in str(err.value)
    assert "malformed YAML" in str(err.value)


def test_unknown_image_lists_the_images_there_are(tmp_path: Path) -> None:
    packer_dir = _image(tmp_path, GOOD, "x")
    with pytest.raises(BadInputError, match=r"unknown image 'nope' .*images: demo"):
        load_image(packer_dir, "nope")


def test_a_misspelt_variable_names_the_template_and_line(tmp_path: Path) -> None:
    packer_dir = _image(tmp_path, GOOD, 'source "null" "x" {\n  memory = [= memroy =]\n}\n')
    image = load_image(packer_dir, "demo")
    with pytest.raises(BadInputError) as err:
        render_image(image, {"memory": 256}, tmp_path / "build")
    message = str(err.value)
    assert f"{packer_dir / 'demo' / 'main.pkr.hcl.j2'}:2:" in message
    assert "'memroy' is undefined" in message


def test_template_syntax_errors_name_the_line(tmp_path: Path) -> None:
    packer_dir = _image(tmp_path, GOOD, "a\nb\n[% if memory %]\nno end\n")
    image = load_image(packer_dir, "demo")
    with pytest.raises(BadInputError, match=r"main.pkr.hcl.j2:\d+: template syntax error"):
        render_image(image, {"memory": 1}, tmp_path / "build")


def test_packer_syntax_passes_through_rendering_untouched(tmp_path: Path) -> None:
    template = (
        'qemuargs = [["-m", "[= memory =]M"]]\n'
        'vm = "{{ .Name }}"\n'
        'x = "${var.image_version}"\n'
        "[# a comment that disappears #]\n"
    )
    packer_dir = _image(tmp_path, GOOD, template)
    build = tmp_path / "build"
    [rendered] = render_image(load_image(packer_dir, "demo"), {"memory": 512}, build)
    assert rendered.path == "main.pkr.hcl"
    assert (build / "main.pkr.hcl").read_text() == (
        'qemuargs = [["-m", "512M"]]\nvm = "{{ .Name }}"\nx = "${var.image_version}"\n\n'
    )


def test_the_shipped_images_are_valid() -> None:
    assert {"tiny", "win10", "win10-update"} <= set(list_images(REPO_PACKER))
    for name in ("tiny", "win10", "win10-update"):
        image = load_image(REPO_PACKER, name)
        assert image.definition.description
    assert load_image(REPO_PACKER, "win10-update").registers_as == "win10"


def _copying(tmp_path: Path, entry: str) -> Path:
    """An image whose image.yml copies `entry` (line 4); returns the packer folder."""
    yml = GOOD.replace(
        "template: main.pkr.hcl.j2\n", f"template: main.pkr.hcl.j2\ncopy: [{entry}]\n"
    )
    return _image(tmp_path, yml, "x\n")


def test_a_copy_entry_climbing_out_of_the_image_folder_is_refused_with_file_line_and_key(
    tmp_path: Path,
) -> None:
    (tmp_path / "packer" / "secret.txt").parent.mkdir(parents=True)
    (tmp_path / "packer" / "secret.txt").write_text("not part of the image\n")
    packer_dir = _copying(tmp_path, "../secret.txt")
    with pytest.raises(ConfigError) as err:
        load_image(packer_dir, "demo")
    assert str(err.value).startswith(f"{packer_dir / 'demo' / 'image.yml'}:4: copy[0]:")
    assert "outside the image folder" in str(err.value)


def test_a_copy_entry_through_a_symlink_out_of_the_image_folder_is_refused(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.pem").write_text("private\n")
    packer_dir = _copying(tmp_path, "scripts")
    (packer_dir / "demo" / "scripts").mkdir()
    (packer_dir / "demo" / "scripts" / "ok.sh").write_text("echo ok\n")
    (packer_dir / "demo" / "scripts" / "leak").symlink_to(outside / "key.pem")
    with pytest.raises(ConfigError) as err:
        load_image(packer_dir, "demo")
    assert str(err.value).startswith(f"{packer_dir / 'demo' / 'image.yml'}:4: copy[0]:")
    assert "scripts/leak" in str(err.value)


def test_rendering_a_copy_entry_that_leaves_the_image_folder_writes_nothing(
    tmp_path: Path,
) -> None:
    packer_dir = _copying(tmp_path, "files")
    (packer_dir / "demo" / "files").mkdir()
    image = load_image(packer_dir, "demo")
    (packer_dir / "demo" / "files").rmdir()  # swapped for a link after the check
    (packer_dir / "demo" / "files").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("x\n")
    build = tmp_path / "build"
    build.mkdir()
    with pytest.raises(ConfigError, match=r"copy\[0\]: .*outside the image folder"):
        render_image(image, {"memory": 1}, build)
    assert list(build.rglob("*")) == []


def test_a_template_outside_the_image_folder_is_refused_with_its_line(tmp_path: Path) -> None:
    packer_dir = _image(tmp_path, GOOD.replace("main.pkr.hcl.j2", "../main.pkr.hcl.j2"), "x\n")
    (packer_dir / "main.pkr.hcl.j2").write_text("x\n")
    with pytest.raises(ConfigError) as err:
        load_image(packer_dir, "demo")
    assert str(err.value).startswith(f"{packer_dir / 'demo' / 'image.yml'}:3: template:")
    assert "outside the image folder" in str(err.value)


def test_the_files_that_carry_a_secret_are_those_whose_templates_use_one(tmp_path: Path) -> None:
    yml = GOOD.replace(
        "template: main.pkr.hcl.j2\n",
        "template: main.pkr.hcl.j2\nrender: [answer.xml.j2, part.j2, plain.txt.j2]\n"
        "secrets: {password: X_PASSWORD}\n",
    )
    packer_dir = _image(tmp_path, yml, 'password = var.password\n[% include "part.j2" %]\n')
    folder = packer_dir / "demo"
    (folder / "answer.xml.j2").write_text("<P>[= password | e =]</P>\n")
    (folder / "part.j2").write_text("[= password =]\n")
    (folder / "plain.txt.j2").write_text("[= memory =]\n")
    image = load_image(packer_dir, "demo")
    assert secret_outputs(image) == ["main.pkr.hcl", "answer.xml", "part"]
