"""Frozen records that cost nothing to define: what a frozen dataclass is, made at first use.

On Python 3.11 `@dataclass(frozen=True)` compiles six methods for its class when the module
is imported: about 4.5 M instructions a class, and `imagepipe status` imported some eighty of
them (3.8x a bare Python start, more than typer and yaml). A Record's class is made without
compiling anything: its first instances are made (and compared, and hashed) by general code,
and once a class is used often (HOT times) its own constructor, equality and hash are written,
which then run as fast as a dataclass's. A class never used, or used a few times, costs nothing
to compile.

    class CloneInfo(Record):                # keyword-only: @dataclass(frozen=True, kw_only=True)
        name: str
        slot: int = 0
        seen: dict[str, float] = field(default_factory=dict)

    class Row(Record, kw_only=False):       # also in order: @dataclass(frozen=True)

Fields are the annotated names of the class and its bases (not those starting with "_", not
ClassVars). `replace(record, **changes)` is dataclasses.replace; `fields(cls)` the fields;
`dataclass_transform` tells type checkers all of it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform

T = TypeVar("T")

MISSING: Any = object()


class Field:
    """One field of a record: its name, and its default or the function that makes one."""

    __slots__ = ("attr", "default", "factory")

    def __init__(self, default: Any = MISSING, factory: Callable[[], Any] | None = None) -> None:
        self.attr = ""  # set when the class is made
        self.default = default
        self.factory = factory

    @property
    def required(self) -> bool:
        return self.default is MISSING and self.factory is None


def field(*, default: Any = MISSING, default_factory: Callable[[], Any] | None = None) -> Any:
    """A field's default made by `default_factory` for each record (a list, a dict), or given."""
    return Field(default, default_factory)


HOT = 16  # instances (or comparisons) after which a class's own method is written


def _first_init(self: Record, *args: Any, **values: Any) -> None:
    """Each class's constructor until it is hot: a general one, then the written one (or
    the written one at once for a call the general one does not take, so that the error is
    Python's own)."""
    cls = type(self)
    made = cls.__dict__.get("_made", 0)
    if made < HOT and not args and _fill(self, cls, values):
        type.__setattr__(cls, "_made", made + 1)
        return
    cls.__init__ = _write_init(cls)  # type: ignore[method-assign]
    cls.__init__(self, *args, **values)


def _fill(self: Record, cls: type[Record], values: dict[str, Any]) -> bool:
    """Set every field from `values` or its default; False (nothing set) when a value is
    missing or one is left over."""
    filled = []
    for f in cls._fields:
        value = values.get(f.attr, MISSING)
        if value is MISSING:
            if f.required:
                return False
            value = f.factory() if f.factory is not None else f.default
        filled.append((f.attr, value))
    if any(name not in cls._attrs for name in values):
        return False
    for attr, value in filled:
        object.__setattr__(self, attr, value)
    return True


def _first_eq(self: Record, other: object) -> Any:
    cls = type(self)
    asked = cls.__dict__.get("_compared", 0)
    if asked < HOT:
        type.__setattr__(cls, "_compared", asked + 1)
        if other.__class__ is not cls:
            return NotImplemented
        return cls._values(self) == cls._values(other)
    cls.__eq__ = _write_eq(cls)  # type: ignore[method-assign,assignment]
    return cls.__eq__(self, other)


def _first_hash(self: Record) -> int:
    cls = type(self)
    asked = cls.__dict__.get("_hashed", 0)
    if asked < HOT:
        type.__setattr__(cls, "_hashed", asked + 1)
        return hash(cls._values(self))
    cls.__hash__ = _write_hash(cls)  # type: ignore[method-assign,assignment]
    return cls.__hash__(self)


def _compiled(name: str, source: str, names: dict[str, Any]) -> Any:
    scope: dict[str, Any] = {}
    exec(compile(source, f"<record {name}>", "exec"), names, scope)
    return scope[name]


def _write_init(cls: type[Record]) -> Callable[..., None]:
    names: dict[str, Any] = {"_set": object.__setattr__, "_MISSING": MISSING}
    params, lines = [], []
    for index, f in enumerate(cls._fields):
        if f.factory is not None:
            names[f"_make{index}"] = f.factory
            params.append(f"{f.attr}=_MISSING")
            value = f"_make{index}() if {f.attr} is _MISSING else {f.attr}"
        elif f.default is not MISSING:
            names[f"_default{index}"] = f.default
            params.append(f"{f.attr}=_default{index}")
            value = f.attr
        else:
            params.append(f.attr)
            value = f.attr
        lines.append(f"    _set(self, {f.attr!r}, {value})")
    star = [] if cls._positional else ["*"]
    signature = ", ".join(["self", *(star if params else []), *params])
    body = "\n".join(lines) or "    pass"
    init: Callable[..., None] = _compiled(
        "__init__", f"def __init__({signature}):\n{body}\n", names
    )
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _values_source(fields: tuple[Field, ...], who: str) -> str:
    return "(" + "".join(f"{who}.{f.attr}, " for f in fields) + ")"


def _write_eq(cls: type[Record]) -> Callable[[Record, object], bool]:
    source = (
        "def __eq__(self, other):\n"
        "    if other.__class__ is not self.__class__:\n"
        "        return NotImplemented\n"
        f"    return {_values_source(cls._fields, 'self')} == "
        f"{_values_source(cls._fields, 'other')}\n"
    )
    eq: Callable[[Record, object], bool] = _compiled("__eq__", source, {})
    return eq


def _write_hash(cls: type[Record]) -> Callable[[Record], int]:
    source = f"def __hash__(self):\n    return hash({_values_source(cls._fields, 'self')})\n"
    hash_: Callable[[Record], int] = _compiled("__hash__", source, {})
    return hash_


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(field,))
class Record:
    """A frozen record; subclasses declare its fields as annotated class attributes."""

    _fields: ClassVar[tuple[Field, ...]] = ()
    _attrs: ClassVar[frozenset[str]] = frozenset()
    _positional: ClassVar[bool] = False

    def __init_subclass__(cls, *, kw_only: bool = True, **kwargs: Any) -> None:
        """`kw_only=False`: the constructor also takes the fields in order, as a dataclass's."""
        super().__init_subclass__(**kwargs)
        cls._positional = not kw_only
        fields = {f.attr: f for f in cls._fields}
        for attr, annotation in inspect.get_annotations(cls).items():
            if attr.startswith("_") or str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue  # constants and the class's own bookkeeping
            value = cls.__dict__.get(attr, MISSING)
            found = value if isinstance(value, Field) else Field(value)
            if attr in cls.__dict__:
                delattr(cls, attr)
            found.attr = attr
            fields[attr] = found
        cls._fields = tuple(fields.values())
        cls._attrs = frozenset(fields)
        if cls._positional:
            _check_order(cls)
        match_args = tuple(f.attr for f in cls._fields) if cls._positional else ()
        setattr(cls, "__match_args__", match_args)  # noqa: B010
        # each class gets its own methods, written at first use (a base's would not fit)
        cls.__init__ = _first_init  # type: ignore[method-assign,assignment]
        cls.__eq__ = _first_eq  # type: ignore[method-assign,assignment]
        cls.__hash__ = _first_hash  # type: ignore[method-assign,assignment]

    @classmethod
    def _values(cls, record: object) -> tuple[Any, ...]:
        return tuple(getattr(record, f.attr) for f in cls._fields)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.attr}={getattr(self, f.attr)!r}" for f in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name}")


def _check_order(cls: type[Record]) -> None:
    """Fields taken in order: a required one may not follow one with a default."""
    defaulted = ""
    for f in cls._fields:
        if not f.required:
            defaulted = defaulted or f.attr
        elif defaulted:
            raise TypeError(
                f"{cls.__name__}: field {f.attr} has no default but follows {defaulted}, which "
                "has one; give it a default or make the class keyword-only"
            )


def replace(record: T, **changes: Any) -> T:
    """A copy of `record` with some fields changed: dataclasses.replace, for records and
    dataclasses alike."""
    if not isinstance(record, Record):
        return dataclasses.replace(record, **changes)  # type: ignore[type-var]
    for f in record._fields:
        if f.attr not in changes:
            changes[f.attr] = getattr(record, f.attr)
    return type(record)(**changes)


def fields(cls: type[Record] | Record) -> tuple[Field, ...]:
    """The fields of a record class (or of a record's class), in their order."""
    return cls._fields


def is_record(value: object) -> bool:
    """A record or a record class."""
    return isinstance(value, Record) or (isinstance(value, type) and issubclass(value, Record))


def field_names(value: object) -> tuple[str, ...] | None:
    """The field names of a record or a dataclass (or of its class); None for anything else."""
    if is_record(value):
        return tuple(f.attr for f in value._fields)  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(value):
        return tuple(f.name for f in dataclasses.fields(value))
    return None
