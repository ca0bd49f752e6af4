"""Request bodies as data: typed nodes that check a JSON value and render themselves as JSON Schema.

One definition serves both ends: the gateway validates every request with a
node tree, and GET /openapi.json renders the same tree, so the published
document cannot drift from what the edge accepts.  A check failure is an
``ApiError`` 400 ``invalid_value`` whose ``param`` is the path of the field
(``messages[1].tool_calls[0].function``).

An optional object field may be JSON ``null``: it then counts as absent and
is dropped from the checked value, as OpenAI's APIs treat it.

A field the tree does not know is ignored, never refused: clients add fields
faster than servers follow (Codex's first request carried ``client_metadata``).
It is dropped from the checked value and its path noted in ``IGNORED``, which
the app sets per request, logs once and counts in /metrics.  A known field with
a bad value is still a 400 naming it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from allm.gateway.errors import bad_field

#: a JSON Schema document, as rendered into OpenAPI
Schema = dict[str, Any]

#: the unknown fields of the request this task checks (paths), where the app collects them
IGNORED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ignored_fields", default=None)
#: a field name past this is noted cut short
MAX_NOTED_NAME = 64

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value (booleans are not numbers here)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_ARTICLES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _a(kind: str) -> str:
    return _ARTICLES.get(kind, kind)


def child(path: str, key: str) -> str:
    """The path of an object's field: ``a.b``, or ``b`` at the top."""
    return f"{path}.{key}" if path else key


def _wrong_type(path: str, expected: str, value: Any) -> Exception:
    return bad_field(path, f"'{path}' must be {expected}, got {_a(json_type(value))}")


class Node:
    """One typed value: ``check`` returns the value (cleaned) or raises a 400 naming ``path``."""

    description: str = ""

    def kinds(self) -> frozenset[str]:
        """The JSON types this node can accept (``Either`` picks its option by them)."""
        raise NotImplementedError

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def schema(self) -> Schema:
        raise NotImplementedError

    def _described(self, out: Schema) -> Schema:
        if self.description:
            out["description"] = self.description
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Str(Node):
    max_length: int
    min_length: int = 0
    pattern: str | None = None  # a full-match regular expression
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"string"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise _wrong_type(path, "a string", value)
        if not self.min_length <= len(value) <= self.max_length:
            raise bad_field(
                path,
                f"'{path}' must be {self.min_length} to {self.max_length} characters long, got {len(value)}",
            )
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise bad_field(path, f"'{path}' must match {self.pattern}")
        return value

    def schema(self) -> Schema:
        out: Schema = {"type": "string", "maxLength": self.max_length}
        if self.min_length:
            out["minLength"] = self.min_length
        if self.pattern is not None:
            out["pattern"] = f"^{self.pattern}$"
        return self._described(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int(Node):
    minimum: int
    maximum: int
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"integer"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong_type(path, "an integer", value)
        if not self.minimum <= value <= self.maximum:
            raise bad_field(path, f"'{path}' must be from {self.minimum} to {self.maximum}, got {value}")
        return value

    def schema(self) -> Schema:
        return self._described({"type": "integer", "minimum": self.minimum, "maximum": self.maximum})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Num(Node):
    minimum: float
    maximum: float
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"number", "integer"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _wrong_type(path, "a number", value)
        if not (math.isfinite(value) and self.minimum <= value <= self.maximum):
            raise bad_field(path, f"'{path}' must be from {self.minimum:g} to {self.maximum:g}, got {value}")
        return value

    def schema(self) -> Schema:
        return self._described({"type": "number", "minimum": self.minimum, "maximum": self.maximum})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bool(Node):
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"boolean"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            raise _wrong_type(path, "a boolean", value)
        return value

    def schema(self) -> Schema:
        return self._described({"type": "boolean"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Enum(Node):
    values: tuple[str, ...]
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"string"})

    def check(self, value: Any, path: str) -> Any:
        if value not in self.values or not isinstance(value, str):
            shown = repr(value) if isinstance(value, str) and len(value) <= 64 else _a(json_type(value))
            raise bad_field(path, f"'{path}' must be one of {list(self.values)}, got {shown}")
        return value

    def schema(self) -> Schema:
        return self._described({"type": "string", "enum": list(self.values)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neutral(Node):
    """An OpenAI option this server does not implement, accepted at its neutral value only.

    Clients send some options at their defaults out of habit (``presence_penalty: 0``);
    refusing those would break them, accepting another value would be a lie.
    """

    value: bool | int | float
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"boolean"} if isinstance(self.value, bool) else {"number", "integer"})

    def check(self, value: Any, path: str) -> Any:
        if json_type(value) not in self.kinds() or value != self.value:
            shown = json.dumps(self.value)
            raise bad_field(path, f"'{path}' is only supported as {shown}, got {json.dumps(value)[:64]}")
        return value

    def schema(self) -> Schema:
        return self._described({"const": self.value})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unsupported(Node):
    """A known option this server cannot honour at any value: refused by name, never ignored."""

    why: str
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"string", "integer", "number", "boolean", "array", "object"})

    def check(self, value: Any, path: str) -> Any:
        raise bad_field(path, f"'{path}' is not supported: {self.why}")

    def schema(self) -> Schema:
        return self._described({"not": {}, "description": f"not supported: {self.why}"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnyJson(Node):
    """Any JSON value; the body's own bounds (depth, sizes) still hold."""

    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"string", "integer", "number", "boolean", "array", "object", "null"})

    def check(self, value: Any, path: str) -> Any:
        return value

    def schema(self) -> Schema:
        return self._described({})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arr(Node):
    items: Node
    max_items: int
    min_items: int = 0
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"array"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise _wrong_type(path, "an array", value)
        if not self.min_items <= len(value) <= self.max_items:
            span = (
                f"exactly {self.min_items}"
                if self.min_items == self.max_items
                else f"{self.min_items} to {self.max_items}"
            )
            raise bad_field(path, f"'{path}' must hold {span} items, got {len(value)}")
        return [self.items.check(item, f"{path}[{i}]") for i, item in enumerate(value)]

    def schema(self) -> Schema:
        out: Schema = {"type": "array", "items": self.items.schema(), "maxItems": self.max_items}
        if self.min_items:
            out["minItems"] = self.min_items
        return self._described(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Obj(Node):
    """An object of known fields; an unknown one is dropped and noted in ``IGNORED``."""

    fields: Mapping[str, Node]
    required: tuple[str, ...] = ()
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"object"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path, "an object", value)
        noted = IGNORED.get()
        if noted is not None:
            for key in value:
                if key not in self.fields:
                    noted.append(
                        child(path, key if len(key) <= MAX_NOTED_NAME else key[:MAX_NOTED_NAME] + "…")
                    )
        out = {}
        for key, node in self.fields.items():
            item = value.get(key)
            if item is None:
                if key in self.required:
                    raise bad_field(child(path, key), f"'{child(path, key)}' is required")
                continue
            out[key] = node.check(item, child(path, key))
        return out

    def schema(self) -> Schema:
        props: Schema = {}
        for key, node in self.fields.items():
            inner = node.schema()
            if key not in self.required:
                # null means absent, as in OpenAI's APIs
                inner = {"anyOf": [inner, {"type": "null"}]}
            props[key] = inner
        out: Schema = {"type": "object", "properties": props}  # others are ignored
        if self.required:
            out["required"] = list(self.required)
        return self._described(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Map(Node):
    """An object with free keys: metadata and the like."""

    values: Node
    keys: Str
    max_properties: int
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"object"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path, "an object", value)
        if len(value) > self.max_properties:
            raise bad_field(path, f"'{path}' holds at most {self.max_properties} keys, got {len(value)}")
        for key in value:
            if not self.keys.min_length <= len(key) <= self.keys.max_length:
                raise bad_field(
                    path,
                    f"the keys of '{path}' must be {self.keys.min_length} to {self.keys.max_length} "
                    f"characters long, got {len(key)}",
                )
            if self.keys.pattern is not None and re.fullmatch(self.keys.pattern, key) is None:
                shown = key if len(key) <= 64 else key[:64] + "…"
                raise bad_field(path, f"the keys of '{path}' must match {self.keys.pattern}, got {shown!r}")
        return {key: self.values.check(item, child(path, key)) for key, item in value.items()}

    def schema(self) -> Schema:
        return self._described(
            {
                "type": "object",
                "additionalProperties": self.values.schema(),
                "propertyNames": self.keys.schema(),
                "maxProperties": self.max_properties,
            }
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Either(Node):
    """One of several nodes told apart by JSON type (a string, or a list of parts)."""

    options: tuple[Node, ...]
    description: str = ""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for option in self.options:
            if seen & option.kinds():
                raise ValueError("the options of Either must accept distinct JSON types")
            seen |= option.kinds()

    def kinds(self) -> frozenset[str]:
        return frozenset().union(*(o.kinds() for o in self.options))

    def check(self, value: Any, path: str) -> Any:
        kind = json_type(value)
        for option in self.options:
            if kind in option.kinds():
                return option.check(value, path)
        kinds = [
            k
            for option in self.options
            for k in sorted(option.kinds())
            if k != "integer" or "number" not in option.kinds()
        ]
        expected = " or ".join(_a(k) for k in dict.fromkeys(kinds))
        raise _wrong_type(path, expected, value)

    def schema(self) -> Schema:
        return self._described({"anyOf": [o.schema() for o in self.options]})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tagged(Node):
    """Objects told apart by one field (``type``), with a default variant where it is absent.

    A tag this server knows of but does not serve (an image part, a web search
    tool) has its own message in ``unsupported``; an unknown or unsupported tag
    is refused naming the object.
    """

    tag: str
    variants: Mapping[str, Obj]
    default: str | None = None
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: name the tag itself (``messages[0].role``) rather than the object (``response_format``)
    param_at_tag: bool = False
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"object"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path, "an object", value)
        kind = value.get(self.tag)
        if kind is None:
            kind = self.default
        variant = self.variants.get(kind) if isinstance(kind, str) else None
        if variant is None:
            where = child(path, self.tag)
            param = where if self.param_at_tag else path
            if isinstance(kind, str) and kind in self.unsupported:
                raise bad_field(param, f"'{where}' {kind!r} is not supported: {self.unsupported[kind]}")
            shown = repr(kind) if isinstance(kind, str) and len(kind) <= 64 else _a(json_type(kind))
            raise bad_field(param, f"'{where}' must be one of {list(self.variants)}, got {shown}")
        return variant.check(value, path)

    def schema(self) -> Schema:
        options = []
        for kind, variant in self.variants.items():
            rendered = variant.schema()
            tag: Schema = {"type": "string", "const": kind}
            # the default variant's tag may be left out or null, like any optional field
            rendered["properties"][self.tag] = (
                tag if kind != self.default else {"anyOf": [tag, {"type": "null"}]}
            )
            if kind != self.default:
                rendered["required"] = sorted({self.tag, *rendered.get("required", [])})
            options.append(rendered)
        return self._described({"type": "object", "oneOf": options})


def tagged_variant(tag: str, fields: Mapping[str, Node], required: tuple[str, ...] = ()) -> Obj:
    """A variant of a Tagged union: its fields plus the tag itself."""
    return Obj(fields={tag: Str(max_length=64), **fields}, required=required)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checked(Node):
    """A node with one more check that a type cannot say (JSON text, a safe JSON Schema)."""

    node: Node
    then: Callable[[Any, str], Any]
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return self.node.kinds()

    def check(self, value: Any, path: str) -> Any:
        return self.then(self.node.check(value, path), path)

    def schema(self) -> Schema:
        out = self.node.schema()
        if self.description:
            out["description"] = (out.get("description", "") + " " + self.description).strip()
        return out
