"""Render an image's Jinja2 templates into a build directory.

Delimiters are chosen not to clash with Packer's `{{ .Name }}`, HCL's `${var.x}` or nested
lists `[["-m", "256"]]`:  `[= variable =]`, `[% if x %]…[% endif %]`, `[# comment #]`.
Undefined variables are errors naming the template file and line (StrictUndefined).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
import jinja2.meta

from imagepipe.errors import BadInputError
from imagepipe.images.definition import Image, copy_sources


@dataclass(frozen=True)
class RenderedFile:
    """A file placed in the build directory: its relative path and content checksum."""

    path: str
    sha256: str


def make_environment(folder: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        variable_start_string="[=",
        variable_end_string="=]",
        block_start_string="[%",
        block_end_string="%]",
        comment_start_string="[#",
        comment_end_string="#]",
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_text(image: Image, template: str, context: Mapping[str, Any]) -> str:
    """One template of `image`, rendered. BadInputError names file:line on any mistake."""
    env = make_environment(image.folder)
    path = image.folder / template
    try:
        return env.get_template(template).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        line = _template_line(sys.exc_info()[2], path)
        where = f"{path}:{line}" if line else str(path)
        known = ", ".join(sorted(context)) or "none"
        raise BadInputError(f"{where}: {exc.message} (variables: {known})") from None


def render_string(text: str, context: Mapping[str, Any], source: str) -> str:
    """A short string from image.yml (e.g. artifact.vm), rendered with the same rules."""
    env = make_environment(Path("."))
    try:
        return env.from_string(text).render(**context)
    except jinja2.TemplateError as exc:
        raise BadInputError(f"{source}: cannot render {text!r}: {exc}") from None


def render_image(image: Image, context: Mapping[str, Any], build_dir: Path) -> list[RenderedFile]:
    """Render every template and copy every plain file of `image` into `build_dir`."""
    copies = copy_sources(image)  # refused before anything is written
    files: list[RenderedFile] = []
    for template in image.definition.templates:
        text = render_text(image, template, context)
        target = build_dir / image.definition.output_name(template)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only from the start: a rendered file may hold a secret (Autounattend.xml).
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
        files.append(RenderedFile(target.relative_to(build_dir).as_posix(), _sha(text.encode())))
    for copied in copies:
        target = build_dir / copied.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(copied.source, target)
        files.append(RenderedFile(copied.relative.as_posix(), _sha(copied.source.read_bytes())))
    return sorted(files, key=lambda f: f.path)


def secret_outputs(image: Image) -> list[str]:
    """The rendered files (relative to the build directory) that carry a secret: those whose
    template uses one of the image's `secrets:` names, itself or through a template it
    includes, imports or extends. A build removes them whatever way it ends."""
    secret_names = set(image.definition.secrets)
    if not secret_names:
        return []
    env = make_environment(image.folder)
    return [
        image.definition.output_name(t)
        for t in image.definition.templates
        if _uses_any(env, t, secret_names, set())
    ]


def _uses_any(env: jinja2.Environment, template: str, wanted: set[str], seen: set[str]) -> bool:
    if template in seen:
        return False
    seen.add(template)
    assert env.loader is not None
    try:
        source, _, _ = env.loader.get_source(env, template)
        tree = env.parse(source)
    except jinja2.TemplateError:
        return True  # cannot tell: treat as carrying a secret
    if jinja2.meta.find_undeclared_variables(tree) & wanted:
        return True
    return any(
        name is None or _uses_any(env, name, wanted, seen)
        for name in jinja2.meta.find_referenced_templates(tree)
    )


def rendered_digests(image: Image, context: Mapping[str, Any]) -> list[RenderedFile]:
    """Checksums of the rendered templates without writing anything (for fingerprints)."""
    return [
        RenderedFile(image.definition.output_name(t), _sha(render_text(image, t, context).encode()))
        for t in image.definition.templates
    ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _template_line(tb: TracebackType | None, path: Path) -> int | None:
    """Jinja2 rewrites tracebacks so template frames carry the template's file and line."""
    line = None
    wanted = os.path.realpath(path)
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename == str(path) or os.path.realpath(filename) == wanted:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
