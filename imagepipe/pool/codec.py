"""Actions as JSON, for the store's journal: `{"kind": "CreateClone", "pool": "lab", ...}`.

Every Action subclass in imagepipe.pool.actions round-trips: action_from_json(action_to_json(a))
== a. Nested values (Endpoint, CloneRecord) become objects, enums their values.
"""

from __future__ import annotations

import json
import types
from enum import Enum
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

from imagepipe.errors import OperationFailedError
from imagepipe.pool.actions import Action
from imagepipe.record import field_names


class CodecError(OperationFailedError):
    """A journal entry cannot be read back as an action (written by another version?)."""


@cache
def action_kinds() -> dict[str, type[Action]]:
    """Every concrete Action subclass by class name."""
    found: dict[str, type[Action]] = {}
    pending: list[type[Action]] = [Action]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls is not Action:
            found[cls.__name__] = cls
    return found


def action_to_json(action: Action) -> str:
    """The action as one line of JSON with a "kind" key."""
    doc = {"kind": action.kind, **_encode(action)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def action_from_json(text: str) -> Action:
    """The action written by action_to_json. Raises CodecError for anything else."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CodecError(f"journal entry is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise CodecError(f"journal entry has no action kind: {text[:80]!r}")
    kind = doc.pop("kind")
    cls = action_kinds().get(kind)
    if cls is None:
        raise CodecError(f"unknown action kind {kind!r} in the journal")
    try:
        value = _decode(cls, doc)
    except (TypeError, ValueError, KeyError) as exc:
        raise CodecError(f"journal entry of kind {kind} cannot be read: {exc}") from exc
    assert isinstance(value, Action)
    return value


def _encode(value: Any) -> Any:
    names = None if isinstance(value, type) else field_names(value)
    if names is not None:
        return {name: _encode(getattr(value, name)) for name in names}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    # each class's field types by the names of its own module (actions.py, model.py)
    return get_type_hints(cls)


def _decode(hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _decode(inner, value)
    known = field_names(hint) if isinstance(hint, type) else None
    if known is not None:
        if not isinstance(value, dict):
            raise ValueError(f"expected an object for {hint.__name__}, got {value!r}")
        hints = _hints(hint)
        unknown = set(value) - set(known)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} for {hint.__name__}")
        return hint(**{name: _decode(hints[name], v) for name, v in value.items()})
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"expected {getattr(hint, '__name__', hint)}, got {value!r}")
