"""A custom tool's input format: a Lark or regex definition, parsed into the grammar form the manager renders.

What a definition means here is the language it describes, read as a context-free
grammar whose terminals are regular languages (what Lark's Earley parser with a
complete dynamic lexer accepts); the text manager holds a custom call's input to that
language with llama.cpp's grammar sampler (allm/free_grammar.py is the form).

Lark: rules and terminals (``name: …``, ``NAME: …``, with the ``?`` and ``!`` prefixes
and ``.N`` priorities, which shape the parse tree, not the language), ``|``, aliases
``-> name`` (tree only), groups ``( … )``, optional ``[ … ]``, ``?``, ``*``, ``+``,
``~ n`` and ``~ n..m``, strings ``"…"`` and ``"…"i``, ranges ``"a".."z"``, regular
expressions ``/…/``, and ``%import common.NAME`` (or ``%import common (A, B)``) for the
common terminals in ``COMMON``. The grammar begins at ``start``.

Regular expressions (Lark's ``/…/`` and the ``regex`` syntax, matched against the whole
input): literal characters and escapes, ``.`` (any character but a newline), classes
``[…]`` and ``[^…]``, ``\\d``, ``\\w`` and ``\\s`` in their ASCII sense (narrower than the
Unicode sense Python and Rust give them: what the model writes still matches), groups
``( … )``, ``(?: … )``, ``(?P<n> … )``, ``|``, the quantifiers ``* + ? {n} {n,} {n,m}`` and
their lazy forms (laziness changes what a search finds, not which texts match), ``^``
first and ``$`` last.

Refused, each with the field's path and the construct, because no grammar of this form
says the same: ``%ignore`` (a lexer skips those terminals between any two tokens),
``%declare``, ``%override``, ``%extend``, other imports and unknown common terminals,
templates ``rule{…}``, regexp flags; in regular expressions ``\\D``, ``\\W``, ``\\S`` and
``\\d``, ``\\w``, ``\\s`` inside ``[^…]`` (their ASCII sense would let in characters the
Unicode sense keeps out), ``\\b``, ``\\B`` and other anchors, backreferences, lookaround,
inline flags, ``\\p{…}``, possessive quantifiers, POSIX classes and class set operations;
and from the grammar as a whole, left recursion and unbounded repetition of what can
be empty (llama.cpp refuses both), repetitions past 1000, and classes of no character.
"""

from __future__ import annotations

import re
from typing import Any

from allm import free_grammar
from allm.free_grammar import MAX_CODE_POINT, MAX_DEPTH, MAX_REPEAT, Grammar, GrammarError, Node

MAX_DEFINITION = 65536  # characters of one definition

DIGITS: list[list[int]] = [[0x30, 0x39]]
WORD: list[list[int]] = [[0x30, 0x39], [0x41, 0x5A], [0x5F, 0x5F], [0x61, 0x7A]]
SPACE: list[list[int]] = [[0x09, 0x0D], [0x20, 0x20]]
DOT: Node = ["cls", [[0, 0x09], [0x0B, MAX_CODE_POINT]]]
SHORTHANDS = {"d": DIGITS, "w": WORD, "s": SPACE}
CONTROL_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07}
ANCHORS = set("bBAzZG")


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def _complement(ranges: list[list[int]]) -> list[list[int]]:
    out, at = [], 0
    for lo, hi in _merge(ranges):
        if lo > at:
            out.append([at, lo - 1])
        at = hi + 1
    if at <= MAX_CODE_POINT:
        out.append([at, MAX_CODE_POINT])
    return out


def _seq(parts: list[Node]) -> Node:
    """A sequence with neighbouring literals joined; one part stands alone."""
    merged: list[Node] = []
    for part in parts:
        if part[0] == "seq":
            for inner in part[1]:
                _append(merged, inner)
        else:
            _append(merged, part)
    return merged[0] if len(merged) == 1 else ["seq", merged]


def _append(merged: list[Node], part: Node) -> None:
    if part[0] == "lit" and merged and merged[-1][0] == "lit":
        merged[-1] = ["lit", merged[-1][1] + part[1]]
    elif part != ["lit", ""]:
        merged.append(part)


def _alt(options: list[Node]) -> Node:
    return options[0] if len(options) == 1 else ["alt", options]


def _repeat(node: Node, low: int, high: int | None) -> Node:
    if (low, high) == (1, 1):
        return node
    return ["rep", node, low, high]


class _Regex:
    """One regular expression → a node; ``fail`` says where."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.depth = 0

    def fail(self, message: str) -> GrammarError:
        return GrammarError(f"regular expression /{self.text[:60]}/: {message} (at character {self.i + 1})")

    def peek(self, n: int = 1) -> str:
        return self.text[self.i : self.i + n]

    def parse(self) -> Node:
        if self.peek() == "^":
            self.i += 1
        node = self.alternatives(top=True)
        if self.i < len(self.text):
            raise self.fail("an unmatched ')'")
        return node

    def alternatives(self, top: bool = False) -> Node:
        options = [self.sequence(top)]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence(top))
        return _alt(options)

    def sequence(self, top: bool) -> Node:
        parts: list[Node] = []
        while self.i < len(self.text) and self.peek() not in ("|", ")"):
            if self.peek() == "$":
                self.i += 1
                if not (top and self.i == len(self.text)):
                    raise self.fail("'$' anywhere but at the end")
                break
            atom = self.atom()
            parts.append(self.quantified(atom))
        return _seq(parts)

    def quantified(self, atom: Node) -> Node:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            match = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.text, self.i)
            if match is None:
                raise self.fail(
                    "a '{' that is not a repetition {n}, {n,} or {n,m} (write \\{ for the character)"
                )
            self.i = match.end()
            low = int(match.group(1))
            high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else None)
            if low > MAX_REPEAT or (high is not None and (high > MAX_REPEAT or high < low)):
                raise self.fail(f"a repetition past {MAX_REPEAT} or with its bounds reversed")
        else:
            return atom
        if self.peek() == "?":
            self.i += 1  # lazy: the same texts match
        elif self.peek() == "+":
            raise self.fail("a possessive quantifier")
        if self.peek() in ("*", "+", "?", "{"):
            raise self.fail("a quantifier on a quantifier")
        return _repeat(atom, low, high) if high != 0 else ["lit", ""]

    def atom(self) -> Node:
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return ["cls", self.char_class()]
        if c == ".":
            self.i += 1
            return DOT
        if c == "\\":
            return self.escape(in_class=False)
        if c in ("*", "+", "?", "{"):
            raise self.fail(f"a quantifier '{c}' with nothing to repeat")
        if c == "^":
            raise self.fail("'^' anywhere but at the start")
        self.i += 1
        return ["lit", c]

    def group(self) -> Node:
        self.i += 1
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"groups nested deeper than {MAX_DEPTH}")
        if self.peek() == "?":
            named = re.compile(r"\?(P?<[A-Za-z_][A-Za-z0-9_]*>|:)").match(self.text, self.i)
            if named is None:
                raise self.fail("a '(?' group other than (?:…) or (?P<name>…): lookaround and inline flags")
            self.i = named.end()
        node = self.alternatives()
        if self.peek() != ")":
            raise self.fail("an unclosed '('")
        self.i += 1
        self.depth -= 1
        return node

    def code_point(self, digits: int) -> int:
        hexes = self.text[self.i : self.i + digits]
        if len(hexes) != digits or not all(h in "0123456789abcdefABCDEF" for h in hexes):
            raise self.fail(f"an escape that wants {digits} hex digits")
        self.i += digits
        return int(hexes, 16)

    def escaped_char(self, c: str) -> int:
        """The character of an escape (after the backslash and ``c``), or a refusal."""
        if c in CONTROL_ESCAPES:
            return CONTROL_ESCAPES[c]
        if c in "xuU" and self.peek() == "{":
            end = self.text.find("}", self.i)
            hexes = self.text[self.i + 1 : end] if end > 0 else ""
            if not hexes or len(hexes) > 6 or not all(h in "0123456789abcdefABCDEF" for h in hexes):
                raise self.fail("an escape \\x{…} that is not hex digits")
            self.i = end + 1
            value = int(hexes, 16)
        elif c == "x":
            value = self.code_point(2)
        elif c == "u":
            value = self.code_point(4)
        elif c == "U":
            value = self.code_point(8)
        elif c.isascii() and c.isalnum():
            what = {
                **dict.fromkeys(
                    "DWS", f"\\{c}, whose ASCII sense would let in characters the Unicode sense keeps out"
                ),
                **dict.fromkeys(ANCHORS, f"the anchor \\{c}"),
                **dict.fromkeys("pPN", f"\\{c}, a Unicode property or name"),
                **dict.fromkeys("0123456789", "a backreference or octal escape"),
                **dict.fromkeys("kg", "a backreference"),
            }.get(c, f"the unknown escape \\{c}")
            raise self.fail(what)
        else:
            return ord(c)
        if value > MAX_CODE_POINT or 0xD800 <= value <= 0xDFFF:
            raise self.fail("an escape that is no Unicode character")
        return value

    def escape(self, *, in_class: bool, negated: bool = False) -> Node:
        self.i += 1
        c = self.peek()
        if not c:
            raise self.fail("a '\\' at the end")
        self.i += 1
        if c in SHORTHANDS:
            if negated:
                raise self.fail(
                    f"\\{c} inside [^…], whose ASCII sense would let in what the Unicode sense keeps out"
                )
            return ["cls", SHORTHANDS[c]]
        if in_class and c == "b":
            raise self.fail("\\b inside a class (a backspace to Python, an error to Rust)")
        code = self.escaped_char(c)
        return ["lit", chr(code)]

    def char_class(self) -> list[list[int]]:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[list[int]] = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.fail("an unclosed '['")
            if c == "]" and not first:
                self.i += 1
                break
            if self.peek(2) in ("[:", "&&", "--", "~~", "||") or (c == "[" and not first):
                raise self.fail("a POSIX class, a nested class or a class set operation")
            low = self.class_item(negated)
            first = False
            if isinstance(low, list):
                ranges.extend(low)
                continue
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.class_item(negated)
                if isinstance(high, list) or high < low:
                    raise self.fail("a range in a class whose ends are reversed or not characters")
                ranges.append([low, high])
            else:
                ranges.append([low, low])
        out = _complement(ranges) if negated else _merge(ranges)
        if not out:
            raise self.fail("a class that matches no character")
        return out

    def class_item(self, negated: bool) -> int | list[list[int]]:
        """One character of a class (its code point), or a shorthand's ranges."""
        if self.peek() == "\\":
            node = self.escape(in_class=True, negated=negated)
            return node[1] if node[0] == "cls" else ord(node[1])
        c = self.peek()
        self.i += 1
        return ord(c)


def regex_node(text: str) -> Node:
    """A regular expression (Python's or Rust's syntax, in the subset above) as a node."""
    return _Regex(text).parse()


# -- Lark ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<skip>[ \t\f\r]+|//[^\n]*)
   |(?P<nl>\n)
   |(?P<directive>%[A-Za-z_]+)
   |(?P<string>"(?:[^"\\\n]|\\.)*"i?)
   |(?P<regexp>/(?!/)(?:[^/\\\n]|\\.)*/[A-Za-z]*)
   |(?P<op>->|\.\.|[:|()\[\]?!*+~.,{}])
   |(?P<number>[0-9]+)
   |(?P<name>[A-Za-z_][A-Za-z_0-9]*)
    """,
    re.X,
)
#: Lark's common.lark, the terminals allm carries (C_COMMENT's lazy body has no grammar of this form)
COMMON = """
DIGIT: "0".."9"
HEXDIGIT: "a".."f" | "A".."F" | DIGIT
INT: DIGIT+
SIGNED_INT: ["+"|"-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e"|"E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+"|"-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+"|"-"] NUMBER
ESCAPED_STRING: "\\"" (/[^"\\\\\\n]/ | "\\\\" /./)* "\\""
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_"|LETTER) ("_"|LETTER|DIGIT)*
WS_INLINE: (" "|/\\t/)+
WS: /[ \\t\\f\\r\\n]/+
CR: /\\r/
LF: /\\n/
NEWLINE: (CR? LF)+
SH_COMMENT: /#[^\\n]*/
CPP_COMMENT: /\\/\\/[^\\n]*/
"""


class _Lark:
    """A Lark grammar's text → rules, statement by statement."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        line = 1
        at = 0
        while at < len(text):
            match = _TOKEN.match(text, at)
            if match is None:
                raise GrammarError(f"line {line}: unexpected {text[at : at + 20]!r}")
            kind = match.lastgroup or ""
            if kind != "skip":
                self.tokens.append((kind, match.group(), line))
            line += match.group().count("\n")
            at = match.end()
        # a line that begins with '|' continues the definition above it
        self.tokens = [
            t for n, t in enumerate(self.tokens) if t[0] != "nl" or self._next_solid(n + 1) != ("op", "|")
        ]
        self.tokens.append(("nl", "\n", line))
        self.i = 0
        self.depth = 0
        self.rules: dict[str, Node] = {}
        self.imports: dict[str, str] = {}  # name here → common terminal

    def _next_solid(self, n: int) -> tuple[str, str] | None:
        while n < len(self.tokens) and self.tokens[n][0] == "nl":
            n += 1
        return self.tokens[n][:2] if n < len(self.tokens) else None

    def fail(self, message: str) -> GrammarError:
        line = self.tokens[min(self.i, len(self.tokens) - 1)][2]
        return GrammarError(f"line {line}: {message}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i][:2]

    def take(self, kind: str, value: str | None = None) -> str:
        got_kind, got = self.peek()
        if got_kind != kind or (value is not None and got != value):
            raise self.fail(f"expected {value or kind}, got {got!r}")
        self.i += 1
        return got

    def parse(self) -> None:
        while self.i < len(self.tokens):
            kind, value = self.peek()
            if kind == "nl":
                self.i += 1
            elif kind == "directive":
                self.directive(value)
            else:
                self.definition()

    def directive(self, name: str) -> None:
        if name == "%ignore":
            raise self.fail("%ignore is not supported: a lexer skips those terminals between any two tokens")
        if name != "%import":
            raise self.fail(f"{name} is not supported")
        self.i += 1
        module = self.take("name")
        if module != "common":
            raise self.fail(f"%import {module} is not supported: only common terminals are")
        if self.peek() == ("op", "."):
            self.i += 1
            names = [self.take("name")]
            alias = names[0]
            if self.peek() == ("op", "->"):
                self.i += 1
                alias = self.take("name")
            self.imports[alias] = names[0]
        else:
            self.take("op", "(")
            while True:
                terminal = self.take("name")
                self.imports[terminal] = terminal
                if self.peek() == ("op", ")"):
                    break
                self.take("op", ",")
            self.i += 1
        self.take("nl")

    def definition(self) -> None:
        if self.peek() in (("op", "?"), ("op", "!")):
            self.i += 1
        name = self.take("name")
        if self.peek() == ("op", "{"):
            raise self.fail(f"the template {name}{{…}} is not supported")
        if self.peek() == ("op", "."):
            self.i += 1
            self.take("number")  # a priority: the parse it picks, not the language
        self.take("op", ":")
        if name in self.rules:
            raise self.fail(f"{name!r} is defined twice")
        self.rules[name] = self.expansions()
        self.take("nl")

    def expansions(self) -> Node:
        options = [self.alias()]
        while self.peek() == ("op", "|"):
            self.i += 1
            options.append(self.alias())
        return _alt(options)

    def alias(self) -> Node:
        parts: list[Node] = []
        while (
            self.peek() not in (("op", "|"), ("op", ")"), ("op", "]"), ("op", "->"))
            and self.peek()[0] != "nl"
        ):
            parts.append(self.expr())
        if self.peek() == ("op", "->"):
            self.i += 1
            self.take("name")  # the tree's name for it
        return _seq(parts)

    def expr(self) -> Node:
        atom = self.atom()
        kind, value = self.peek()
        if (kind, value) in (("op", "?"), ("op", "*"), ("op", "+")):
            self.i += 1
            return _repeat(atom, *{"?": (0, 1), "*": (0, None), "+": (1, None)}[value])
        if (kind, value) == ("op", "~"):
            self.i += 1
            low = int(self.take("number"))
            high = low
            if self.peek() == ("op", ".."):
                self.i += 1
                high = int(self.take("number"))
            if high > MAX_REPEAT or high < low or high == 0:
                raise self.fail(f"a repetition ~ {low}..{high}: 1 to {MAX_REPEAT}, the smaller first")
            return _repeat(atom, low, high)
        return atom

    def atom(self) -> Node:
        kind, value = self.peek()
        self.i += 1
        if value in ("(", "[") and kind == "op":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(f"groups nested deeper than {MAX_DEPTH}")
            node = self.expansions()
            self.take("op", ")" if value == "(" else "]")
            self.depth -= 1
            return node if value == "(" else _repeat(node, 0, 1)
        if (kind, value) == ("op", "("):
            node = self.expansions()
            self.take("op", ")")
            return node
        if (kind, value) == ("op", "["):
            node = self.expansions()
            self.take("op", "]")
            return _repeat(node, 0, 1)
        if kind == "string":
            first = self.string(value)
            if self.peek() == ("op", ".."):
                self.i += 1
                last = self.string(self.take("string"))
                if len(first) != 1 or len(last) != 1 or last < first:
                    raise self.fail('a range "a".."z" wants one character at each end, the smaller first')
                return ["cls", [[ord(first), ord(last)]]]
            if value.endswith("i"):
                return _seq([_caseless(c) for c in first])
            return ["lit", first]
        if kind == "regexp":
            body, flags = value[1:].rsplit("/", 1)
            if flags:
                raise self.fail(f"the regexp flags {flags!r} are not supported")
            try:
                return regex_node(body.replace("\\/", "/"))
            except GrammarError as exc:
                raise self.fail(str(exc)) from exc
        if kind == "name":
            if self.peek() == ("op", "{"):
                raise self.fail(f"the template {value}{{…}} is not supported")
            return ["ref", value]
        self.i -= 1
        raise self.fail(f"unexpected {value!r}")

    def string(self, token: str) -> str:
        body = token[1 : token.rindex('"')]
        out = []
        scanner = _Regex(body)
        while scanner.i < len(body):
            c = scanner.peek()
            scanner.i += 1
            if c != "\\":
                out.append(c)
                continue
            escaped = scanner.peek()
            if not escaped:
                raise self.fail(f"the string {token} ends in a backslash")
            scanner.i += 1
            try:
                out.append(chr(scanner.escaped_char(escaped)))
            except GrammarError as exc:
                raise self.fail(f"the string {token}: {exc}") from exc
        return "".join(out)


def _caseless(c: str) -> Node:
    if c.lower() != c.upper() and len(c.lower()) == len(c.upper()) == 1:
        return ["cls", _merge([[ord(c.lower())] * 2, [ord(c.upper())] * 2])]
    return ["lit", c]


def _common_rules() -> dict[str, Node]:
    parser = _Lark(COMMON)
    parser.parse()
    return {f"common__{name}": _renamed(node) for name, node in parser.rules.items()}


def _renamed(node: Node) -> Node:
    if node[0] == "ref":
        return ["ref", f"common__{node[1]}"]
    if node[0] in ("seq", "alt"):
        return [node[0], [_renamed(part) for part in node[1]]]
    if node[0] == "rep":
        return ["rep", _renamed(node[1]), node[2], node[3]]
    return node


_COMMON = _common_rules()


def _reachable(rules: dict[str, Node], start: str) -> dict[str, Node]:
    """Only the rules the start rule reaches (the rest match nothing a call writes)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in rules:
            continue
        seen.add(name)
        stack = [rules[name]]
        while stack:
            node = stack.pop()
            if node[0] == "ref":
                todo.append(node[1])
            elif node[0] in ("seq", "alt"):
                stack.extend(node[1])
            elif node[0] == "rep":
                stack.append(node[1])
    return {name: node for name, node in rules.items() if name in seen}


def lark_grammar(text: str) -> Grammar:
    """A Lark grammar (the subset above) in the manager's form; GrammarError saying what it cannot carry."""
    parser = _Lark(text)
    parser.parse()
    rules = dict(parser.rules)
    for alias, terminal in parser.imports.items():
        if f"common__{terminal}" not in _COMMON:
            raise GrammarError(f"%import common.{terminal}: not among the common terminals allm carries")
        if alias in rules:
            raise GrammarError(f"{alias!r} is both imported and defined")
        rules[alias] = ["ref", f"common__{terminal}"]
    if "start" not in rules:
        raise GrammarError("the grammar has no 'start' rule")
    rules.update(_COMMON)
    return free_grammar.check({"start": "start", "rules": _reachable(rules, "start")})


def regex_grammar(text: str) -> Grammar:
    """A regular expression as a one-rule grammar; GrammarError saying what it cannot carry."""
    return free_grammar.check({"start": "start", "rules": {"start": regex_node(text)}})


def format_grammar(fmt: dict[str, Any]) -> Grammar | None:
    """A checked custom tool ``format`` as the manager's grammar; None for free text."""
    if fmt.get("type", "text") == "text":
        return None
    definition = fmt["definition"]
    return lark_grammar(definition) if fmt["syntax"] == "lark" else regex_grammar(definition)
