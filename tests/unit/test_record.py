"""imagepipe.record: a frozen record behaves as the frozen dataclass it replaces."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from dataclasses import field as dc_field

import pytest

from imagepipe import record
from imagepipe.record import Record, field


class Base(Record):
    pool: str
    clone: str = ""


class Create(Base):
    slot: int
    tags: list[str] = field(default_factory=list)


class Row(Record, kw_only=False):
    name: str
    size: int = 0


@dataclass(frozen=True, kw_only=True)
class DataBase:
    pool: str
    clone: str = ""


@dataclass(frozen=True, kw_only=True)
class DataCreate(DataBase):
    slot: int
    tags: list[str] = dc_field(default_factory=list)


def test_a_record_equals_hashes_and_shows_like_the_frozen_dataclass_it_replaces() -> None:
    ours, theirs = Create(pool="lab", slot=3), DataCreate(pool="lab", slot=3)
    assert repr(ours).removeprefix("Create") == repr(theirs).removeprefix("DataCreate")
    assert ours == Create(pool="lab", slot=3) and ours != Create(pool="lab", slot=4)
    assert ours != Base(pool="lab") and Base(pool="lab") != ours  # another class is not equal
    assert hash(Row("a", 1)) == hash(Row("a", 1)) == hash(("a", 1))
    assert {Row("a"), Row("a"), Row("b")} == {Row("a"), Row("b")}
    with pytest.raises(AttributeError, match="frozen"):
        ours.slot = 4  # type: ignore[misc]


def test_fields_come_from_the_bases_first_and_each_class_gets_its_own_constructor() -> None:
    assert [f.attr for f in record.fields(Create)] == ["pool", "clone", "slot", "tags"]
    assert Base(pool="x").clone == ""  # the base made first: its constructor fits it only
    made = Create(pool="x", clone="x-1", slot=1)
    assert (made.pool, made.clone, made.slot, made.tags) == ("x", "x-1", 1, [])
    assert Create(pool="x", slot=1).tags is not made.tags  # a fresh default each time


def test_keyword_only_unless_asked_and_a_required_field_may_not_follow_a_default() -> None:
    with pytest.raises(TypeError):
        Create("lab", "", 3)  # type: ignore[misc]
    assert Row("a", 2) == Row(name="a", size=2) and Row("a").size == 0
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'slot'"):
        Create(pool="lab")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="field late has no default but follows size"):

        class Wrong(Record, kw_only=False):
            size: int = 0
            late: str


def test_replace_changes_only_what_it_names_and_a_record_survives_pickling() -> None:
    made = Create(pool="lab", slot=1, tags=["a"])
    moved = record.replace(made, slot=2)
    assert (moved.slot, moved.pool, moved.tags, made.slot) == (2, "lab", ["a"], 1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        record.replace(made, nope=1)
    assert pickle.loads(pickle.dumps(made)) == made


def test_a_class_made_often_behaves_the_same_once_its_own_methods_are_written() -> None:
    class Often(Record):
        name: str
        seen: list[int] = field(default_factory=list)

    made = [Often(name=str(i % 3)) for i in range(3 * record.HOT)]
    assert [m == Often(name=m.name) for m in made] == [True] * len(made)
    assert all(m.seen == [] for m in made) and made[0].seen is not made[3].seen
    rows = [Row(str(i % 3)) for i in range(3 * record.HOT)]  # hashed often: its own hash
    assert {hash(r) for r in rows} == {hash((str(i), 0)) for i in range(3)}
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        Often(name="x", nope=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'name'"):
        Often()  # type: ignore[call-arg]
