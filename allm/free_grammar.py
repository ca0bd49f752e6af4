"""A custom tool's input grammar as data: the shape the gateway sends and the text manager renders.

The Responses API lets a custom tool hold its free-form input to a grammar, written in
Lark or as a regular expression. The gateway parses either into this one form (and
refuses, naming the field, what it cannot carry faithfully); the text manager renders
it as GBNF for its grammar engines. Both sides check it here, because the gateway may
not import a manager: the gateway to refuse a client's grammar with its path, the
manager because a request's parameters come from a peer.

A grammar is ``{"start": NAME, "rules": {NAME: NODE, ...}}``; a node is a list:

    ["lit", TEXT]                  the text itself
    ["cls", [[LO, HI], ...]]       one character whose code point is in a range (inclusive)
    ["seq", [NODE, ...]]           each in turn ([] matches the empty text)
    ["alt", [NODE, ...]]           any one of them (at least one)
    ["rep", NODE, MIN, MAX]        MIN to MAX times; MAX None: no upper bound
    ["ref", NAME]                  the rule of that name

Imports nothing.
"""

from __future__ import annotations

from typing import Any

MAX_CODE_POINT = 0x10FFFF
#: a repetition's bounds: llama.cpp writes ``x{m,n}`` out as n copies of x
MAX_REPEAT = 1000
#: all repetitions' copies together (as gateway/schemas.py bounds a JSON Schema's)
MAX_REPEAT_TOTAL = 20_000
#: nodes of all rules together, and how deep they nest: a rendered grammar stays small
MAX_NODES = 20_000
MAX_DEPTH = 64
MAX_RULES = 1000
MAX_NAME = 128

Grammar = dict[str, Any]
Node = list[Any]


class GrammarError(ValueError):
    """A grammar this form cannot hold, or one llama.cpp would refuse; the message says why."""


def check(grammar: Any) -> Grammar:
    """The grammar if it is well formed (every rule defined, nothing left-recursive), else GrammarError."""
    if not isinstance(grammar, dict) or set(grammar) != {"start", "rules"}:
        raise GrammarError("a grammar is an object with 'start' and 'rules'")
    rules = grammar["rules"]
    if not isinstance(rules, dict) or not rules or len(rules) > MAX_RULES:
        raise GrammarError(f"a grammar has 1 to {MAX_RULES} rules")
    for name in rules:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise GrammarError(f"a rule name is 1 to {MAX_NAME} characters long")
    if grammar["start"] not in rules:
        raise GrammarError(f"the grammar has no rule {grammar['start']!r} to start from")
    count = [0, 0]  # parts, and the copies repetitions make
    for name, node in rules.items():
        _check_node(node, rules, name, 0, count)
    if count[1] > MAX_REPEAT_TOTAL:
        raise GrammarError(f"the grammar's repetitions make more than {MAX_REPEAT_TOTAL} copies in all")
    _refuse_left_recursion(rules)
    return grammar


def _check_node(node: Any, rules: dict[str, Any], rule: str, depth: int, count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise GrammarError(f"the grammar has more than {MAX_NODES} parts")
    if depth > MAX_DEPTH:
        raise GrammarError(f"rule {rule!r} nests deeper than {MAX_DEPTH}")
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise GrammarError(f"rule {rule!r} holds a part that is not a node")
    kind = node[0]
    if kind == "lit" and len(node) == 2 and isinstance(node[1], str):
        return
    if kind == "cls" and len(node) == 2 and isinstance(node[1], list) and node[1]:
        for pair in node[1]:
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(c, int) and not isinstance(c, bool) for c in pair)
                and 0 <= pair[0] <= pair[1] <= MAX_CODE_POINT
            ):
                raise GrammarError(f"rule {rule!r} holds a character range that is not one")
        return
    if kind in ("seq", "alt") and len(node) == 2 and isinstance(node[1], list):
        if kind == "alt" and not node[1]:
            raise GrammarError(f"rule {rule!r} holds a choice of nothing")
        for part in node[1]:
            _check_node(part, rules, rule, depth + 1, count)
        return
    if kind == "rep" and len(node) == 4:
        low, high = node[2], node[3]
        bounded = high is None or (isinstance(high, int) and not isinstance(high, bool))
        if not (isinstance(low, int) and not isinstance(low, bool) and bounded):
            raise GrammarError(f"rule {rule!r} holds a repetition without integer bounds")
        if not 0 <= low <= MAX_REPEAT or (high is not None and not max(low, 1) <= high <= MAX_REPEAT):
            raise GrammarError(f"a repetition's bounds must be 0 to {MAX_REPEAT}, its most at least 1")
        count[1] += low if high is None else high
        _check_node(node[1], rules, rule, depth + 1, count)
        return
    if kind == "ref" and len(node) == 2 and isinstance(node[1], str):
        if node[1] not in rules:
            raise GrammarError(f"rule {rule!r} refers to {node[1]!r}, which is not defined")
        return
    raise GrammarError(f"rule {rule!r} holds a node llama.cpp cannot take: {str(node)[:80]}")


def nullable_rules(rules: dict[str, Node]) -> set[str]:
    """The rules that can match the empty text (a fixed point)."""
    empty: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, node in rules.items():
            if name not in empty and _nullable(node, empty):
                empty.add(name)
                changed = True
    return empty


def _nullable(node: Node, empty: set[str]) -> bool:
    kind = node[0]
    if kind == "lit":
        return not node[1]
    if kind == "cls":
        return False
    if kind == "seq":
        return all(_nullable(part, empty) for part in node[1])
    if kind == "alt":
        return any(_nullable(part, empty) for part in node[1])
    if kind == "rep":
        return bool(node[2] == 0 or _nullable(node[1], empty))
    return node[1] in empty


def _leftmost(node: Node, empty: set[str], out: set[str]) -> None:
    """The rules that may begin what ``node`` matches, with nothing before them."""
    kind = node[0]
    if kind == "ref":
        out.add(node[1])
    elif kind == "seq":
        for part in node[1]:
            _leftmost(part, empty, out)
            if not _nullable(part, empty):
                break
    elif kind == "alt":
        for part in node[1]:
            _leftmost(part, empty, out)
    elif kind == "rep":
        _leftmost(node[1], empty, out)


def _empty_loops(node: Node, empty: set[str]) -> bool:
    """Whether ``node`` repeats, without bound, something that can match the empty text."""
    kind = node[0]
    if kind in ("seq", "alt"):
        return any(_empty_loops(part, empty) for part in node[1])
    if kind == "rep":
        return (node[3] is None and _nullable(node[1], empty)) or _empty_loops(node[1], empty)
    return False


def _refuse_left_recursion(rules: dict[str, Node]) -> None:
    """llama.cpp refuses a rule that can reach itself before matching any character (an unbounded
    repetition of what may be empty is such a rule once llama.cpp has expanded it)."""
    empty = nullable_rules(rules)
    for name, node in rules.items():
        if _empty_loops(node, empty):
            raise GrammarError(
                f"rule {name!r} repeats without bound something that can be empty, which llama.cpp refuses"
            )
    first: dict[str, set[str]] = {}
    for name, node in rules.items():
        first[name] = set()
        _leftmost(node, empty, first[name])
    for name in rules:
        seen: set[str] = set()
        todo = list(first[name])
        while todo:
            other = todo.pop()
            if other == name:
                raise GrammarError(
                    f"rule {name!r} is left-recursive (it can begin with itself), which llama.cpp refuses"
                )
            if other not in seen:
                seen.add(other)
                todo.extend(first[other])
