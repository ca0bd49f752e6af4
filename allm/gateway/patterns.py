"""The JSON Schema ``pattern``s allowed: the regex subset llama.cpp's converter turns into valid GBNF.

llama-cpp-python's ``_visit_pattern`` copies a pattern almost verbatim into
GBNF, where only a few escapes exist. What it mistranslates, tried on this
build (each refused here with a hint):

- ``\\d``, ``\\w``, ``\\s``, ``\\.``, ``\\/`` … are unknown GBNF escapes: llama.cpp
  refuses the grammar, and the engine dies on the null sampler;
- a stray ``]`` or ``}`` makes the converter loop forever; a ``(?`` group, an
  unanchored pattern or a stray ``)`` trips its asserts;
- ``\\xHH`` and ``\\uHHHH`` outside a class are cut apart when a quantifier, a
  ``|`` or a ``)`` follows them (so they must sit in a class: ``[\\x41]``), and an
  escape or a quote taking a quantifier repeats the whole literal before it;
- ``a|b`` at the top level binds looser than the quotes the converter puts
  around the string, so the output would not be a JSON string;
- ``{n,m}`` past 1000 hits llama.cpp's repetition limit.

What remains: anchored ``^…$`` patterns of literal characters, ``.``, classes
``[a-z]``/``[^…]``, groups ``( … | … )``, and the quantifiers ``* + ? {n} {n,} {n,m}``.
"""

from __future__ import annotations

from allm.gateway.errors import ApiError, bad_field

MAX_PATTERN = 1000  # characters: the converter recurses and copies per character
MAX_GROUP_DEPTH = 16  # the converter recurses once per group
MAX_REPEAT = 1000  # llama.cpp's repetition limit (see allm/gateway/schemas.py)
SPECIAL = set(".[](){}|*+?\\^$")
#: escapes that mean the same to a regular expression and to GBNF, as the converter copies them
LITERAL_ESCAPES = set("[](){}|*+?") | set('-"tnr\\')
CLASS_ESCAPES = set('[]-\\"tnr')
HEX = set("0123456789abcdefABCDEF")
HINTS = {
    "d": "write [0-9]",
    "D": "write [^0-9]",
    "w": "write [a-zA-Z0-9_]",
    "W": "write [^a-zA-Z0-9_]",
    "s": "write [ \\t\\n\\r]",
    "S": "write [^ \\t\\n\\r]",
    ".": "write [.]",
    "/": "write / unescaped",
    "^": "put it in a class, not first: [$^]",
    "$": "write [$]",
    "x": "put it in a class: [\\x41]",
    "u": "put it in a class: [\\u00e9]",
}


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.i = 0
        self.repeats = 0

    def fail(self, message: str) -> ApiError:
        shown = "^" + self.text + "$"
        return bad_field(self.path, f"pattern {shown[:80]!r}: {message} (at character {self.i + 2})")

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def alternatives(self, depth: int) -> None:
        self.sequence(depth)
        while self.peek() == "|":
            if depth == 0:
                raise self.fail(
                    "wrap alternatives in a group, ^(a|b)$: the converter binds '|' looser than quotes"
                )
            self.i += 1
            self.sequence(depth)

    def sequence(self, depth: int) -> None:
        start = self.i
        while self.peek() not in ("", "|", ")"):
            self.item(depth)
        if self.i == start and depth > 0:
            raise self.fail("an empty group or alternative is not supported")

    def item(self, depth: int) -> None:
        c = self.peek()
        quantifiable = True
        if c == ".":
            self.i += 1
        elif c == "(":
            if depth + 1 > MAX_GROUP_DEPTH:
                raise self.fail(f"groups nest at most {MAX_GROUP_DEPTH} deep")
            self.i += 1
            if self.peek() == "?":
                raise self.fail("(?…) groups are not supported")
            self.alternatives(depth + 1)
            if self.peek() != ")":
                raise self.fail("unbalanced '('")
            self.i += 1
        elif c == "[":
            self.char_class()
        elif c == "\\":
            self.escape()
            quantifiable = False
        elif c in "*+?{":
            raise self.fail(f"{c!r} has nothing to repeat")
        elif c in "]}":
            raise self.fail(f"a stray {c!r}: escape it as \\{c}")
        elif c in "^$":
            raise self.fail(f"{c!r} is only supported as the anchor at the start or the end")
        else:
            quantifiable = c != '"'
            self.i += 1
        if self.peek() and self.peek() in "*+?{":
            if not quantifiable:
                raise self.fail("an escaped character or a quote cannot take a quantifier: put it in a group")
            self.quantifier()
            if self.peek() and self.peek() in "*+?{":
                raise self.fail("one quantifier per item (lazy and possessive ones are not supported)")

    def escape(self) -> None:
        self.i += 1
        c = self.peek()
        if not c:
            raise self.fail("a dangling backslash")
        if c not in LITERAL_ESCAPES:
            hint = HINTS.get(c, "it has no GBNF equivalent")
            raise self.fail(f"the escape \\{c} is not supported by llama.cpp's grammar: {hint}")
        self.i += 1

    def class_char(self) -> int:
        c = self.peek()
        if c == "\\":
            self.i += 1
            c = self.peek()
            if c in ("x", "u"):
                size = 2 if c == "x" else 4
                digits = self.text[self.i + 1 : self.i + 1 + size]
                if len(digits) != size or not set(digits) <= HEX:
                    raise self.fail(f"\\{c} needs {size} hex digits")
                self.i += 1 + size
                return int(digits, 16)
            if not c or c not in CLASS_ESCAPES:
                hint = HINTS.get(c, "it has no GBNF equivalent") if c not in ("x", "u") else ""
                raise self.fail(
                    f"the escape \\{c} is not supported in a class by llama.cpp's grammar: {hint}"
                )
            self.i += 1
            return {"t": 9, "n": 10, "r": 13}.get(c, ord(c))
        if c in ("", "["):
            raise self.fail("an unterminated class, or a '[' inside one (escape it as \\[)")
        self.i += 1
        return ord(c)

    def char_class(self) -> None:
        self.i += 1
        if self.peek() == "^":
            self.i += 1
        if self.peek() == "]":
            raise self.fail("an empty class matches nothing")
        while self.peek() != "]":
            low = self.class_char()
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.class_char()
                if high < low:
                    raise self.fail("a class range runs backwards")
        self.i += 1

    def quantifier(self) -> None:
        c = self.peek()
        self.i += 1
        if c != "{":
            self.repeats += 1
            return
        end = self.text.find("}", self.i)
        body = self.text[self.i : end] if end >= 0 else ""
        low_text, _, high_text = body.partition(",")
        if end < 0 or not low_text.isdigit() or not (high_text.isdigit() or high_text == ""):
            raise self.fail("a quantifier must read {n}, {n,} or {n,m}")
        low = int(low_text)
        high = low if "," not in body else (int(high_text) if high_text else None)
        if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
            raise self.fail(f"a quantifier repeats at most {MAX_REPEAT} times (llama.cpp's limit)")
        if high is not None and high < low:
            raise self.fail("a quantifier's bounds run backwards")
        self.repeats += max(high or 0, low, 1)
        self.i = end + 1


def check_pattern(pattern: str, path: str) -> int:
    """Raise a 400 unless the pattern converts to valid GBNF; return its repetition count."""
    if len(pattern) > MAX_PATTERN:
        raise bad_field(path, f"a pattern holds at most {MAX_PATTERN} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in pattern):
        raise bad_field(path, "a pattern must not hold control characters (write them as \\t, \\n, \\r)")
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or _escaped_end(pattern):
        raise bad_field(path, "a pattern must be anchored at both ends, ^…$ (the converter assumes it)")
    parser = _Parser(pattern[1:-1], path)
    parser.alternatives(0)
    if parser.i != len(parser.text):
        raise parser.fail("an unbalanced ')'")
    return parser.repeats


def _escaped_end(pattern: str) -> bool:
    """Whether the final '$' is escaped (an odd run of backslashes before it)."""
    run = len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))
    return run % 2 == 1
