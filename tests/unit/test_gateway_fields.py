"""Reading a request body: the bounds that once let hostile JSON through as a 500."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from allm.gateway.errors import ApiError
from allm.gateway.fields import MAX_DEPTH, json_body, parse_json_text


def refused(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        json_body(SimpleNamespace(body=raw))
    assert info.value.status == 400
    return info.value


def test_a_body_nested_ten_thousand_deep_is_invalid_json():
    # json.loads raises RecursionError on this (a 500 before)
    error = refused(b"[" * 10_000 + b"]" * 10_000)
    assert error.code == "invalid_json"
    assert "nests deeper" in error.message


def test_a_body_nested_past_the_bound_but_within_pythons_limit_is_refused():
    error = refused(b'{"model": "m", "x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}")
    assert (error.code, error.param) == ("invalid_json", None)
    json_body(SimpleNamespace(body=b'{"x": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}"))


def test_a_five_thousand_digit_integer_is_invalid_json():
    # Python refuses to convert it (ValueError inside json.loads: a 500 before)
    error = refused(b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert error.code == "invalid_json"
    assert "5000 digits" in error.message


@pytest.mark.parametrize(("value", "param"), [(2**64 + 1, "max_tokens"), (-(2**63) - 1, "seed")])
def test_an_integer_outside_64_bits_is_refused_naming_the_field(value, param):
    error = refused(b'{"%s": %d}' % (param.encode(), value))
    assert (error.code, error.param) == ("invalid_value", param)


def test_the_edges_of_int64_are_accepted():
    body = json_body(SimpleNamespace(body=b'{"a": %d, "b": %d}' % (2**63 - 1, -(2**63))))
    assert body == {"a": 2**63 - 1, "b": -(2**63)}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
        (b'{"input": ["a", "b\\udfffc"]}', "input[1]"),
        (b'{"metadata": {"\\ud800": "x"}}', "metadata"),
        (b'"\\ud800"', None),
    ],
)
def test_a_lone_surrogate_is_refused_naming_where_it_is(raw, param):
    error = refused(raw)
    if param is None:  # not even an object
        assert error.code == "invalid_json"
    else:
        assert (error.code, error.param) == ("invalid_value", param)
        assert "surrogate" in error.message


def test_a_surrogate_pair_is_one_character_and_fine():
    assert json_body(SimpleNamespace(body=b'{"a": "\\ud83d\\ude00"}')) == {"a": "\U0001f600"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"temperature": NaN}',
        b'{"temperature": Infinity}',
        b'{"temperature": -Infinity}',
        b'{"temperature": 1e400}',
        b"\xff\xfe{}",
        b'{"a": "\xc3\x28"}',
        b"",
        b"{not json",
        b"[]",
        b"null",
    ],
)
def test_what_is_not_a_json_object_in_utf8_is_invalid_json(raw):
    assert refused(raw).code == "invalid_json"


def test_json_text_inside_a_field_is_held_to_the_same_bounds():
    assert parse_json_text('{"city": "Paris"}', "args") == {"city": "Paris"}
    for text in ("{not json", "[" * 5000 + "]" * 5000, "1" * 5000, '"\\ud800"', "NaN"):
        with pytest.raises(ApiError) as info:
            parse_json_text(text, "messages[1].tool_calls[0].function.arguments")
        assert info.value.param == "messages[1].tool_calls[0].function.arguments"
