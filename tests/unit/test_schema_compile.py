"""The property behind allm/gateway/schemas.py: the edge accepts what compiles in llama.cpp, nothing else."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allm.gateway import schemas
from allm.gateway.errors import ApiError

from .grammar import compile_schema

SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))

NAMES = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_ .-]{0,8}", fullmatch=True)
PLAIN = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"'), max_size=8)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), PLAIN)
LITERALS = st.one_of(VALUES, st.lists(VALUES, max_size=3), st.dictionaries(NAMES, VALUES, max_size=3))
ANNOTATE = st.fixed_dictionaries({}, optional={"description": PLAIN, "title": PLAIN})

ATOMS = st.sampled_from(
    ["a", "b", "-", "é", " ", ".", "[a-z]", "[^,\\]]", "[\\x41-\\x5a]", "\\-", "\\(", "\\\\"]
)
QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,}", "{0,40}"])


@st.composite
def patterns(draw: Any) -> str:
    def sequence(depth: int) -> str:
        out = ""
        for _ in range(draw(st.integers(1, 4))):
            if depth < 2 and draw(st.booleans()):
                inner = "|".join(sequence(depth + 1) for _ in range(draw(st.integers(1, 3))))
                out += f"({inner})" + draw(QUANTIFIERS)
            else:
                atom = draw(ATOMS)
                out += atom + ("" if atom.startswith("\\") else draw(QUANTIFIERS))
        return out

    return "^" + sequence(0) + "$"


def leaves() -> st.SearchStrategy[dict[str, Any]]:
    bounded = st.integers(0, 50).flatmap(
        lambda low: st.fixed_dictionaries(
            {"type": st.just("string"), "minLength": st.just(low), "maxLength": st.integers(low, 60)}
        )
    )
    return st.one_of(
        st.sampled_from(
            [{"type": t} for t in ("string", "number", "integer", "boolean", "null", "object", "array")]
        ),
        bounded,
        st.fixed_dictionaries(
            {"type": st.just("string"), "format": st.sampled_from(["date", "time", "uuid", "email"])}
        ),
        st.fixed_dictionaries({"type": st.just("string"), "pattern": patterns()}),
        st.fixed_dictionaries({"enum": st.lists(LITERALS, min_size=1, max_size=5)}),
        st.fixed_dictionaries({"const": LITERALS}),
        st.just({}),
        st.just({"type": ["string", "null"]}),
        st.fixed_dictionaries(
            {"type": st.just("integer"), "minimum": st.integers(-100, 0), "maximum": st.integers(0, 100)}
        ),
    )


def extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(NAMES, children, max_size=4).flatmap(
        lambda props: st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.just(props),
                "required": st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
            },
            optional={"additionalProperties": st.one_of(st.booleans(), children)},
        )
    )
    arrays = st.integers(0, 5).flatmap(
        lambda low: st.fixed_dictionaries(
            {"type": st.just("array"), "items": children.filter(bool), "minItems": st.just(low)},
            optional={"maxItems": st.integers(low, 8)},
        )
    )
    return st.one_of(
        objects,
        arrays,
        st.fixed_dictionaries(
            {"type": st.just("array"), "prefixItems": st.lists(children, min_size=1, max_size=3)}
        ),
        st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=3)}),
    )


# annotations ride on a typed schema only: {} with a description alone is refused (the converter asserts)
SUBSET = st.recursive(leaves(), extend, max_leaves=12).flatmap(
    lambda schema: ANNOTATE.map(lambda notes: {**schema, **notes}) if schema else st.just(schema)
)
RECURSIVE = st.builds(
    lambda name, extra: {
        "type": "object",
        "properties": {"root": {"$ref": f"#/$defs/{name}"}},
        "$defs": {
            name: {
                "type": "object",
                "properties": {
                    "value": extra,
                    "children": {"type": "array", "items": {"$ref": f"#/$defs/{name}"}},
                },
            }
        },
    },
    st.from_regex(r"[A-Z][a-zA-Z0-9]{0,6}[a-zA-Z]", fullmatch=True),
    SUBSET,
)


@SETTINGS
@given(st.one_of(SUBSET, RECURSIVE))
def test_every_schema_in_the_supported_subset_is_accepted_and_compiles(schema):
    schemas.check(schema, "schema")
    assert compile_schema(schema) == "ok"


KEYWORDS = sorted(schemas.STRUCTURE | schemas.ANNOTATIONS | schemas.NOT_ENFORCED | {"$defs", "allOf", "not"})
WILD = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 2000),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(
            ["string", "object", "array", "integer", "^a$", "^\\d$", "^[a-z]{2}$", '"', "a_b", "#/$defs/a"]
        ),
        st.text(max_size=6),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(["a", "a_b", "string", "$ref"])),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=20,
)


def refusal(schema: dict[str, Any]) -> ApiError | None:
    try:
        schemas.check(schema, "schema")
    except ApiError as exc:
        return exc
    return None


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYWORDS), WILD, max_size=5))
def test_a_random_schema_is_refused_or_compiles_never_accepted_and_broken(schema):
    error = refusal(schema)
    if error is None:
        assert compile_schema(schema) == "ok", schema
    else:
        assert (error.status, error.param.split(".")[0].split("[")[0]) == (400, "schema")


REGEX_BITS = st.text(st.sampled_from(list('^$[]{}()|*+?.\\-"dwx41az,é ')), max_size=10)
MUTATIONS = st.one_of(
    st.tuples(st.sampled_from(["maxLength", "minLength", "maxItems", "minItems"]), st.integers(0, 3000)),
    st.tuples(st.just("pattern"), REGEX_BITS.map(lambda s: "^" + s + "$")),
    st.tuples(st.just("pattern"), REGEX_BITS),
    st.tuples(
        st.sampled_from(["enum", "const", "default", "examples"]), st.lists(LITERALS | st.text(), max_size=3)
    ),
    st.tuples(st.just("const"), st.text(max_size=4)),
    st.tuples(
        st.just("properties"), st.dictionaries(st.text(max_size=4), st.just({"type": "string"}), max_size=2)
    ),
    st.tuples(st.just("required"), st.lists(st.text(max_size=2), max_size=2)),
    st.tuples(
        st.sampled_from(["items", "additionalProperties"]),
        st.sampled_from([{}, True, False, {"type": "string"}]),
    ),
    st.tuples(
        st.just("$ref"), st.sampled_from(["#/$defs/a", "#/$defs/a_b", "#", "#/properties/x", "http://x/y"])
    ),
    st.tuples(
        st.just("$defs"),
        st.dictionaries(st.sampled_from(["a", "a_b", "string", "item", "A1"]), st.just({"type": "string"})),
    ),
    st.tuples(
        st.sampled_from(["type", "format"]),
        st.sampled_from(["string", "object", "array", "uuid", "date-time"]),
    ),
    st.tuples(st.sampled_from(["anyOf", "oneOf", "allOf"]), st.lists(st.just({"type": "null"}), max_size=2)),
)


@st.composite
def mutated(draw: Any) -> dict[str, Any]:
    schema = copy.deepcopy(draw(SUBSET))  # strategies share their objects: never mutate those
    nodes, stack = [], [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            nodes.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    for _ in range(draw(st.integers(1, 3))):
        key, value = draw(MUTATIONS)
        draw(st.sampled_from(nodes))[key] = copy.deepcopy(value)
    return schema


@SETTINGS
@given(mutated())
def test_a_mutated_schema_is_refused_or_compiles_never_accepted_and_broken(schema):
    error = refusal(schema)
    if error is None:
        assert compile_schema(schema) == "ok", schema
    else:
        assert (error.status, error.param.split(".")[0].split("[")[0]) == (400, "schema")
