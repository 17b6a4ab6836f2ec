"""Frozen records read from YAML and JSON mappings, each problem named by its key path.

A section is a class of typed fields; a field read from a file says how its key is read:

    class KeeperSettings(Section):
        tick: float = key(bounded(parse_duration, gt=0), default=5.0)
        parallel: int = key(whole(ge=1), default=4)
        source: str = "defaults"          # no key(): set by the program, never by a file

`read(KeeperSettings, raw)` returns the frozen value, or raises Invalid with every problem
of the mapping (and of the mappings below it): a missing required key, a key the section does
not have (with the nearest valid key), a value its reader refused. A reader is a function of
one value that returns the value to keep or raises ValueError saying what was expected.

A section is an imagepipe.record.Record (a frozen dataclass made at first use) whose key()
fields are its keys. Why not pydantic: loading it and building a model's validator cost every
command more than all of imagepipe's own start-up (docs/benchmarks.md, bench_startup.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any, ClassVar, TypeVar, dataclass_transform

from imagepipe.names import shown
from imagepipe.record import MISSING, Field, Record, field, field_names
from imagepipe.record import replace as replace  # sections are records: the same replace

KeyPath = tuple[str | int, ...]
Reader = Callable[[Any], Any]
S = TypeVar("S", bound="Section")


class Invalid(ValueError):
    """What is wrong with a value: (key path below the value, message), one per problem."""

    def __init__(self, problems: list[tuple[KeyPath, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


class Key(Field):
    """A field read from a file: from which key of the mapping, read how."""

    __slots__ = ("name", "read")

    def __init__(
        self, read: Reader | None, default: Any, factory: Callable[[], Any] | None, name: str
    ) -> None:
        super().__init__(default, factory)
        self.read = read  # None: not read from a file (the program sets it)
        self.name = name  # the key in the file; the field's name unless given

    @property
    def section(self) -> type[Section] | None:
        """The section this key holds itself (not inside an optional value or a list)."""
        return self.read.section if isinstance(self.read, _Holds) and self.read.direct else None

    @property
    def holds(self) -> type[Section] | None:
        """The section this key holds, itself, as an optional value or in a list."""
        return self.read.section if isinstance(self.read, _Holds) else None


def key(
    read: Reader | None = None,
    *,
    default: Any = MISSING,
    default_factory: Callable[[], Any] | None = None,
    name: str = "",
) -> Any:
    """A field read from the key of its name (or `name`, where that is a Python word such
    as `from`) with `read`; without a default the key is required."""
    return Key(read, default, default_factory, name)


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(key, field))
class Section(Record):
    """A record read from a file's mapping; fields declared with key() are its keys."""

    _by_name: ClassVar[dict[str, Key]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        keyed = [f for f in cls._fields if isinstance(f, Key) and f.read is not None]
        for f in keyed:
            f.name = f.name or f.attr
        cls._by_name = {f.name: f for f in keyed}


def fields(cls: type[Section]) -> tuple[Key, ...]:
    """The fields a file may give, in the order they are declared (Key.name is the key)."""
    return tuple(cls._by_name.values())


def keys(cls: type[Section]) -> tuple[str, ...]:
    """The keys a file may give for this section, in the order they are declared."""
    return tuple(cls._by_name)


def read(cls: type[S], raw: object) -> S:
    """`raw` (a mapping parsed from a file) as a `cls`, or Invalid naming every problem."""
    if not isinstance(raw, dict):
        raise Invalid([((), f"expected a mapping of keys, got {show(raw)}")])
    problems: list[tuple[KeyPath, str]] = []
    values: dict[str, Any] = {}
    for name, found in cls._by_name.items():
        if name not in raw:
            if found.required:
                problems.append(((name,), "required key is missing"))
            continue
        assert found.read is not None
        try:
            values[found.attr] = found.read(raw[name])
        except Invalid as exc:
            problems += [((name, *path), message) for path, message in exc.problems]
        except ValueError as exc:
            problems.append(((name,), str(exc)))
    for name in raw:
        if name not in cls._by_name:
            problems.append(((name,), unknown_key(str(name), keys(cls))))
    if problems:
        raise Invalid(problems)
    return cls(**values)


def unknown_key(name: str, valid: tuple[str, ...]) -> str:
    import difflib  # only for a refused key

    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "valid keys here: " + ", ".join(valid)
    return f"unknown key; {hint}"


def dump(value: Any, *, by_key: bool = False) -> Any:
    """A section as JSON values: mappings, lists, text, numbers, true/false and null; the
    keys are the field names (or, `by_key`, the keys the file uses)."""
    names = None if isinstance(value, type) else field_names(value)
    if names is not None:
        keyed = (
            {f.attr: f.name for f in fields(type(value))}
            if by_key and isinstance(value, Section)
            else {}
        )
        return {keyed.get(n, n): dump(getattr(value, n), by_key=by_key) for n in names}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple | frozenset | set):
        return [dump(item, by_key=by_key) for item in value]
    if isinstance(value, Mapping):
        return {k: dump(v, by_key=by_key) for k, v in value.items()}
    return value


# Readers. Each takes one value from a parsed file and returns what to keep, or raises
# ValueError (Invalid for several problems below it).


def show(value: object) -> str:
    """A value in a message: its kind for mappings, lists and null; else cut to one line."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return shown(value)
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"


def text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected text, got {show(value)}")


def flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {show(value)}")


def _whole(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a whole number, got {show(value)}")


def scalar(value: object) -> str | int | float | bool:
    if isinstance(value, str | int | float):  # bool is an int
        return value
    raise ValueError(f"expected text, a number, or true or false, got {show(value)}")


def whole(*, ge: int | None = None, gt: int | None = None, le: int | None = None) -> Reader:
    """A whole number (not true or false, not 1.0, not "1"), within the bounds given."""
    return bounded(_whole, ge=ge, gt=gt, le=le)


def bounded(
    reader: Reader,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Reader:
    """`reader`'s value, which must lie within the bounds (checked after reading)."""

    def read_bounded(value: object) -> Any:
        found = reader(value)
        if ge is not None and not found >= ge:
            raise ValueError(f"must be at least {ge}, got {show(found)}")
        if gt is not None and not found > gt:
            raise ValueError(f"must be more than {gt}, got {show(found)}")
        if le is not None and not found <= le:
            raise ValueError(f"must be at most {le}, got {show(found)}")
        return found

    return read_bounded


def _either(values: tuple[Any, ...]) -> str:
    shown_values = [repr(v) for v in values]
    if len(shown_values) == 1:
        return shown_values[0]
    return f"{', '.join(shown_values[:-1])} or {shown_values[-1]}"


def choice(*allowed: str) -> Reader:
    """One of the words given."""
    expected = _either(allowed)

    def read_choice(value: object) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        raise ValueError(f"expected {expected}, got {show(value)}")

    return read_choice


E = TypeVar("E", bound=Enum)


def member(enum: type[E]) -> Callable[[object], E]:
    """A member of `enum`, given by its value."""
    by_value = {m.value: m for m in enum}
    expected = _either(tuple(by_value))

    def read_member(value: object) -> E:
        if isinstance(value, enum):
            return value
        if isinstance(value, str) and value in by_value:
            return by_value[value]
        raise ValueError(f"expected {expected}, got {show(value)}")

    return read_member


class _Holds:
    """A reader of a section: itself (direct), or inside an optional value or a list; it
    lets documentation and checks walk the keys below a key."""

    __slots__ = ("direct", "reader", "section")

    def __init__(self, reader: Reader, section: type[Section], *, direct: bool) -> None:
        self.reader = reader
        self.section = section
        self.direct = direct

    def __call__(self, value: object) -> Any:
        return self.reader(value)


def _around(inner: Reader, reader: Reader) -> Reader:
    """`reader`, which wraps `inner`, keeps saying which section `inner` holds."""
    if isinstance(inner, _Holds):
        return _Holds(reader, inner.section, direct=False)
    return reader


def optional(reader: Reader) -> Reader:
    """Nothing (null), else what `reader` reads."""

    def read_optional(value: object) -> Any:
        return None if value is None else reader(value)

    return _around(reader, read_optional)


def _items(reader: Reader, value: object) -> Iterator[Any]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list, got {show(value)}")
    problems: list[tuple[KeyPath, str]] = []
    found = []
    for index, item in enumerate(value):
        try:
            found.append(reader(item))
        except Invalid as exc:
            problems += [((index, *path), message) for path, message in exc.problems]
        except ValueError as exc:
            problems.append(((index,), str(exc)))
    if problems:
        raise Invalid(problems)
    return iter(found)


def list_of(reader: Reader) -> Reader:
    def read_list(value: object) -> list[Any]:
        return list(_items(reader, value))

    return _around(reader, read_list)


def tuple_of(reader: Reader) -> Reader:
    def read_tuple(value: object) -> tuple[Any, ...]:
        return tuple(_items(reader, value))

    return _around(reader, read_tuple)


def mapping_of(reader: Reader) -> Callable[[object], dict[str, Any]]:
    """A mapping of text keys to what `reader` reads."""

    def read_mapping(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of keys, got {show(value)}")
        problems: list[tuple[KeyPath, str]] = []
        found = {}
        for name, item in value.items():
            try:
                found[text(name)] = reader(item)
            except Invalid as exc:
                problems += [((name, *path), message) for path, message in exc.problems]
            except ValueError as exc:
                problems.append(((name,), str(exc)))
        if problems:
            raise Invalid(problems)
        return found

    return read_mapping


def section(cls: type[S]) -> Reader:
    """A mapping read as `cls`."""

    def read_section(value: object) -> S:
        return read(cls, value)

    return _Holds(read_section, cls, direct=True)
