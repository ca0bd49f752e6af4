"""Grammars in GBNF: a family's tool-call section, a JSON answer, and plain text after all.

llama.cpp's sampler takes them on the GGUF engine, llguidance on the safetensors
backends (guided.py): the same grammar gives the same language on every backend.

A custom tool (free-form input) is called like a function whose arguments are
``{"input": "…"}``: every family writes its calls as JSON. Its grammar, if it has one
(allm/free_grammar.py, parsed from Lark or a regex by the gateway), holds the text
*inside* that JSON string, so each character the grammar allows appears as JSON
writes it (``\\n`` for a newline, ``\\"`` for a quote): the decoded input is in the
grammar's language.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from allm.free_grammar import Grammar, Node
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
    custom: Mapping[str, Grammar | None] | None = None,
) -> str:
    """GBNF for a call section of 1..max_calls valid calls, which ends the reply.

    Each call's arguments follow its function's parameter schema (llama.cpp's
    JSON-schema converter). With ``prefix`` (a call section found in free text),
    the grammar first repeats the text from the last token boundary up to the
    section (for hermes and mistral, up to the end of the marker, which it then
    does not repeat). ``answer``: a JSON Schema the reply may follow instead of
    calling (a JSON response format under tool_choice auto). ``think``: reasoning
    may come first (``"optional"``), or is already open in the prompt (``"open"``).
    ``custom``: the custom tools among ``functions``, each with its input grammar (None:
    any text), called as ``{"name": …, "arguments": {"input": "…"}}``.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    custom = custom or {}
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
            if fn["name"] not in custom
        ]
    }
    converter = SchemaConverter(
        prop_order={"name": 0, key: 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    calls: list[str] = []
    extra = ""
    if schema["anyOf"]:
        converter.visit(converter.resolve_refs(schema, "tools"), "json-call")
        calls.append("json-call")
    for k, fn in enumerate(f for f in functions if f["name"] in custom):
        root, rules = input_rules(custom[fn["name"]], f"x-input-{k}")
        head = gbnf_text(json.dumps({"name": fn["name"], key: {"input": ""}})[:-3])  # up to the opening quote
        extra += rules + f'x-call-{k} ::= "{head}" {root} "\\"}}}}"\n'
        calls.append(f"x-call-{k}")
    extra += f"call ::= {' | '.join(calls)}\n"
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
    rules = (strict_strings(converter.format_grammar()).rstrip("\n") + "\n" + extra).rstrip("\n")
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


# -- a custom tool's input, inside a JSON string ------------------------------------------

#: the characters JSON writes as themselves inside a string (surrogates are no characters)
_PLAIN = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0xD7FF), (0xE000, 0x10FFFF))
#: any JSON string content, for a custom tool whose input is free text
_ANY_JSON_CHAR = '[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def gbnf_text(text: str) -> str:
    """``text`` as the inside of a GBNF literal (llama.cpp reads \\xHH, not JSON's \\b or \\f)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def _class_char(cp: int) -> str:
    """A class's character as GBNF writes it: itself where it can (llguidance's reader makes
    \\U escapes into regexes its own regex engine refuses), else \\xHH."""
    if (0x20 < cp < 0x7F and chr(cp) not in "]\\-^[") or cp >= 0xA0:
        return chr(cp)
    return f"\\x{cp:02X}"


#: the characters JSON escapes with a letter, by code point (json.dumps's own spelling)
_SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}


def _json_class(ranges: list[list[int]]) -> str:
    """One character of ``ranges``, as JSON writes it inside a string (json.dumps's spelling).

    Two alternatives at most, a class and one backslash escape: llama.cpp's grammar
    sampler checks every token against every alternative, so each one costs every step.
    """
    plain = []
    for lo, hi in ranges:
        for a, b in _PLAIN:
            if max(lo, a) <= min(hi, b):
                plain.append((max(lo, a), min(hi, b)))
    members = [cp for cp in [*range(0x20), 0x22, 0x5C] if any(lo <= cp <= hi for lo, hi in ranges)]
    escapes = []
    letters = [_SHORT_ESCAPES[cp] for cp in members if cp in _SHORT_ESCAPES]
    if letters:
        escapes.append("[" + "".join(_class_char(ord(c)) for c in letters) + "]")
    by_high = {
        high: [cp & 0xF for cp in members if cp not in _SHORT_ESCAPES and cp >> 4 == high] for high in (0, 1)
    }
    hexes = [f'"{high}" [{"".join(f"{low:x}" for low in lows)}]' for high, lows in by_high.items() if lows]
    if hexes:
        escapes.append('"u00" ' + (hexes[0] if len(hexes) == 1 else "(" + " | ".join(hexes) + ")"))
    options = []
    if plain:
        spans = "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}" for a, b in plain)
        options.append(f"[{spans}]")
    if escapes:
        options.append('"\\\\" ' + (escapes[0] if len(escapes) == 1 else "(" + " | ".join(escapes) + ")"))
    if not options:
        raise invalid("tools", "a custom tool's grammar has a class of no character")
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _render(node: Node, names: Mapping[str, str]) -> str:
    kind = node[0]
    if kind == "lit":
        return f'"{gbnf_text(json.dumps(node[1], ensure_ascii=False)[1:-1])}"'
    if kind == "cls":
        return _json_class(node[1])
    if kind == "ref":
        return names[node[1]]
    if kind == "seq":
        return "(" + " ".join(_render(part, names) for part in node[1]) + ")" if node[1] else '""'
    if kind == "alt":
        return "(" + " | ".join(_render(part, names) for part in node[1]) + ")"
    inner, low, high = _render(node[1], names), node[2], node[3]
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    if suffix is None:
        suffix = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
    return f"({inner}){suffix}"


def input_rules(grammar: Grammar | None, name: str) -> tuple[str, str]:
    """GBNF for a custom tool's input inside a JSON string: (the root rule's name, the rules).

    ``grammar`` (checked by ``allm.free_grammar.check``) None: any text."""
    if grammar is None:
        return f"{name}-char*", f"{name}-char ::= {_ANY_JSON_CHAR}\n"
    names = {rule: f"{name}-{i}" for i, rule in enumerate(sorted(grammar["rules"]))}
    rules = "".join(f"{names[rule]} ::= {_render(node, names)}\n" for rule, node in grammar["rules"].items())
    return names[grammar["start"]], rules
