"""JSON Schemas at the edge: each one that kills or wedges llama.cpp is a 400 naming its keyword."""

from __future__ import annotations

import pytest

from allm.gateway import schemas
from allm.gateway.errors import ApiError

from .grammar import compile_schema

BASE = "response_format.json_schema.schema"


def refused(schema, *, allow_refs=True) -> ApiError:
    with pytest.raises(ApiError) as info:
        schemas.check(schema, BASE, allow_refs=allow_refs)
    assert info.value.status == 400
    assert info.value.code == "invalid_value"
    return info.value


def _defs(defs):
    """A root object whose property refers to the first of these $defs."""
    return {"type": "object", "properties": {"r": {"$ref": f"#/$defs/{next(iter(defs))}"}}, "$defs": defs}


def _recursive(name):
    """A $defs entry that holds itself: fine, unless its name breaks the grammar's rule names."""
    return _defs({name: {"type": "object", "properties": {"x": {"$ref": f"#/$defs/{name}"}}}})


def _prop(schema):
    return {"type": "object", "properties": {"a": schema}}


LEFT = {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}}


# Each schema, the param the 400 names (after BASE), and what llama-cpp-python and
# llama.cpp do with it on this build: "null grammar" crashes the engine process
# (SIGSEGV), an assert or attribute error is an INTERNAL 500.
KILLERS = [
    ({"enum": []}, "enum", "null grammar"),
    ({"type": "string", "maxLength": 1001}, "maxLength", "null grammar"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1001}, "maxItems", "null grammar"),
    ({"type": "string", "pattern": "^\\d+$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "^a\\.b$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "^[\\d]$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "^[a-z]{0,1001}$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "^(\\x41|b)$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "^a**$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "^a\\$"}, "pattern", "null grammar"),
    ({"type": "string", "pattern": "abc"}, "pattern", "AssertionError"),
    ({"type": "string", "pattern": "^(?:a)$"}, "pattern", "AssertionError"),
    ({"type": "string", "pattern": "^*a$"}, "pattern", "IndexError"),
    ({"type": "string", "pattern": "^a)$"}, "pattern", "AssertionError"),
    ({"const": "a\bb"}, "const", "null grammar"),
    ({"enum": ['say "hi"']}, "enum[0]", "null grammar"),
    ({"type": "object", "properties": {'a"b': {"type": "string"}}}, 'properties.a"b', "null grammar"),
    ({"type": "object", "properties": {"a\fb": {"type": "string"}}}, "properties.a\fb", "null grammar"),
    (_recursive("a_b"), "$defs.a_b", "null grammar"),
    (_recursive("string"), "$defs.string", "null grammar"),
    (_defs({"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}), "$defs.a", "null grammar"),
    (_defs(LEFT), "$defs.a", "null grammar"),
    (_prop({"description": "anything"}), "properties.a", "AssertionError"),
    ({"format": "email"}, "", "AssertionError"),
    ({"$schema": "https://json-schema.org/draft/2020-12/schema"}, "", "AssertionError"),
    ({"type": "array", "items": True}, "items", "AttributeError"),
    (_prop({"enum": [{"$ref": "#/x"}]}), "properties.a.enum[0].$ref", "AssertionError"),
    (_prop({"type": "string", "default": {"$ref": "#/x"}}), "properties.a.default.$ref", "AssertionError"),
    (_prop({"$ref": "#/$defs/missing"}), "properties.a.$ref", "AssertionError"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("schema", "param", "breaks"), KILLERS, ids=[f"{k[1] or 'root'}-{k[2]}" for k in KILLERS]
)
def test_a_schema_that_breaks_the_engine_is_refused_naming_its_keyword(schema, param, breaks):
    assert compile_schema(schema) == breaks  # why the rule exists, on this build
    error = refused(schema)
    assert error.param == (f"{BASE}.{param}" if param else BASE)


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        # The converter loops forever on a stray ] or } (never run here).
        ({"type": "string", "pattern": "^a]$"}, "pattern"),
        ({"type": "string", "pattern": "^a}$"}, "pattern"),
        # The converter writes a repetition out in full: a billion wedges it.
        (
            {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10**9}}},
            "properties.name.maxLength",
        ),
        ({"type": "string", "minLength": 10**9}, "minLength"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 10**6}, "minItems"),
        ({"type": "string", "pattern": "^a{1000000000}$"}, "pattern"),
    ],
)
def test_a_schema_that_wedges_the_converter_is_refused(schema, param):
    assert refused(schema).param == f"{BASE}.{param}"


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "string", "maxLength": 1e9}, "maxLength"),  # a float where an integer is meant
        ({"type": "string", "maxLength": 5.0}, "maxLength"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
        ({"type": "object", "allOf": [{"type": "object"}]}, "allOf"),
        ({"type": "object", "not": {"type": "string"}}, "not"),
        ({"type": "object", "minProperties": 1}, "minProperties"),
        ({"type": "object", "required": ["a"]}, "required"),  # no properties: the converter ignores it
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required[0]"),
        ({"type": ["string", "null"], "maxLength": 5}, "maxLength"),
        ({"anyOf": [{"type": "string"}], "properties": {}}, "properties"),
        ({"type": "array", "items": {}}, "items"),
        ({"type": "array", "maxItems": 3}, "maxItems"),
        ({"type": "array", "items": {"type": "string"}, "prefixItems": [{"type": "string"}]}, "prefixItems"),
        ({"type": "string", "pattern": "^a$", "maxLength": 3}, "maxLength"),
        ({"type": "integer", "minimum": 1e300}, "minimum"),
        ({"type": "strin"}, "type"),  # the meta-schema
        ({"anyOf": []}, "anyOf"),
        ({"$schema": "http://example.com/my-dialect"}, "$schema"),
        ({"type": "object", "properties": {"a": {"type": "string", "$defs": {}}}}, "properties.a.$defs"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}}, "$ref"),
        ({"type": "object", "properties": {"$ref": {"type": "string"}}}, "properties.$ref"),
        (_defs({"item": {"type": "string"}}), "$defs.item"),
        ({**_defs({"r": {}}), "properties": {"r": {"type": "string"}}}, "$defs.r"),  # a root property r
        ({"type": "object", "$defs": {"a": {}}, "definitions": {"a": {}}}, "definitions"),
        ({"enum": list(range(1001))}, "enum"),
    ],
)  # fmt: skip
def test_what_the_converter_would_ignore_or_the_meta_schema_refuses_is_a_400(schema, param):
    assert refused(schema).param == f"{BASE}.{param}"


def test_bounds_are_checked_in_all_of_one_schema():
    many = {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(25)}
    error = refused({"type": "object", "properties": many})
    assert "more than 20000" in error.message


def test_tool_parameters_may_not_use_refs_the_manager_cannot_resolve():
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/x"}},
        "$defs": {"x": {"type": "string"}},
    }
    schemas.check(schema, "tools[0].parameters", allow_refs=True)
    with pytest.raises(ApiError) as info:
        schemas.check(schema, "tools[0].parameters", allow_refs=False)
    assert info.value.param == "tools[0].parameters.$defs"


def test_a_schema_nested_too_deep_is_refused():
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    assert "nests deeper" in refused(schema).message


GOOD = [
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    {"type": "object", "additionalProperties": {"type": "integer"}},
    _defs(
        {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        }
    ),
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "pydantic-style",
        "type": "object",
        "definitions": {"Color": {"enum": ["red", "green"], "type": "string", "description": "a color"}},
        "properties": {
            "color": {"$ref": "#/definitions/Color"},
            "size": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": None},
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": 5,
                "uniqueItems": True,
            },
            "pair": {"type": "array", "items": [{"type": "number"}, {"type": "boolean"}]},
        },
    },
    {"type": "array", "prefixItems": [{"type": "string", "format": "date"}, {"const": {"k": [1, "\\"]}}]},
    {"enum": ["é", "日本", 1, None, True, {"a": "b"}]},
    {"type": ["string", "null"]},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "email"},
    {"type": "string", "minLength": 0, "maxLength": 1000},
    {"type": "string", "pattern": "^[a-z]{2,5}(-[0-9]+)?$"},
    {"type": "string", "pattern": "^a\\-b\\\\c\\[d\\]\\{\\}$"},
    {"type": "string", "pattern": '^[\\x41-\\x5a\\u00e9\\-\\]\\\\"]+.$'},
    {"type": "string", "pattern": "^(ab|c(d|e)*)+[^,]?$"},
    {},
]


@pytest.mark.parametrize("schema", GOOD)
def test_a_good_schema_passes_and_compiles(schema):
    schemas.check(schema, BASE)
    assert compile_schema(schema) == "ok"
