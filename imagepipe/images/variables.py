"""Image variables: defaults from image.yml, then --var-file files, then --var K=V.

Values keep the type of their default (`--var memory=512` is the number 512). Unknown names
are errors. Secrets never come from here: they are read from the environment variable named in
image.yml, so they appear in no argv, no log and no registry record.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from imagepipe.errors import BadInputError, ConfigError
from imagepipe.images.definition import Image
from imagepipe.images.records import ScalarValue
from imagepipe.names import shown
from imagepipe.yamlsrc import load_file

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INT = re.compile(r"[-+]?[0-9]{1,18}")
_FLOAT = re.compile(r"[-+]?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})(?:[eE][-+]?[0-9]{1,3})?")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")

SECRET_PLACEHOLDER = "<secret:{name}>"


MAX_VALUE = 4096  # characters of one variable's value


def parse_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """`["memory=512", "headless=true"]` → a mapping; BadInputError on `memory` alone."""
    result: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise BadInputError(f"--var {shown(pair)}: expected NAME=VALUE, e.g. --var memory=512")
        if not _NAME.fullmatch(name):
            raise BadInputError(
                f"--var {shown(name)}: a variable name is a letter or _ then letters, digits, _"
            )
        result[name] = value
    return result


def resolve_variables(
    image: Image, overrides: Mapping[str, str], var_files: Sequence[Path]
) -> dict[str, ScalarValue]:
    defaults = image.definition.variables
    values: dict[str, ScalarValue] = dict(defaults)
    for path in var_files:
        values.update(_checked(image, _read_var_file(path), str(path)))
    values.update(_checked(image, dict(overrides), "--var"))
    return values


def resolve_secrets(image: Image, *, placeholders: bool) -> dict[str, str]:
    """Secret values from the environment; with `placeholders`, stand-ins (dry runs, CI)."""
    secrets: dict[str, str] = {}
    for name, env_name in image.definition.secrets.items():
        value = os.environ.get(env_name)
        if value is None and not placeholders:
            raise BadInputError(
                f"image {image.name} needs the secret {name}: set the environment variable "
                f"{env_name} (it is never taken from the command line)"
            )
        secrets[name] = value if value is not None else SECRET_PLACEHOLDER.format(name=name)
    return secrets


def _read_var_file(path: Path) -> dict[str, object]:
    """A YAML (or JSON) mapping of NAME: VALUE, read with the configuration reader's limits."""
    doc = load_file(path)  # ConfigError names the file and line
    if not isinstance(doc.data, dict):
        raise ConfigError("expected a mapping of NAME: VALUE", file=str(path))
    for name, value in doc.data.items():
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(
                "expected a single value (text, number, true or false)",
                file=str(path),
                line=doc.line_of((name,)),
                key=name,
            )
    return dict(doc.data)


def _checked(image: Image, given: Mapping[str, object], source: str) -> dict[str, ScalarValue]:
    defaults = image.definition.variables
    result: dict[str, ScalarValue] = {}
    for name, value in given.items():
        if name in image.definition.secrets:
            env_name = image.definition.secrets[name]
            raise BadInputError(
                f"{source}: {name} is a secret of {image.name}: set it in the environment "
                f"variable {env_name}, never on the command line or in a file"
            )
        if name not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise BadInputError(f"{source}: {image.name} has no variable {name!r} (known: {known})")
        result[name] = _coerce(name, value, defaults[name], source)
    return result


def _coerce(name: str, value: object, default: ScalarValue, source: str) -> ScalarValue:
    text = str(value).strip()
    if len(text) > MAX_VALUE:
        raise BadInputError(f"{source}: {name}: at most {MAX_VALUE} characters, got {len(text)}")
    bad = _CONTROL.search(text)
    if bad is not None:
        raise BadInputError(
            f"{source}: {name}: control character U+{ord(bad.group()):04X} is not allowed"
        )
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if text.lower() in ("true", "yes", "1", "on"):
                return True
            if text.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if not _INT.fullmatch(text):  # ASCII digits only, and no 5000-digit numbers
                raise ValueError
            return int(text)
        if isinstance(default, float):
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if not _FLOAT.fullmatch(text):  # no inf, nan or other scripts' digits
                raise ValueError
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            return number
    except ValueError:
        kind = type(default).__name__
        raise BadInputError(f"{source}: {name}={value!r}: expected a {kind}") from None
    return text
