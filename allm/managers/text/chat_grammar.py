"""Grammars in GBNF: a family's tool-call section, a JSON answer, and plain text after all.

llama.cpp's sampler takes them on the GGUF engine, llguidance on the safetensors
backends (guided.py): the same grammar gives the same language on every backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from allm.managers.text.chat_format import SYNTAXES, Family
from allm.managers.text.sampling import Sampling, invalid

#: llama-cpp-python's converter lets JSON strings hold raw control characters, which JSON
#: forbids: a small model then runs on inside a string with newlines and never closes it.
#: llama.cpp's own converter excludes them; so does every grammar allm compiles.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def strict_strings(gbnf: str) -> str:
    """A converter's grammar with JSON's own rule for string characters."""
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)


def gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_grammar(
    family: Family,
    functions: Sequence[Mapping[str, Any]],
    *,
    max_calls: int,
    prefix: str | None = None,
    answer: Mapping[str, Any] | None = None,
    think: str | None = None,
) -> str:
    """GBNF for a call section of 1..max_calls valid calls, which ends the reply.

    Each call's arguments follow its function's parameter schema (llama.cpp's
    JSON-schema converter). With ``prefix`` (a call section found in free text),
    the grammar first repeats the text from the last token boundary up to the
    section (for hermes and mistral, up to the end of the marker, which it then
    does not repeat). ``answer``: a JSON Schema the reply may follow instead of
    calling (a JSON response format under tool_choice auto). ``think``: reasoning
    may come first (``"optional"``), or is already open in the prompt (``"open"``).
    """
    from llama_cpp.llama_grammar import SchemaConverter

    key = "parameters" if family is Family.LLAMA3 else "arguments"
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    key: fn.get("parameters") or {"type": "object"},
                },
                "required": ["name", key],
                "additionalProperties": False,
            }
            for fn in functions
        ]
    }
    converter = SchemaConverter(
        prop_order={"name": 0, key: 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    converter.visit(converter.resolve_refs(schema, "tools"), "call")
    if answer is not None:
        converter.visit(converter.resolve_refs(dict(answer), "answer"), "answer")
    more = max(0, max_calls - 1)
    others = f' (", " call){{0,{more}}}' if more else ""  # llguidance refuses a {0,0}
    consumed = SYNTAXES[family].consumed if family in SYNTAXES else False
    after_marker = prefix is not None and consumed
    if family is Family.HERMES:
        block = '"<tool_call>\\n" call "\\n</tool_call>"'
        first = '"\\n" call "\\n</tool_call>"' if after_marker else block
        section = first + (f' ("\\n" {block}){{0,{more}}}' if more else "")
    elif family is Family.LLAMA3:
        section = "call"
    elif family is Family.MISTRAL:
        marker = "" if after_marker else '"[TOOL_CALLS]" '
        section = f'{marker}"[" call{others} "]"'
    else:
        section = f'"{{\\"tool_calls\\": [" call{others} "]}}"'
    lead = f"{gbnf_literal(prefix)} " if prefix else ""
    if answer is not None:
        section = f"(answer | {section})"
    rules = strict_strings(converter.format_grammar()).rstrip("\n")
    if think is not None:
        rules += '\nthink-body ::= ([^<] | "<" [^/])*'
        if think == "open":
            lead += 'think-body "</think>" [ \\n]* '
        else:
            lead += '("<think>" think-body "</think>" [ \\n]*)? '
    return rules + f"\nroot ::= {lead}{section}\n"


TEXT_ONLY_GRAMMAR = "root ::= [ \\t\\n]* [^{ \\t\\n] [^\\x00]*\n"


def json_gbnf(sampling: Sampling) -> str | None:
    """The GBNF a JSON ``response_format`` holds the reply to (llama.cpp's converter), if any.

    llama-cpp-python is imported only here and in ``call_grammar``: a safetensors model's
    manager loads llama.cpp only once a request asks for a grammar.
    """
    if sampling.json_schema is None and not sampling.json_object:
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if sampling.json_schema is not None:
        try:
            return strict_strings(json_schema_to_gbnf(json.dumps(sampling.json_schema)))
        except (AssertionError, ValueError, TypeError, KeyError, RecursionError) as exc:
            # The converter reports what it cannot take with asserts, among others.
            raise invalid(
                "response_format", f"the JSON schema cannot be turned into a grammar: {exc}"
            ) from exc
    return str(JSON_GBNF)
