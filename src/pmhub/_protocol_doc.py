"""The generated parts of docs/protocol.md, rendered from the code they describe.

The frame tables are walked from the msgspec schemas of :mod:`pmhub.frames`
(the client and server tagged unions, and the objects they carry); the limits
table from the fields, defaults and ``#:`` comments of :class:`pmhub.limits.Limits`.
Each part sits in docs/protocol.md between ``<!-- generated:NAME:begin -->``
and ``<!-- generated:NAME:end -->``, so the document cannot drift from the
schemas: ``tests/test_docs.py`` fails when it has. ::

    python -m pmhub._protocol_doc --write docs/protocol.md   # regenerate in place
    python -m pmhub._protocol_doc --check docs/protocol.md   # exit 1 with a diff if stale

A schema type this module cannot describe raises ``TypeError`` rather than
being rendered vaguely: teach :func:`_json_type` the new type.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import msgspec.inspect as mi

from .frames import ClientFrame, Conversation, ServerFrame
from .limits import Limits

__all__ = ["SECTIONS", "main", "render_frame_tables", "render_limits_table", "update"]


# -- frames ----------------------------------------------------------------------------

_ARRAYS = (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)


def render_frame_tables() -> str:
    """Markdown tables of every client frame, server frame and object they carry."""
    client = _structs(ClientFrame)
    server = _structs(ServerFrame)
    objects = _nested_objects([*server, *_structs(Conversation)])
    parts = ["### Client → server frames", ""]
    for struct in client:
        parts += _struct_table(struct, sent_by_server=False)
    parts += ["### Server → client frames", ""]
    for struct in server:
        parts += _struct_table(struct, sent_by_server=True)
    parts += ["### Objects", ""]
    for struct in objects:
        parts += _struct_table(struct, sent_by_server=True)
    return "\n".join(parts).rstrip("\n") + "\n"


def _structs(annotation: object) -> list[mi.StructType]:
    info = mi.type_info(annotation)
    members = info.types if isinstance(info, mi.UnionType) else (info,)
    structs = [member for member in members if isinstance(member, mi.StructType)]
    if len(structs) != len(members):
        raise TypeError(f"{annotation!r} must be a Struct or a union of Structs")
    return structs


def _nested_objects(roots: Sequence[mi.StructType]) -> list[mi.StructType]:
    """Untagged structs reachable from ``roots`` (roots included), in order of discovery."""
    found: dict[type[msgspec.Struct], mi.StructType] = {}

    def visit(info: mi.Type) -> None:
        if isinstance(info, mi.StructType):
            if info.tag is None and info.cls not in found:
                found[info.cls] = info
            for field in info.fields:
                visit(field.type)
        elif isinstance(info, mi.UnionType):
            for member in info.types:
                visit(member)
        elif isinstance(info, _ARRAYS):
            visit(info.item_type)

    for root in roots:
        visit(root)
    return list(found.values())


def _struct_table(struct: mi.StructType, *, sent_by_server: bool) -> list[str]:
    name = struct.cls.__name__
    heading = f"`{name}` object" if struct.tag is None else f"`{struct.tag}` (`{name}`)"
    lines = [f"#### {heading}", "", _summary(struct.cls), ""]
    lines += ["| field | JSON type | presence |", "|---|---|---|"]
    if struct.tag_field is not None:
        tag = msgspec.json.encode(struct.tag).decode()
        lines.append(f"| `{struct.tag_field}` | `{tag}` | {_presence(None, sent_by_server)} |")
    omit_defaults = struct.cls.__struct_config__.omit_defaults
    for field in struct.fields:
        presence = _presence(field, sent_by_server, omit_defaults=omit_defaults)
        lines.append(f"| `{field.encode_name}` | {_json_type(field.type)} | {presence} |")
    return [*lines, ""]


def _summary(cls: type) -> str:
    """The first paragraph of a docstring, in Markdown, on one line."""
    doc = inspect.cleandoc(cls.__doc__ or "")  # not getdoc(): it inherits Struct's
    if not doc:
        raise ValueError(f"{cls.__qualname__} needs a docstring: its first line documents it")
    paragraph = " ".join(line.strip() for line in doc.split("\n\n", 1)[0].splitlines())
    return _markdown(paragraph)


def _markdown(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def _presence(field: mi.Field | None, sent_by_server: bool, *, omit_defaults: bool = False) -> str:
    if field is None or field.required:
        return "always" if sent_by_server else "required"
    default = field.default
    if default is msgspec.NODEFAULT:
        default = field.default_factory()
    shown = msgspec.json.encode(default).decode()
    if not sent_by_server:
        return f"optional, default `{shown}`"
    return f"omitted when `{shown}`" if omit_defaults else "always"


def _json_type(info: mi.Type) -> str:
    if isinstance(info, mi.BoolType):
        return "boolean"
    if isinstance(info, mi.IntType):
        return "integer" + _bounds(info.ge, info.le, info.gt, info.lt)
    if isinstance(info, mi.FloatType):
        return "number" + _bounds(info.ge, info.le, info.gt, info.lt)
    if isinstance(info, mi.StrType):
        return "string" + _lengths(info.min_length, info.max_length)
    if isinstance(info, mi.NoneType):
        return "null"
    if isinstance(info, mi.DateTimeType):
        return "string (RFC 3339 date-time)"
    if isinstance(info, mi.StructType) and info.tag is None:
        return f"`{info.cls.__name__}` object"
    if isinstance(info, mi.UnionType):
        return " or ".join(_json_type(member) for member in info.types)
    if isinstance(info, _ARRAYS):
        return f"array of {_json_type(info.item_type)}"
    if isinstance(info, mi.LiteralType):
        return " or ".join(f"`{msgspec.json.encode(value).decode()}`" for value in info.values)
    raise TypeError(f"cannot describe {info!r} in docs/protocol.md: teach _json_type() about it")


def _bounds(ge: float | None, le: float | None, gt: float | None, lt: float | None) -> str:
    if ge is not None and le is not None:
        return f" ({_number(ge)} to {_number(le)})"
    parts = []
    if ge is not None or gt is not None:
        parts.append(f"≥ {_number(ge)}" if ge is not None else f"> {_number(gt)}")
    if le is not None or lt is not None:
        parts.append(f"≤ {_number(le)}" if le is not None else f"< {_number(lt)}")
    return f" ({' and '.join(parts)})" if parts else ""


def _lengths(min_length: int | None, max_length: int | None) -> str:
    if min_length is not None and max_length is not None:
        return f" ({min_length} to {max_length} characters)"
    if min_length is not None:
        return f" (at least {min_length} characters)"
    if max_length is not None:
        return f" (at most {max_length} characters)"
    return ""


def _number(value: float | None) -> str:
    if isinstance(value, int) and abs(value) >= 2**16 and abs(value).bit_count() == 1:
        return f"{'-' if value < 0 else ''}2^{abs(value).bit_length() - 1}"
    return str(value)


# -- limits ----------------------------------------------------------------------------

_FIELD = re.compile(r"^(\w+)\s*:[^=]+=")


def render_limits_table() -> str:
    """A Markdown table of every :class:`~pmhub.limits.Limits` field and its default.

    A ``#:`` comment describes the field below it and the fields that follow
    it without a blank line or another comment (``message_rate`` and
    ``message_burst`` share one); they form one row.
    """
    rows = ["| `Limits` field | default | meaning |", "|---|---|---|"]
    defaults = {field.name: field.default for field in dataclasses.fields(Limits)}
    for names, comment in _limit_groups(defaults):
        field_cell = "<br>".join(f"`{name}`" for name in names)
        default_cell = "<br>".join(f"`{defaults[name]!r}`" for name in names)
        rows.append(f"| {field_cell} | {default_cell} | {_markdown(comment)} |")
    return "\n".join(rows) + "\n"


def _limit_groups(fields: dict[str, object]) -> Iterator[tuple[list[str], str]]:
    groups: list[tuple[list[str], list[str]]] = []
    comment: list[str] = []
    open_group = False
    for line in inspect.getsource(Limits).splitlines():
        text = line.strip()
        match = _FIELD.match(text)
        if text.startswith("#:"):
            if open_group:
                open_group, comment = False, []
            comment.append(text[2:].strip())
        elif match and match.group(1) in fields:
            name = match.group(1)
            if comment:
                groups.append(([name], comment))
                comment, open_group = [], True
            elif open_group:
                groups[-1][0].append(name)
            else:
                raise ValueError(f"Limits.{name} needs a `#:` comment above it in limits.py")
        else:
            open_group, comment = False, []
    described = [name for names, _ in groups for name in names]
    missing = [name for name in fields if name not in described]
    if missing:
        raise ValueError(f"Limits fields without a `#:` comment in limits.py: {missing}")
    for names, lines in groups:
        yield names, " ".join(lines)


# -- the document ----------------------------------------------------------------------

#: Each generated part of docs/protocol.md, by the NAME in its markers.
SECTIONS: dict[str, Callable[[], str]] = {
    "frames": render_frame_tables,
    "limits": render_limits_table,
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name}:begin -->", f"<!-- generated:{name}:end -->"


def update(text: str) -> str:
    """``text`` (docs/protocol.md) with every generated part rendered anew.

    Raises ``ValueError`` when a part's markers are missing or out of order.
    """
    for name, render in SECTIONS.items():
        begin, end = _markers(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start or text.count(begin) != 1 or text.count(end) != 1:
            raise ValueError(f"docs/protocol.md needs one {begin} ... {end} pair, in that order")
        head = text[: start + len(begin)]
        text = f"{head}\n\n{render()}\n{text[stop:]}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print, ``--write`` or ``--check`` the generated parts."""
    parser = argparse.ArgumentParser(
        prog="python -m pmhub._protocol_doc",
        description="Regenerate the schema-derived tables of docs/protocol.md.",
    )
    parser.add_argument("path", nargs="?", default="docs/protocol.md", type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the file in place")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when stale")
    args = parser.parse_args(argv)
    path: Path = args.path
    if not (args.write or args.check):
        for name, render in SECTIONS.items():
            print(f"<!-- {name} -->\n{render()}")
        return 0
    current = path.read_text(encoding="utf-8")
    fresh = update(current)
    if args.write:
        if fresh != current:
            path.write_text(fresh, encoding="utf-8")
        return 0
    if fresh == current:
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            fresh.splitlines(keepends=True),
            fromfile=str(path),
            tofile=f"{path} (regenerated)",
        )
    )
    print(f"\n{path} is out of date: run python -m pmhub._protocol_doc --write {path}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
