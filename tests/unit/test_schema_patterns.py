"""Schema patterns: the regex subset llama.cpp's converter turns into valid GBNF, and hints for the rest."""

from __future__ import annotations

import re

import pytest

from allm.gateway.errors import ApiError
from allm.gateway.patterns import check_pattern

from .grammar import compile_schema

GOOD = [
    "^abc$",
    "^$",
    "^a.b$",
    "^[a-z]+$",
    "^[^,]*$",
    "^[-a]$",
    "^[a-]$",
    "^(ab|cd)?e{2}f{1,}g{0,3}$",
    "^((a|b)c)*$",
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
    "^\\(\\)\\[\\]\\{\\}\\*\\+\\?\\|$",
    '^say \\"hi\\"$',
    "^tab\\there$",
    "^[\\x20-\\x7e\\u00e9]$",
    "^[\\[\\]\\-\\\\]$",
    "^日本語?$",
    "^a{1000}$",
]


@pytest.mark.parametrize("pattern", GOOD)
def test_a_supported_pattern_passes_matches_python_and_compiles(pattern):
    check_pattern(pattern, "p")
    re.compile(pattern)  # the meta-schema's format check compiles it too
    assert compile_schema({"type": "string", "pattern": pattern}) == "ok"


@pytest.mark.parametrize(
    ("pattern", "hint"),
    [
        ("^\\d+$", "write [0-9]"),
        ("^\\w$", "write [a-zA-Z0-9_]"),
        ("^\\s$", "write [ \\t\\n\\r]"),
        ("^a\\.b$", "write [.]"),
        ("^a\\/b$", "write / unescaped"),
        ("^\\x41$", "put it in a class"),
        ("^[\\d]$", "write [0-9]"),
        ("^[\\.]$", "write [.]"),
        ("^[\\q]$", "no GBNF equivalent"),
        ("^a]$", "a stray ']'"),
        ("^a}$", "a stray '}'"),
        ("^a)$", "unbalanced ')'"),
        ("^(a$", "unbalanced '('"),
        ("^[ab$", "unterminated class"),
        ("^[]$", "empty class"),
        ("^[z-a]$", "backwards"),
        ("^(?:a)$", "(?…) groups"),
        ("^*a$", "nothing to repeat"),
        ("^a**$", "one quantifier per item"),
        ("^a+?$", "one quantifier per item"),
        ("^a|b$", "wrap alternatives in a group"),
        ("^(a|)$", "empty group or alternative"),
        ("^()$", "empty group or alternative"),
        ("^a{2,1}$", "run backwards"),
        ("^a{,3}$", "{n}, {n,} or {n,m}"),
        ("^a{1001}$", "at most 1000"),
        ("^\\-*$", "cannot take a quantifier"),
        ('^"*$', "cannot take a quantifier"),
        ("^a^b$", "only supported as the anchor"),
        ("abc", "anchored"),
        ("^abc", "anchored"),
        ("^a\\$", "anchored"),
        ("^a\\", "anchored"),
        ("^a\x00$", "control characters"),
        ("^" + "a" * 1000 + "$", "at most 1000 characters"),
        ("^" + "(" * 17 + "a" + ")" * 17 + "$", "nest at most 16"),
    ],
)
def test_an_unsupported_pattern_is_refused_with_a_hint(pattern, hint):
    with pytest.raises(ApiError) as info:
        check_pattern(pattern, "text.format.schema.pattern")
    assert info.value.param == "text.format.schema.pattern"
    assert hint in info.value.message


def test_repetitions_are_counted_for_the_schema_budget():
    assert check_pattern("^a{0,300}b{5}(c|d)*$", "p") == 300 + 5 + 1
