"""Image variables: defaults from image.yml, then --var-file files, then --var K=V.

Values keep the type of their default (`--var memory=512` is the number 512). Unknown names
are errors. Secrets never come from here: they are read from the environment variable named in
image.yml, so they appear in no argv, no log and no registry record.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from imagepipe.errors import BadInputError
from imagepipe.images.definition import Image
from imagepipe.images.records import ScalarValue

SECRET_PLACEHOLDER = "<secret:{name}>"


def parse_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """`["memory=512", "headless=true"]` → a mapping; BadInputError on `memory` alone."""
    result: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise BadInputError(f"--var {pair!r}: expected NAME=VALUE, e.g. --var memory=512")
        result[name.strip()] = value
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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"--var-file {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BadInputError(f"--var-file {path}: not valid YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"--var-file {path}: expected a mapping of NAME: VALUE")
    return {str(k): v for k, v in data.items()}


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
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = type(default).__name__
        raise BadInputError(f"{source}: {name}={value!r}: expected a {kind}") from None
    return text
