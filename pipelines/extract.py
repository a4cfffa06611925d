"""Extraction: a JSON schema -> typed Arrow columns; one generated text -> those columns' values.

Contract
--------
- `check_schema(schema, where)`: raises ValueError naming `where` (the config key) when the schema
  is not a mapping, fails its dialect's metaschema (jsonschema's `check_schema`; the dialect is
  `$schema`, by default 2020-12), is not `type: object` with non-empty `properties` at the top, has a
  property name that is empty or starts with `__`, or has a `$ref` that is not a local pointer
  (`#/...`, never fetched) or points nowhere.
- `Extractor(schema)` (a checked schema), built once per engine actor: `names` (one output column per
  top-level property, in the schema's order), `arrow_schema()` (their Arrow types) and
  `values(text, finish_reason) -> (values | None, error | None)`: exactly one is None. A row cut by
  max_tokens (finish_reason "length") is an error, whatever its text; otherwise the text must parse
  as JSON (NaN/Infinity refused) and validate against the schema (jsonschema; `format` is not
  asserted), and its values must fit their columns.
- `prompt_text(schema)`: the schema as indented JSON, for templates (`{{ schema }}`).

JSON schema -> Arrow (`kind_of`):
    string -> string; integer -> int64; number -> float64 (also ["integer", "number"]);
    boolean -> bool; enum/const of strings (of ints, of bools, of numbers) -> string (int64, bool,
    float64); object with properties -> struct of the declared properties (extra keys an object
    may carry are kept in generated_text only); array with one `items` schema -> list of the item
    type; local `$ref` -> the referenced schema; anyOf/oneOf of one schema and `{"type": "null"}`
    -> that schema, nullable; `["x", "null"]` -> x, nullable.
    Anything else (no type, mixed types, object without properties, array without items or with
    prefixItems, allOf, recursive $ref, type null) -> a string column holding the value as JSON
    text (JSON null -> null).
Nullability: top-level columns are always nullable (an error row holds null there); inside structs
and lists a value is nullable unless required and of a non-null type.
Conversions: an integer given as 3.0 (valid JSON-schema integer) is written as 3; an integer outside
int64 is an error; string lengths are whatever the schema allows (maxLength is validated).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_SCALARS = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Kind:
    """One value's column type: a scalar, a struct, a list, or JSON text."""
    arrow: str  # "string" | "int64" | "float64" | "bool" | "struct" | "list" | "json"
    nullable: bool = True
    fields: tuple[tuple[str, Kind], ...] = ()  # struct
    item: Kind | None = None  # list

    def arrow_type(self):
        import pyarrow as pa

        if self.arrow == "struct":
            return pa.struct([pa.field(n, k.arrow_type(), nullable=k.nullable) for n, k in self.fields])
        if self.arrow == "list":
            return pa.list_(pa.field("item", self.item.arrow_type(), nullable=self.item.nullable))
        return {"json": pa.string, "string": pa.string, "bool": pa.bool_, "int64": pa.int64,
                "float64": pa.float64}[self.arrow]()


_JSON = Kind("json")


class _Unfit(ValueError):
    """A value that passed the schema but does not fit its column (an int64 overflow)."""


# --- the schema -------------------------------------------------------------

def _pointer(root: dict, ref: str):
    """The schema a local `$ref` ("#/$defs/Name") points to, or None."""
    node: Any = root
    for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _refs(node, path: str):
    """(path, ref) of every `$ref` in a schema."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield path, node["$ref"]
        for k, v in node.items():
            yield from _refs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _refs(v, f"{path}[{i}]")


def check_schema(schema, where: str = "task.schema") -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise ValueError(f"{where}: expected a JSON schema object (a mapping), got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        at = ".".join(str(p) for p in e.absolute_path)
        raise ValueError(f"{where}: not a valid JSON schema{f' at {at}' if at else ''}: "
                         f"{_short(e.message)}") from None
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        raise ValueError(f"{where}: an extract schema must be `type: object` with `properties` (each top-level "
                         "property becomes an output column)")
    for name in schema["properties"]:
        if not name or name.startswith("__"):
            raise ValueError(f"{where}.properties: property name {name!r} cannot be a column name "
                             "(empty, or starting with __)")
    for path, ref in _refs(schema, where):
        if not ref.startswith("#"):
            raise ValueError(f"{path}.$ref: {ref!r} is not a local reference; remote schemas are never fetched "
                             "(put it under $defs and use #/$defs/...)")
        if _pointer(schema, ref) is None:
            raise ValueError(f"{path}.$ref: {ref!r} points to nothing in the schema")


def _scalar_of(values: list) -> str:
    """The column type of an enum's values (None excluded): one JSON type, else JSON text."""
    if all(isinstance(v, str) for v in values):
        return "string"
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float64"
    return "json"


def kind_of(node, root: dict, refs: tuple[str, ...] = ()) -> Kind:
    """The column type of one (sub)schema; `refs` are the $refs being followed (a cycle -> JSON)."""
    if not isinstance(node, dict):
        return _JSON  # true / false schemas
    if "$ref" in node:
        ref = node["$ref"]
        target = _pointer(root, ref) if isinstance(ref, str) and ref.startswith("#") else None
        return _JSON if target is None or ref in refs else kind_of(target, root, refs + (ref,))
    for key in ("anyOf", "oneOf"):
        if key in node and "type" not in node:
            branches = [b for b in node[key] if b != {"type": "null"}]
            if len(branches) != 1:
                return _JSON
            k = kind_of(branches[0], root, refs)
            return Kind(k.arrow, True, k.fields, k.item) if len(branches) < len(node[key]) else k
    if "allOf" in node:
        return _JSON
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        present = [v for v in values if v is not None]
        return Kind(_scalar_of(present) if present else "json", nullable=len(present) < len(values))
    types = node.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    nullable = "null" in types
    types = [t for t in types if t != "null"]
    if sorted(types) == ["integer", "number"]:
        return Kind("float64", nullable)
    if len(types) != 1:
        return _JSON
    t = types[0]
    if t in _SCALARS:
        return Kind(_SCALARS[t], nullable)
    if t == "object" and isinstance(node.get("properties"), dict) and node["properties"]:
        required = set(node.get("required", []))
        fields = []
        for name, sub in node["properties"].items():
            k = kind_of(sub, root, refs)
            fields.append((name, Kind(k.arrow, k.nullable or name not in required, k.fields, k.item)))
        return Kind("struct", nullable, tuple(fields))
    if t == "array" and isinstance(node.get("items"), (dict, bool)) and "prefixItems" not in node:
        return Kind("list", nullable, item=kind_of(node["items"], root, refs))
    return _JSON


def top_kinds(schema: dict) -> dict[str, Kind]:
    """One Kind per top-level property; all nullable (an error row holds null)."""
    out = {}
    for name, sub in schema["properties"].items():
        k = kind_of(sub, schema)
        out[name] = Kind(k.arrow, True, k.fields, k.item)
    return out


def column_names(schema: dict) -> list[str]:
    return list(schema["properties"])


def arrow_schema(schema: dict):
    import pyarrow as pa

    return pa.schema([pa.field(n, k.arrow_type(), nullable=True) for n, k in top_kinds(schema).items()])


def prompt_text(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False)


# --- one output --------------------------------------------------------------

def convert(value, kind: Kind, path: str = ""):
    """A schema-valid JSON value -> the Python value its Arrow column takes."""
    if kind.arrow == "json":
        return None if value is None else json.dumps(value, ensure_ascii=False)
    if value is None:
        if not kind.nullable:
            raise _Unfit(f"{path or 'value'}: null where the schema requires a value")
        return None
    if kind.arrow == "int64":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise _Unfit(f"{path}: {value!r} is not an integer")
        if not _INT64[0] <= int(value) <= _INT64[1]:
            raise _Unfit(f"{path}: integer {int(value)} is outside int64")
        return int(value)
    if kind.arrow == "float64":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Unfit(f"{path}: {value!r} is not a number")
        try:
            return float(value)
        except OverflowError:
            raise _Unfit(f"{path}: number {value} is outside float64") from None
    if kind.arrow == "struct":
        if not isinstance(value, dict):
            raise _Unfit(f"{path}: expected an object")
        return {n: convert(value.get(n), k, f"{path}.{n}") for n, k in kind.fields}
    if kind.arrow == "list":
        if not isinstance(value, list):
            raise _Unfit(f"{path}: expected an array")
        return [convert(v, kind.item, f"{path}[{i}]") for i, v in enumerate(value)]
    want = {"string": str, "bool": bool}[kind.arrow]
    if not isinstance(value, want):
        raise _Unfit(f"{path}: expected {kind.arrow}, got {type(value).__name__}")
    return value


def _short(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class Extractor:
    """A checked schema, compiled once: its columns and the parse of one output."""

    def __init__(self, schema: dict):
        from jsonschema.validators import validator_for

        self.schema = schema
        self.kinds = top_kinds(schema)
        self.names = list(self.kinds)
        self._validator = validator_for(schema)(schema)

    def arrow_schema(self):
        return arrow_schema(self.schema)

    def values(self, text: str, finish_reason: str | None) -> tuple[dict | None, str | None]:
        """(column -> value, None) for a good output; (None, why) for one that is not."""
        from jsonschema.exceptions import best_match

        if finish_reason == "length":
            return None, ("output cut by max_tokens before the JSON was complete (finish_reason length); "
                          "raise sampling.max_tokens")
        try:
            obj = json.loads(text, parse_constant=_no_constant)
        except ValueError as e:
            return None, _short(f"output is not valid JSON: {e}")
        err = best_match(self._validator.iter_errors(obj))
        if err is not None:
            at = "/".join(str(p) for p in err.absolute_path)
            return None, _short(f"output does not fit the schema{f' at {at}' if at else ''}: {err.message}")
        try:
            return {n: convert(obj.get(n), k, n) for n, k in self.kinds.items()}, None
        except _Unfit as e:
            return None, _short(f"output does not fit its column: {e}")
