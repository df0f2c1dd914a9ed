"""Command-line flags and help text generated from the config schemas (vlp.core.config).

Each field of a flat schema becomes a flag (`image_size` -> `--image-size`; a
bool that defaults to False -> a switch, one that defaults to True ->
`--no-<name>`; a field marked positional -> the positional arguments), with
the schema's description and default as its help. Flags default to "not
given", so only what the user typed overrides the YAML file and `key=value`
overrides. Nested schemas (the run file of `vlp train`) are described, one
line per dotted key, by `describe`.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*=")  # a number: a list item


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type: 'int', 'float | None', 'fp32|bf16', 'list[str]'."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def describe(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf key of the schema."""
    rows = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        if nested is not None and typing.get_origin(field.annotation) is None:
            rows += describe(nested, key + ".")
            continue
        if nested is not None:  # a list of sections: describe one element
            rows.append((key, type_name(field.annotation), _show(_default(field)), field.description or ""))
            rows += describe(nested, key + "[].")
            continue
        rows.append((key, type_name(field.annotation), _show(_default(field)), field.description or ""))
    return rows


def _show(value: Any) -> str:
    if isinstance(value, BaseModel):
        return repr(value.model_dump(mode="json"))
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return repr([v.model_dump(mode="json") for v in value])
    return repr(value)


def describe_text(schema: type[BaseModel]) -> str:
    """The key table `vlp config show NAME --describe` prints and `--help` ends with."""
    rows = describe(schema)
    width = max(len(r[0]) for r in rows)
    lines = []
    for key, kind, default, text in rows:
        lines.append(f"  {key:<{width}}  {kind} = {default}" + (f"\n  {'':<{width}}    {text}" if text else ""))
    return "\n".join(lines)


def add_flags(parser: argparse.ArgumentParser, schema: type[BaseModel]) -> None:
    """One flag per field of a flat schema (positional fields as positional arguments)."""
    for name, field in schema.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = _default(field)
        text = (field.description or "").replace("%", "%%")
        if extra.get("positional"):
            parser.add_argument(name, nargs="*", default=argparse.SUPPRESS, metavar=name.upper(), help=text)
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool and default is True:
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                default=argparse.SUPPRESS, help=text)
        elif field.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            shown = "" if default in (None, "", []) else f" (default: {default})"
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=type_name(field.annotation),
                                help=text + shown)


def given(args: argparse.Namespace, schema: type[BaseModel]) -> dict[str, Any]:
    """The schema fields the user typed on the command line (`none` or `null` for a field that may be None:
    None, so a default that is on can be turned off from the command line)."""
    out = {}
    for name, field in schema.model_fields.items():
        if hasattr(args, name):
            value = getattr(args, name)
            off = isinstance(value, str) and value.lower() in ("none", "null") and _optional(field.annotation)
            out[name] = None if off else value
    return out


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def split_overrides(values: list[str], schema: type[BaseModel]) -> tuple[list[str], list[str]]:
    """Positional words -> (key=value overrides naming a schema key, the rest)."""
    keys = {row[0].replace("[]", "") for row in describe(schema)} | set(schema.model_fields)
    overrides, rest = [], []
    for value in values:
        is_override = OVERRIDE.match(value) and value.split("=", 1)[0].split(".")[0] in {k.split(".")[0] for k in keys}
        (overrides if is_override else rest).append(value)
    return overrides, rest
