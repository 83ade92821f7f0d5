"""``Packed(Struct(...))``: a fixed-size Struct parsed and built with one ``struct.Struct`` call;
``PackedArray(count, Packed(...))``: a count-prefixed array of them, parsed in one pass.

Same bytes and same values as the Struct (or PrefixedArray) they stand for; the declaration stays
the single source. construct walks a Struct field by field, at about 2 us a field: a vCPU's ~1100
fields cost over 2 ms, and its ~300 CPUID and MSR entries as many again through PrefixedArray.
Supported fields: integers, fixed-length Bytes, nested fixed-size Structs, and fixed-count Arrays
of those.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from construct import (
    Array,
    Bytes,
    Construct,
    Container,
    FormatField,
    ListContainer,
    Renamed,
    SizeofError,
    StreamError,
    Struct,
)
from construct.core import stream_read, stream_write

# A shape is a list of (name, field); a field is ("value", format), ("bytes", n), ("struct", shape)
# or ("array", count, field).
Field = tuple[Any, ...]
Shape = list[tuple[str, Field]]
Maker = Callable[[tuple[Any, ...]], Any]


def _field(subcon: Construct) -> tuple[Field, str]:
    """(field, struct format) for one subcon."""
    if isinstance(subcon, Packed):
        subcon = subcon.declared
    if isinstance(subcon, FormatField):
        return ("value",), subcon.fmtstr[1:]
    if isinstance(subcon, Bytes) and isinstance(subcon.length, int):
        return ("bytes", subcon.length), f"{subcon.length}s"
    if isinstance(subcon, Struct):
        shape, fmt = _shape(subcon)
        return ("struct", shape), fmt
    if isinstance(subcon, Array) and isinstance(subcon.count, int):
        element, fmt = _field(subcon.subcon)
        return ("array", subcon.count, element), fmt * subcon.count
    raise TypeError(f"Packed cannot handle {subcon!r}")


def _shape(declared: Struct) -> tuple[Shape, str]:
    shape: Shape = []
    fmt = ""
    for subcon in declared.subcons:
        if not isinstance(subcon, Renamed):
            raise TypeError(f"Packed needs named fields, not {subcon!r}")
        field, field_fmt = _field(subcon.subcon)
        shape.append((subcon.name, field))
        fmt += field_fmt
    return shape, fmt


def _flatten(field: Field, value: Any, out: list[Any], name: str) -> None:
    kind = field[0]
    if kind == "value":
        out.append(value)
    elif kind == "bytes":
        if len(value) != field[1]:
            raise StreamError(f"{name} needs {field[1]} bytes, got {len(value)}")
        out.append(value)
    elif kind == "struct":
        for sub_name, sub in field[1]:
            _flatten(sub, value[sub_name], out, f"{name}.{sub_name}")
    else:
        if len(value) != field[1]:
            raise StreamError(f"{name} needs {field[1]} elements, got {len(value)}")
        for element in value:
            _flatten(field[2], element, out, name)


class Packed(Construct):  # type: ignore[misc]  # construct ships no types
    """``declared``, parsed and built in one ``struct`` call (see the module docstring)."""

    def __init__(self, declared: Struct) -> None:
        super().__init__()
        self.declared = declared
        shape, fmt = _shape(declared)
        self._field = ("struct", shape)
        self._struct = struct.Struct("<" + fmt)
        self.make = _maker(shape)[0]

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return self.make(self._struct.unpack(stream_read(stream, self._struct.size, path)))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        flat: list[Any] = []
        _flatten(self._field, obj, flat, path)
        try:
            data = self._struct.pack(*flat)
        except struct.error as exc:
            raise StreamError(f"{path}: {exc}") from exc
        stream_write(stream, data, self._struct.size, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return self._struct.size

    def unpack_from(self, buffer: Any, offset: int = 0) -> Any:
        """The value at ``offset`` in ``buffer``, without construct's per-parse set-up."""
        return self.make(self._struct.unpack_from(buffer, offset))


def _maker(shape: Shape, at: int = 0) -> tuple[Maker, int]:
    """A Container maker for ``shape`` whose values start at ``at`` of an unpacked tuple, and how
    many values it takes. A run of leaves becomes one ``zip``; every other field its own maker."""
    runs: list[tuple[tuple[str, ...], slice] | tuple[str, Maker]] = []
    first = at
    for name, field in shape:
        if field[0] in ("value", "bytes"):
            if runs and isinstance(runs[-1][1], slice):
                names, run = runs[-1]
                runs[-1] = ((*names, name), slice(run.start, at + 1))
            else:
                runs.append(((name,), slice(at, at + 1)))
            at += 1
        else:
            field_maker, width = _field_maker(field, at)
            runs.append((name, field_maker))
            at += width
    if len(runs) == 1 and isinstance(runs[0][1], slice):
        names, run = runs[0]
        if run.start == 0:  # the whole tuple: no slice to take
            return (lambda values: Container(zip(names, values))), at - first
        return (lambda values: Container(zip(names, values[run]))), at - first

    def make(values: tuple[Any, ...]) -> Any:
        container = Container()
        for name, how in runs:
            if isinstance(how, slice):
                container.update(zip(name, values[how]))
            else:
                container[name] = how(values)
        return container

    return make, at - first


def _field_maker(field: Field, at: int) -> tuple[Maker, int]:
    """The maker of a struct or array field whose values start at ``at``, and its width."""
    if field[0] == "struct":
        return _maker(field[1], at)
    count, element = field[1], field[2]
    if element[0] in ("value", "bytes"):  # an array of leaves (fpu registers, bitmaps): one slice
        run = slice(at, at + count)
        return (lambda values: ListContainer(values[run])), count
    makers = []
    width = 0
    for _ in range(count):
        element_maker, width = _field_maker(element, at)
        makers.append(element_maker)
        at += width
    return (lambda values: ListContainer([make(values) for make in makers])), width * count


class PackedArray(Construct):  # type: ignore[misc]  # construct ships no types
    """``PrefixedArray(count, element)`` for a Packed ``element``: all elements unpacked at once."""

    def __init__(self, count: Construct, element: Packed) -> None:
        super().__init__()
        self.count = count
        self.element = element

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        count = self.count._parsereport(stream, context, path)
        layout = self.element._struct
        data = stream_read(stream, count * layout.size, path)
        return ListContainer(map(self.element.make, layout.iter_unpack(data)))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        self.count._build(len(obj), stream, context, path)
        for element in obj:
            self.element._build(element, stream, context, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise SizeofError("PackedArray has a variable size", path=path)
