"""Which JSON Schemas may reach llama.cpp: meta-schema valid, and inside what its converter compiles safely.

A ``json_schema`` response format or a tool's ``parameters`` becomes a llama.cpp
grammar in the text manager: llama-cpp-python's ``json_schema_to_gbnf`` (a
Python port of llama.cpp's converter) writes GBNF, then llama.cpp parses it.
Both ends are unforgiving, and found by trying them on this build:

- a GBNF text llama.cpp refuses to parse (an unknown escape such as ``\\d`` or
  ``\\.``, a ``\\b`` in a literal, an undefined or left-recursive rule, a
  repetition past its limit) gives a null sampler, and the engine process
  dies of a segmentation fault on it;
- the converter ``assert``s on shapes it does not know (a subschema holding
  only a ``description``, an unanchored pattern), loops forever on a stray
  ``]`` or ``}`` in a pattern, and builds strings as long as ``maxLength``;
- keywords it does not read (``allOf``, ``not``, ``minProperties`` …) would be
  silently ignored, so the output could break the schema the client gave.

So a schema is checked here, at the edge, and what cannot be compiled safely
is a 400 naming the path of the keyword at fault
(``response_format.json_schema.schema.properties.name.maxLength``). The walk
mirrors the converter's own dispatch (``SchemaConverter.visit``): each
subschema takes the first branch the converter would take, and may only hold
the keywords that branch reads, annotations, and bounds it does not enforce.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft7Validator, Draft201909Validator, Draft202012Validator
from jsonschema.exceptions import SchemaError

from allm.gateway.errors import bad_field
from allm.gateway.patterns import check_pattern

#: llama.cpp refuses more than 1000 nested optional repetitions (its
#: MAX_REPETITION_THRESHOLD check, which returns a null grammar: a crash), and
#: the converter writes every repetition out, so a bound is also a size bound.
MAX_REPEAT = 1000
#: all repetitions of one schema together: the grammar grows ~8 bytes per unit
MAX_REPEAT_TOTAL = 20_000
#: nesting of subschemas; OpenAI's structured outputs allow 10 (the converter recurses per level)
MAX_DEPTH = 24
#: subschemas in one schema: the converter makes a rule or more of each
MAX_NODES = 2000
#: properties of one object: the converter recurses once per optional property
MAX_PROPERTIES = 256
#: values of one enum; each becomes a grammar alternative the sampler tries per token
MAX_ENUM = 1000
#: the JSON text of all const and enum values together
MAX_LITERAL_CHARS = 65_536
#: numeric bounds are not enforced by the converter; they still must be plain numbers
MAX_NUMBER = 2**53

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
)
#: accepted and passed on, but the converter does not enforce them
NOT_ENFORCED = frozenset(
    {"format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems"}
)
ROOT_ONLY = frozenset({"$schema", "$defs", "definitions"})
STRUCTURE = frozenset(
    {
        "$ref",
        "anyOf",
        "oneOf",
        "type",
        "const",
        "enum",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "pattern",
        "minLength",
        "maxLength",
    }
)
PRIMITIVE_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
#: names the converter gives its own rules: a $defs entry of that name would clash
RESERVED_RULES = frozenset(
    {"root", "space", "dot", "item", "char", "value", "uuid", "date", "time", *PRIMITIVE_TYPES}
)
DEF_NAME = re.compile(r"[A-Za-z](?:[A-Za-z0-9]*[A-Za-z])?")
FORMATS_READ = re.compile(r"uuid[1-5]?|date|time|date-time")
DRAFTS: Mapping[str, Any] = {
    "https://json-schema.org/draft/2020-12/schema": Draft202012Validator,
    "https://json-schema.org/draft/2019-09/schema": Draft201909Validator,
    "http://json-schema.org/draft-07/schema": Draft7Validator,
    "http://json-schema.org/draft-07/schema#": Draft7Validator,
}


def check(schema: Any, path: str, *, allow_refs: bool = True) -> int:
    """Raise a 400 naming the keyword at fault unless ``schema`` compiles safely; return its repetitions.

    ``allow_refs`` is False for tool parameters: the text manager nests them
    inside a schema of its own, where their ``#/$defs/...`` would not resolve.
    """
    if not isinstance(schema, dict):
        raise bad_field(path, f"'{path}' must be a JSON Schema object")
    walk = _Walk(schema, path, allow_refs)
    walk.run()
    return walk.repeats


def _at(path: str, *keys: str | int) -> str:
    for key in keys:
        path = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
    return path


def _meta_schema(schema: dict[str, Any], path: str) -> None:
    dialect = schema.get("$schema", "https://json-schema.org/draft/2020-12/schema")
    validator = DRAFTS.get(dialect) if isinstance(dialect, str) else None
    if validator is None:
        raise bad_field(_at(path, "$schema"), f"'$schema' must be one of {sorted(DRAFTS)}")
    try:
        # The meta-schema's "regex" format compiles each pattern with Python's re, which
        # warns (FutureWarning) on a pattern like "[[a]"; the walk below refuses those anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            validator.check_schema(schema)
    except SchemaError as exc:
        where = _at(path, *exc.path)
        raise bad_field(where, f"'{where}' is not valid JSON Schema: {exc.message[:300]}") from None


class _Walk:
    """One schema's walk: the converter's dispatch, bounds, $defs and the order refs resolve in."""

    def __init__(self, root: dict[str, Any], path: str, allow_refs: bool) -> None:
        self.root = root
        self.path = path
        self.allow_refs = allow_refs
        self.nodes = 0
        self.repeats = 0
        self.literal_chars = 0
        self.defs: dict[str, tuple[dict[str, Any], str]] = {}
        self.def_key = "$defs"
        #: $defs name → the $defs names it can reach before it produces any text
        self.heads: dict[str, set[str]] = {}

    def run(self) -> None:
        self._sizes(self.root, self.path, 0)
        _meta_schema(self.root, self.path)
        root = self.root
        if "$ref" in root:
            raise bad_field(
                _at(self.path, "$ref"),
                "a $ref at the schema's root is not supported: describe the root and use $ref below it",
            )
        self._collect_defs()
        self._visit(root, self.path, 0, root=True)
        for name, (schema, where) in self.defs.items():
            self.heads[name] = self._visit(schema, where, 1)
        self._no_left_recursion()

    def _sizes(self, value: Any, path: str, depth: int) -> None:
        """Depth and size first: the meta-schema check and the walk below both recurse."""
        if depth > 2 * MAX_DEPTH + 4:
            raise bad_field(path, f"the schema nests deeper than {MAX_DEPTH} subschemas")
        if isinstance(value, dict):
            self.nodes += 1
            if self.nodes > 4 * MAX_NODES:
                raise bad_field(self.path, f"the schema is too large (over {MAX_NODES} subschemas)")
            for key, item in value.items():
                self._sizes(item, _at(path, key), depth + 1)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self._sizes(item, _at(path, i), depth + 1)

    def _collect_defs(self) -> None:
        kinds = [k for k in ("$defs", "definitions") if k in self.root]
        if len(kinds) > 1:
            raise bad_field(_at(self.path, "definitions"), "use $defs or definitions, not both")
        if not kinds:
            return
        key = kinds[0]
        where = _at(self.path, key)
        if not self.allow_refs:
            raise bad_field(where, f"'{key}' and $ref are not supported in tool parameters: inline them")
        defs = self.root[key]
        if not isinstance(defs, dict):
            raise bad_field(where, f"'{where}' must be an object")
        root_props = self.root.get("properties")
        taken = (
            {re.sub(r"[^a-zA-Z0-9-]+", "-", p) for p in root_props} if isinstance(root_props, dict) else set()
        )
        for name, schema in defs.items():
            at = _at(where, name)
            if not DEF_NAME.fullmatch(name) or len(name) > 64:
                raise bad_field(
                    at,
                    f"the name {name[:64]!r} must be letters and digits, starting and ending with a letter",
                )
            if name in RESERVED_RULES or name in taken:
                raise bad_field(
                    at, f"the name {name!r} clashes with a grammar rule of the same name: rename it"
                )
            if not isinstance(schema, dict):
                raise bad_field(at, f"'{at}' must be a schema object")
            self.defs[name] = (schema, at)
        self.def_key = key

    def _visit(self, node: Any, path: str, depth: int, *, root: bool = False) -> set[str]:
        """Check one subschema; return the $defs it refers to before producing any text."""
        if not isinstance(node, dict):
            raise bad_field(path, f"'{path}' must be a schema object (true/false schemas are not supported)")
        if depth > MAX_DEPTH:
            raise bad_field(path, f"the schema nests deeper than {MAX_DEPTH} subschemas")
        for key in node:
            known = key in STRUCTURE or key in ANNOTATIONS or key in NOT_ENFORCED or key in ROOT_ONLY
            if not known:
                raise bad_field(
                    _at(path, key), f"the keyword {key[:64]!r} is not supported by llama.cpp's grammar"
                )
            if key in ROOT_ONLY and not root:
                raise bad_field(_at(path, key), f"'{key}' is only supported at the schema's root")
        for key in ("default", "examples"):
            if key in node:
                self._plain_value(node[key], _at(path, key), literal=False)
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not abs(value) <= MAX_NUMBER):
                raise bad_field(_at(path, key), f"'{key}' must be a number within ±2**53")
        kind = node.get("type")
        heads: set[str] = set()
        if "$ref" in node:
            read, heads = {"$ref"}, {self._ref(node["$ref"], _at(path, "$ref"))}
        elif "oneOf" in node or "anyOf" in node:
            if "oneOf" in node and "anyOf" in node:
                raise bad_field(_at(path, "oneOf"), "use anyOf or oneOf, not both")
            key = "oneOf" if "oneOf" in node else "anyOf"
            read = {key}
            for i, option in enumerate(node[key]):
                heads |= self._visit(option, _at(path, key, i), depth + 1)
        elif isinstance(kind, list):
            read = {"type"}
        elif "const" in node:
            read = {"const", "type"}
            self._plain_value(node["const"], _at(path, "const"), literal=True)
        elif "enum" in node:
            read = {"enum", "type"}
            values = node["enum"]
            if not values or len(values) > MAX_ENUM:
                raise bad_field(_at(path, "enum"), f"'enum' must hold 1 to {MAX_ENUM} values")
            for i, value in enumerate(values):
                self._plain_value(value, _at(path, "enum", i), literal=True)
        elif kind in (None, "object") and (
            "properties" in node
            or ("additionalProperties" in node and node["additionalProperties"] is not True)
        ):
            read = {"type", "properties", "required", "additionalProperties"}
            self._object(node, path, depth)
        elif kind in (None, "array") and ("items" in node or "prefixItems" in node):
            read = self._array(node, path, depth)
        elif kind in (None, "string") and "pattern" in node:
            read = {"type", "pattern"}
            self.repeats += check_pattern(node["pattern"], _at(path, "pattern"))
        elif kind in (None, "string") and FORMATS_READ.fullmatch(str(node.get("format", ""))):
            read = {"type"}
        elif kind == "string" and ("minLength" in node or "maxLength" in node):
            read = {"type", "minLength", "maxLength"}
            self._bounds(node, path, "minLength", "maxLength")
        elif kind is not None or not node:  # a primitive, or {}: the converter writes any JSON object for {}
            read = {"type"}
        else:  # the converter asserts on a subschema it cannot place (one with only a description)
            raise bad_field(
                path, "give this subschema a 'type' (or properties, items, enum, const, anyOf, $ref)"
            )
        for key in node:
            if key in STRUCTURE and key not in read:
                raise bad_field(
                    _at(path, key), f"'{key}' is not supported here: llama.cpp's converter would ignore it"
                )
        if self.repeats > MAX_REPEAT_TOTAL:
            raise bad_field(path, f"the schema repeats more than {MAX_REPEAT_TOTAL} items in all")
        return heads

    def _ref(self, ref: Any, path: str) -> str:
        if not self.allow_refs:
            raise bad_field(path, "$ref is not supported in tool parameters: inline the schema")
        key = self.def_key
        prefix = f"#/{key}/"
        if not isinstance(ref, str) or not ref.startswith(prefix) or ref[len(prefix) :] not in self.defs:
            raise bad_field(path, f"$ref must name an entry of the root's {key}: '{prefix}<name>'")
        return ref[len(prefix) :]

    def _object(self, node: dict[str, Any], path: str, depth: int) -> None:
        props = node.get("properties", {})
        if len(props) > MAX_PROPERTIES:
            raise bad_field(_at(path, "properties"), f"an object holds at most {MAX_PROPERTIES} properties")
        for name, schema in props.items():
            at = _at(path, "properties", name)
            if name == "$ref" or len(name) > 256:
                raise bad_field(at, "a property name must not be '$ref' nor longer than 256 characters")
            self._plain_string(name, at)
            self._visit(schema, at, depth + 1)
        for i, name in enumerate(node.get("required", [])):
            if name not in props:
                raise bad_field(
                    _at(path, "required", i), f"required names {name[:64]!r}, which is not in properties"
                )
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            self._visit(extra, _at(path, "additionalProperties"), depth + 1)

    def _array(self, node: dict[str, Any], path: str, depth: int) -> set[str]:
        if "items" in node and "prefixItems" in node:
            raise bad_field(_at(path, "prefixItems"), "use items or prefixItems, not both")
        key = "items" if "items" in node else "prefixItems"
        items = node[key]
        if not items:  # the converter takes an empty items as absent and fails
            raise bad_field(_at(path, key), f"'{key}' must not be empty: give the items a schema")
        if isinstance(items, list):
            if len(items) > MAX_PROPERTIES:
                raise bad_field(_at(path, key), f"a tuple holds at most {MAX_PROPERTIES} items")
            for i, item in enumerate(items):
                self._visit(item, _at(path, key, i), depth + 1)
            return {"type", key}
        self._visit(items, _at(path, key), depth + 1)
        self._bounds(node, path, "minItems", "maxItems")
        return {"type", key, "minItems", "maxItems"}

    def _bounds(self, node: dict[str, Any], path: str, low_key: str, high_key: str) -> None:
        low, high = node.get(low_key, 0), node.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad_field(_at(path, key), f"'{key}' must be an integer, got {value!r}")
            if value is not None and not 0 <= value <= MAX_REPEAT:
                raise bad_field(
                    _at(path, key), f"'{key}' must be from 0 to {MAX_REPEAT} (llama.cpp's repetition limit)"
                )
        if high is not None and low > high:
            raise bad_field(_at(path, low_key), f"'{low_key}' is larger than '{high_key}'")
        self.repeats += high if high is not None else low

    def _plain_value(self, value: Any, path: str, *, literal: bool) -> None:
        """A JSON value inside the schema: no '$ref' keys (the converter resolves them anywhere).

        A ``literal`` (const, enum) is also written into the grammar, so its
        strings and keys must survive the converter's escaping.
        """
        if literal:
            self.literal_chars += len(json.dumps(value))
            if self.literal_chars > MAX_LITERAL_CHARS:
                raise bad_field(path, f"const and enum values hold more than {MAX_LITERAL_CHARS} characters")
        stack: list[tuple[Any, str]] = [(value, path)]
        while stack:
            item, at = stack.pop()
            if isinstance(item, dict):
                for key, inner in item.items():
                    if key == "$ref":
                        raise bad_field(_at(at, key), "a '$ref' key inside a value is not supported")
                    if literal:
                        self._plain_string(key, _at(at, key))
                    stack.append((inner, _at(at, key)))
            elif isinstance(item, list):
                stack.extend((inner, _at(at, i)) for i, inner in enumerate(item))
            elif isinstance(item, str) and literal:
                self._plain_string(item, at)

    @staticmethod
    def _plain_string(text: str, path: str) -> None:
        """Text the converter writes into a GBNF literal: its escaping breaks on quotes and controls."""
        if '"' in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise bad_field(path, "a quote or a control character here cannot be compiled into a grammar")

    def _no_left_recursion(self) -> None:
        """A $defs cycle that produces no text before it recurses is left recursion: llama.cpp refuses it."""
        done: set[str] = set()

        def visit(name: str, trail: list[str]) -> None:
            if name in trail:
                cycle = " → ".join([*trail[trail.index(name) :], name])
                raise bad_field(
                    self.defs[name][1],
                    f"$ref cycle {cycle} produces no text before it recurses (left recursion)",
                )
            if name in done:
                return
            for nxt in sorted(self.heads.get(name, ())):
                visit(nxt, [*trail, name])
            done.add(name)

        for name in sorted(self.heads):
            visit(name, [])
