"""The typed nodes request bodies are made of: exact types, ranges, paths in param, null as absent."""

from __future__ import annotations

import jsonschema
import pytest

from allm.gateway.errors import ApiError
from allm.gateway.spec import (
    AnyJson,
    Arr,
    Bool,
    Either,
    Enum,
    Int,
    Map,
    Num,
    Obj,
    Str,
    Tagged,
    tagged_variant,
)

BODY = Obj(
    fields={
        "name": Str(min_length=1, max_length=8, pattern="[a-z]+"),
        "count": Int(minimum=1, maximum=10),
        "ratio": Num(minimum=0, maximum=1),
        "flag": Bool(),
        "kind": Enum(values=("a", "b")),
        "items": Arr(items=Obj(fields={"x": Int(minimum=0, maximum=5)}, required=("x",)), max_items=2),
        "either": Either(options=(Str(max_length=3), Arr(items=Str(max_length=3), max_items=2))),
        "tags": Map(values=Str(max_length=4), keys=Str(min_length=1, max_length=3), max_properties=2),
        "part": Tagged(
            tag="type",
            default="text",
            variants={"text": tagged_variant("type", {"text": Str(max_length=5)}, ("text",))},
            unsupported={"image": "text only"},
        ),
        "any": AnyJson(),
    },
    required=("name",),
)


def refused(value) -> ApiError:
    with pytest.raises(ApiError) as info:
        BODY.check(value, "")
    assert (info.value.status, info.value.code) == (400, "invalid_value")
    return info.value


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "name", "is required"),
        ({"name": None}, "name", "is required"),
        ({"name": "ABC"}, "name", "must match"),
        ({"name": ""}, "name", "1 to 8 characters"),
        ({"name": "a", "count": True}, "count", "an integer, got a boolean"),
        ({"name": "a", "count": 2.0}, "count", "an integer, got a number"),
        ({"name": "a", "count": 11}, "count", "from 1 to 10"),
        ({"name": "a", "ratio": "0.5"}, "ratio", "a number, got a string"),
        ({"name": "a", "ratio": 1.5}, "ratio", "from 0 to 1"),
        ({"name": "a", "flag": 1}, "flag", "a boolean"),
        ({"name": "a", "kind": "c"}, "kind", "one of ['a', 'b'], got 'c'"),
        ({"name": "a", "kind": 1}, "kind", "got an integer"),
        ({"name": "a", "items": [{"x": 1}, {"x": 9}]}, "items[1].x", "from 0 to 5"),
        ({"name": "a", "items": [{}]}, "items[0].x", "is required"),
        ({"name": "a", "items": [{"x": 1}] * 3}, "items", "0 to 2 items"),
        ({"name": "a", "either": 5}, "either", "a string or an array"),
        ({"name": "a", "either": ["toolong"]}, "either[0]", "0 to 3 characters"),
        ({"name": "a", "tags": {"k": 1}}, "tags.k", "a string"),
        ({"name": "a", "tags": {"long-key": "v"}}, "tags", "keys of 'tags'"),
        ({"name": "a", "tags": {"a": "", "b": "", "c": ""}}, "tags", "at most 2 keys"),
        ({"name": "a", "part": {"type": "image"}}, "part", "'image' is not supported: text only"),
        ({"name": "a", "part": {"type": "video"}}, "part", "must be one of ['text']"),
    ],
)
def test_a_bad_value_is_refused_naming_its_path(body, param, words):
    error = refused(body)
    assert error.param == param
    assert words in error.message


def test_an_unknown_field_is_dropped_and_noted_where_the_app_collects_them():
    from allm.gateway.spec import IGNORED

    noted: list[str] = []
    token = IGNORED.set(noted)
    try:
        out = BODY.check({"name": "a", "pad": 1, "part": {"text": "x", "extra": 1}, "x" * 80: 0}, "")
    finally:
        IGNORED.reset(token)
    assert out == {"name": "a", "part": {"text": "x"}}
    assert sorted(noted) == sorted(["pad", "part.extra", "x" * 64 + "…"])
    # outside a request nothing is collected, and nothing is refused
    assert BODY.check({"name": "a", "pad": 1}, "") == {"name": "a"}


def test_a_bad_value_of_a_known_field_beside_an_unknown_one_is_still_refused():
    error = refused({"name": "a", "pad": 1, "count": 11})
    assert error.param == "count"


def test_null_means_absent_and_is_dropped():
    out = BODY.check({"name": "a", "count": None, "part": {"type": None, "text": "x"}}, "")
    assert out == {"name": "a", "part": {"text": "x"}}


def test_a_tagged_union_can_name_its_tag():
    roles = Tagged(tag="role", param_at_tag=True, variants={"user": tagged_variant("role", {})})
    with pytest.raises(ApiError) as info:
        roles.check({"role": "wizard"}, "messages[0]")
    assert info.value.param == "messages[0].role"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "a"},
        {
            "name": "abc",
            "count": 10,
            "ratio": 0,
            "flag": False,
            "kind": "b",
            "items": [{"x": 0}],
            "either": "ab",
        },
        {
            "name": "a",
            "either": ["a", "b"],
            "tags": {"k": "v"},
            "part": {"text": "hi"},
            "any": [{"deep": None}],
        },
        {"name": "a", "part": {"type": "text", "text": ""}, "count": None},
    ],
)
def test_a_valid_body_passes_and_matches_its_rendered_schema(body):
    BODY.check(body, "")
    jsonschema.Draft202012Validator(BODY.schema()).validate(body)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "A"},
        {"name": "a", "count": 0},
        {"name": "a", "part": {"type": "x"}},
    ],
)
def test_an_invalid_body_fails_the_rendered_schema_too(body):
    refused(body)
    assert not jsonschema.Draft202012Validator(BODY.schema()).is_valid(body)


def test_either_needs_options_of_distinct_json_types():
    with pytest.raises(ValueError, match="distinct"):
        Either(options=(Str(max_length=1), Enum(values=("a",))))
