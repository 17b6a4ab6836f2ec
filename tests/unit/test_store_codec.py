"""Actions survive the journal: every kind round-trips through JSON unchanged."""

from __future__ import annotations

import dataclasses
import json
import types
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagepipe import record
from imagepipe.pool.actions import Action, CreateClone, RecordClone
from imagepipe.pool.codec import CodecError, action_from_json, action_kinds, action_to_json
from imagepipe.pool.model import CloneRecord, CloneState, Endpoint

finite = st.floats(allow_nan=False, allow_infinity=False)


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """A strategy for any field type used by actions; fails loudly on a new kind of field."""
    if get_origin(hint) in (Union, types.UnionType):
        return st.one_of(*(strategy_for(option) for option in get_args(hint)))
    if hint is type(None):
        return st.none()
    if isinstance(hint, type) and issubclass(hint, Enum):
        return st.sampled_from(list(hint))
    if isinstance(hint, type) and record.is_record(hint):
        hints = get_type_hints(hint)
        fields = {f.attr: strategy_for(hints[f.attr]) for f in record.fields(hint)}
        return st.builds(hint, **fields)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = get_type_hints(hint)
        fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(hint)}
        return st.builds(hint, **fields)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        int: st.integers(min_value=-(2**53), max_value=2**53),
        float: finite,
        str: st.text(),
        bool: st.booleans(),
    }
    if hint in simple:
        return simple[hint]
    raise AssertionError(f"no strategy for action field type {hint!r}: extend the codec test")


any_action = st.sampled_from(sorted(action_kinds().values(), key=lambda c: c.__name__)).flatmap(
    strategy_for
)


def test_every_action_kind_is_known_to_the_codec() -> None:
    kinds = set(action_kinds())
    assert {"CreateClone", "StartClone", "StopClone", "ResetClone", "SuspendClone"} <= kinds
    assert {"ResumeClone", "DeleteClone", "BalancerEnable", "BalancerDrain"} <= kinds
    assert {"BalancerRemove", "RecordClone", "ForgetClone", "RecordPool"} <= kinds
    assert "Action" not in kinds


@given(any_action)
def test_every_action_reads_back_equal_to_what_was_written(action: Action) -> None:
    text = action_to_json(action)
    assert "\n" not in text
    assert action_from_json(text) == action


def test_nested_values_are_written_as_plain_json() -> None:
    record = CloneRecord(name="lab-1", slot=1, version=3, state=CloneState.IN_USE, since=5.0)
    doc = json.loads(action_to_json(RecordClone(pool="lab", clone="lab-1", record=record)))
    assert doc["kind"] == "RecordClone"
    assert doc["record"]["state"] == "in_use"
    create = CreateClone(pool="lab", clone="lab-1", slot=1, version=3, display=Endpoint("h", 1))
    assert json.loads(action_to_json(create))["display"] == {"host": "h", "port": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1]", "no action kind"),
        ('{"kind": "LaunchMissiles", "pool": "lab"}', "unknown action kind 'LaunchMissiles'"),
        ('{"kind": "StartClone", "pool": "lab", "colour": "red"}', "unknown fields"),
        ('{"kind": "StartClone", "pool": 3}', "expected str"),
        ('{"kind": "StopClone", "pool": "lab", "graceful_timeout": "soon"}', "expected float"),
    ],
)
def test_an_unreadable_journal_entry_raises_a_codec_error(text: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        action_from_json(text)
