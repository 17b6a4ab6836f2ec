"""imagepipe.schema: sections read from parsed files, every problem named by its key path."""

from __future__ import annotations

from enum import StrEnum

import pytest

from imagepipe import schema
from imagepipe.schema import Invalid, Section, key


class Mode(StrEnum):
    FAST = "fast"
    SAFE = "safe"


class Inner(Section):
    port: int = key(schema.whole(ge=1, le=65535), default=80)
    mode: Mode = key(schema.member(Mode), default=Mode.SAFE)


class Outer(Section):
    name: str = key(schema.text)
    start: int = key(schema.whole(), name="from", default=0)
    inner: Inner = key(schema.section(Inner), default=Inner())
    tags: tuple[str, ...] = key(schema.tuple_of(schema.text), default=())
    kind: str = key(schema.choice("a", "b", "c"), default="a")
    source: str = "defaults"


def problems(raw: object) -> list[tuple[schema.KeyPath, str]]:
    with pytest.raises(Invalid) as caught:
        schema.read(Outer, raw)
    return caught.value.problems


def test_a_good_mapping_becomes_a_frozen_value_with_defaults_filled_in() -> None:
    outer = schema.read(Outer, {"name": "lab", "from": 3, "inner": {"mode": "fast"}})
    assert outer == Outer(name="lab", start=3, inner=Inner(mode=Mode.FAST))
    assert outer.inner.port == 80 and outer.source == "defaults"
    with pytest.raises(AttributeError, match="frozen"):
        outer.name = "other"  # type: ignore[misc]
    assert hash(outer) == hash(Outer(name="lab", start=3, inner=Inner(mode=Mode.FAST)))
    assert repr(Inner()) == "Inner(port=80, mode=<Mode.SAFE: 'safe'>)"


def test_every_problem_is_named_by_its_key_path_not_only_the_first() -> None:
    found = problems({"from": True, "inner": {"port": 0, "mode": "slow"}, "tags": ["x", 5]})
    assert sorted(found, key=str) == sorted(
        [
            (("name",), "required key is missing"),
            (("from",), "expected a whole number, got True"),
            (("inner", "port"), "must be at least 1, got 0"),
            (("inner", "mode"), "expected 'fast' or 'safe', got 'slow'"),
            (("tags", 1), "expected text, got 5"),
        ],
        key=str,
    )


def test_an_unknown_key_is_refused_with_the_nearest_valid_one() -> None:
    assert problems({"name": "lab", "nmae": 1}) == [
        (("nmae",), "unknown key; did you mean 'name'?")
    ]
    # a field the program sets is not a key of the file
    assert problems({"name": "lab", "source": "x"}) == [
        (("source",), "unknown key; valid keys here: name, from, inner, tags, kind")
    ]


def test_choices_and_kinds_say_what_was_expected() -> None:
    assert problems({"name": "lab", "kind": "d"}) == [
        (("kind",), "expected 'a', 'b' or 'c', got 'd'")
    ]
    assert problems({"name": ["x"], "inner": "fast"}) == [
        (("name",), "expected text, got a list"),
        (("inner",), "expected a mapping of keys, got 'fast'"),
    ]
    with pytest.raises(Invalid, match="expected a mapping of keys, got nothing"):
        schema.read(Outer, None)


def test_replace_and_dump_keep_the_fields_and_the_files_key_names() -> None:
    outer = Outer(name="lab", start=2, tags=("x",))
    moved = schema.replace(outer, start=5)
    assert (moved.start, moved.name, outer.start) == (5, "lab", 2)
    assert schema.dump(moved, by_key=True) == {
        "name": "lab",
        "from": 5,
        "inner": {"port": 80, "mode": "safe"},
        "tags": ["x"],
        "kind": "a",
        "source": "defaults",
    }
    assert "start" in schema.dump(moved)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nmae'"):
        Outer(name="lab", nmae=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'name'"):
        Outer()  # type: ignore[call-arg]
