"""Chat formats: how a model's template takes tools, what its calls and reasoning look like.

A model trained for tool calling answers in its own syntax; allm gives such a
model the tools through its own chat template and parses that syntax. The
family is read from the chat template's text (docs/agents.md):

    hermes   Qwen2.5, Qwen3, Hermes   <tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>
    llama3   Llama 3.x               {"name": …, "parameters": {…}} as the whole reply
    mistral  Mistral                 [TOOL_CALLS][{"name": …, "arguments": {…}}, …]
    harmony  gpt-oss                 <|channel|>commentary to=functions.NAME … <|message|>{…}<|call|>
    generic  any other template      the tools are described in the system message and a
                                     call is the JSON {"tool_calls": [{"name": …, "arguments": {…}}]}

Reasoning is ``<think>…</think>`` in templates that know it (Qwen3, DeepSeek-R1
distills) and the ``analysis`` channel of harmony.

``OutputParser`` turns the generated text, piece by piece, into events: answer
text, reasoning text, the start of a call (its name), argument text as it is
generated, the end of a call. It holds back only what may be the start of a
marker, so everything else streams as soon as it is generated.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any


class Family(enum.StrEnum):
    GENERIC = "generic"
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    HARMONY = "harmony"


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def family_of(template: str | None) -> Family:
    """The tool-call family a chat template was written for (generic when it takes no tools)."""
    if not template:
        return Family.GENERIC
    if "<|channel|>" in template and "<|message|>" in template:
        return Family.HARMONY
    if "tools" not in template:
        return Family.GENERIC
    if "<tool_call>" in template:
        return Family.HERMES
    if "[TOOL_CALLS]" in template:
        return Family.MISTRAL
    if "<|start_header_id|>" in template and ("<|python_tag|>" in template or '"parameters"' in template):
        return Family.LLAMA3
    return Family.GENERIC


def thinks(template: str | None) -> bool:
    """Whether the template's models reason inside <think>…</think>."""
    return bool(template) and THINK_CLOSE in str(template)


# -- events -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reasoning:
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallStart:
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Arguments:
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallEnd:
    pass


Event = Text | Reasoning | CallStart | Arguments | CallEnd


# -- the call syntax of each family ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Syntax:
    """Where a family's call section begins and how its calls are delimited.

    ``opens``: markers that begin the call section; ``consumed`` says whether the
    marker is outside the calls' JSON (hermes, mistral) or is its first character
    (llama3 and generic: the ``{`` that begins the reply). ``at_start``: the section
    may only begin the reply. After a call's arguments, ``more`` leads to the next
    call's head and ``done`` ends the section.
    """

    opens: tuple[str, ...]
    consumed: bool
    at_start: bool
    head: re.Pattern[str]
    more: re.Pattern[str] | None
    done: re.Pattern[str] | None
    starts: tuple[str, ...] = ()  # how a head may begin, whitespace removed


_NAME = r'"(?P<name>[^"\\]*)"'
SYNTAXES: Mapping[Family, Syntax] = {
    Family.HERMES: Syntax(
        opens=("<tool_call>",),
        consumed=True,
        at_start=False,
        head=re.compile(r'\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'),
        more=re.compile(r"\s*\}\s*</tool_call>\s*<tool_call>"),
        done=None,
    ),
    Family.LLAMA3: Syntax(
        opens=("<|python_tag|>", "{"),
        consumed=False,
        at_start=True,
        head=re.compile(
            r'\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"parameters"\s*:\s*'
        ),
        more=None,
        done=re.compile(r"\s*\}"),
        starts=('{"name"', "<|python_tag|>"),
    ),
    Family.MISTRAL: Syntax(
        opens=("[TOOL_CALLS]",),
        consumed=True,
        at_start=False,
        head=re.compile(r'\s*\[?\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'),
        more=re.compile(r"\s*\}\s*,"),
        done=re.compile(r"\s*\}\s*\]"),
    ),
    Family.GENERIC: Syntax(
        opens=("{",),
        consumed=False,
        at_start=True,
        head=re.compile(
            r'\s*(?:\{\s*"tool_calls"\s*:\s*\[)?\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'
        ),
        more=re.compile(r"\s*\}\s*,"),
        done=re.compile(r"\s*\}\s*\]\s*\}"),
        starts=('{"tool_calls"', '{"name"'),
    ),
}


class _JsonEnd:
    """Finds where a JSON value that streams in piece by piece ends (objects and arrays)."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.in_string = False
        self.escape = False

    def feed(self, text: str) -> int | None:
        """The index in ``text`` just past the value's end, or None if it goes on."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                continue
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
                self.started = True
            elif c in "}]":
                self.depth -= 1
            if self.started and self.depth <= 0:
                return i + 1
        return None


def _held(buffer: str, markers: Sequence[str]) -> int:
    """How many characters at the end of ``buffer`` may begin one of ``markers``."""
    hold = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buffer)), hold, -1):
            if buffer.endswith(marker[:k]):
                hold = k
                break
    return hold


class OutputParser:
    """Generated text → events, for one family (harmony has its own parser).

    ``tools``: whether calls are parsed at all (no tools: everything is text).
    ``thinking``: the reply begins inside reasoning (the prompt opened ``<think>``).
    ``halt_on_open``: stop consuming at a call marker, so the caller can continue
    the generation under a grammar from there (``section_start``, ``unconsumed``).
    """

    def __init__(
        self, family: Family, *, tools: bool, think: bool, thinking: bool = False, halt_on_open: bool = False
    ) -> None:
        self.syntax = SYNTAXES.get(family, SYNTAXES[Family.GENERIC])
        self.tools = tools
        self.think = think or thinking
        self.state = "reasoning" if thinking else "text"
        self.halt_on_open = halt_on_open
        self.buffer = ""
        self.fed = 0  # characters consumed so far
        self.seen_text = False  # visible text came before (at_start markers no longer open calls)
        self.section_start: int | None = None  # where the call section's marker begins, in fed characters
        self.marker = ""
        self.unconsumed = ""  # what followed the marker in the piece that completed it (halt_on_open)
        self.args: _JsonEnd | None = None
        self.calls = 0
        self.after_think = False

    @property
    def in_call_section(self) -> bool:
        return self.state in ("head", "args", "tail", "done")

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self.buffer += text
        self.fed += len(text)
        self.unconsumed = ""  # a halt is for the piece that opened the section only
        while self.buffer:
            before = (self.state, len(self.buffer))
            self._step(events)
            if self.unconsumed or (self.state, len(self.buffer)) == before:
                break
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: flush what was held back."""
        events: list[Event] = []
        if self.state == "text" and self.buffer:
            events.append(Text(self.buffer))
        elif self.state == "reasoning" and self.buffer:
            events.append(Reasoning(self.buffer))
        elif self.state == "args" and self.buffer:
            events.append(Arguments(self.buffer))
        self.buffer = ""
        return events

    # -- states --------------------------------------------------------------------------

    def _markers(self) -> list[str]:
        markers = [THINK_OPEN] if self.think else []
        if self.tools:
            markers += [m for m in self.syntax.opens if not (self.syntax.at_start and self.seen_text)]
        return markers

    def _step(self, events: list[Event]) -> None:
        if self.state == "text":
            self._text(events)
        elif self.state == "reasoning":
            self._reasoning(events)
        elif self.state == "head":
            self._head(events)
        elif self.state == "args":
            self._args(events)
        elif self.state == "tail":
            self._tail()
        else:  # done: the call section ends the reply; anything after it is dropped
            self.buffer = ""

    def _text(self, events: list[Event]) -> None:
        if self.after_think:  # the blank lines between reasoning and answer belong to neither
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return
            self.after_think = False
        markers = self._markers()
        if self.syntax.at_start and self.tools and not self.seen_text:
            # the reply's leading whitespace waits: a call may still begin the reply
            stripped = self.buffer.lstrip()
            if not stripped:
                return
            lead = len(self.buffer) - len(stripped)
            for marker in self.syntax.opens:
                if stripped.startswith(marker) or marker.startswith(stripped):
                    if stripped.startswith(marker):
                        self._open(lead, marker, events)
                    return
            if self.think and (stripped.startswith(THINK_OPEN) or THINK_OPEN.startswith(stripped)):
                if stripped.startswith(THINK_OPEN):
                    self.buffer = stripped[len(THINK_OPEN) :]
                    self.state = "reasoning"
                return
            self.seen_text = True
            markers = self._markers()
        hits = [(i, m) for m in markers if (i := self.buffer.find(m)) >= 0]
        if hits:
            index, marker = min(hits)
            if index:
                events.append(Text(self.buffer[:index]))
                self.seen_text = self.seen_text or bool(self.buffer[:index].strip())
            if marker == THINK_OPEN:
                self.buffer = self.buffer[index + len(marker) :]
                self.state = "reasoning"
            else:
                self.buffer = self.buffer[index:]
                self._open(0, marker, events)
            return
        keep = _held(self.buffer, markers)
        out = self.buffer[: len(self.buffer) - keep]
        if out:
            events.append(Text(out))
            self.seen_text = self.seen_text or bool(out.strip())
        self.buffer = self.buffer[len(out) :]

    def _open(self, index: int, marker: str, events: list[Event]) -> None:
        """A call marker at ``buffer[index]``: the call section begins."""
        if self.buffer[:index].strip():
            events.append(Text(self.buffer[:index]))
        rest = self.buffer[index:]
        self.section_start = self.fed - len(rest)
        self.marker = marker if self.syntax.consumed else ""
        after = rest[len(self.marker) :]
        self.state = "head"
        if self.halt_on_open:
            self.unconsumed, self.buffer = after, ""
        else:
            self.buffer = after

    def _reasoning(self, events: list[Event]) -> None:
        index = self.buffer.find(THINK_CLOSE)
        if index >= 0:
            if index:
                events.append(Reasoning(self.buffer[:index]))
            self.buffer = self.buffer[index + len(THINK_CLOSE) :]
            self.state = "text"
            self.after_think = True
            return
        keep = _held(self.buffer, [THINK_CLOSE])
        out = self.buffer[: len(self.buffer) - keep]
        if out:
            events.append(Reasoning(out))
        self.buffer = self.buffer[len(out) :]

    def _head(self, events: list[Event]) -> None:
        match = self.syntax.head.match(self.buffer)
        if match is None and self.calls == 0 and self._not_a_call():
            # JSON that is not a call (a JSON answer under tool_choice auto): text after all
            self.state, self.seen_text, self.section_start = "text", True, None
            return
        if match is None or match.end() == len(self.buffer):
            return  # the head is not complete yet (the grammar makes it so in the end)
        events.append(CallStart(json.loads(f'"{match.group("name")}"')))
        self.calls += 1
        self.buffer = self.buffer[match.end() :].lstrip()
        self.args = _JsonEnd()
        self.state = "args"

    def _not_a_call(self) -> bool:
        starts = self.syntax.starts
        if not starts:
            return False
        compact = re.sub(r"\s+", "", self.buffer)
        return all(not compact.startswith(s) and not s.startswith(compact) for s in starts)

    def _args(self, events: list[Event]) -> None:
        assert self.args is not None
        end = self.args.feed(self.buffer)
        if end is None:
            events.append(Arguments(self.buffer))
            self.buffer = ""
            return
        events.append(Arguments(self.buffer[:end]))
        events.append(CallEnd())
        self.buffer = self.buffer[end:]
        self.state = "tail"

    def _tail(self) -> None:
        syntax = self.syntax
        if syntax.more is not None and (match := syntax.more.match(self.buffer)):
            self.buffer = self.buffer[match.end() :]
            self.state = "head"
        elif syntax.done is not None and (match := syntax.done.match(self.buffer)):
            self.buffer = ""
            self.state = "done"


class HarmonyParser:
    """gpt-oss's harmony messages: analysis is reasoning, final is text, a recipient is a call.

    The reply is a sequence of ``<|channel|>NAME[ to=functions.F][ <|constrain|>json]<|message|>BODY``
    ended by ``<|end|>`` (and ``<|start|>assistant`` before the next), ``<|call|>`` or ``<|return|>``.
    """

    ENDS = ("<|end|>", "<|call|>", "<|return|>")

    def __init__(self, *, tools: bool) -> None:
        self.tools = tools
        self.state = "header"
        self.buffer = ""
        self.kind = "text"
        self.calls = 0
        self.section_start: int | None = None  # never set: harmony calls are not continued lazily
        self.marker = ""
        self.unconsumed = ""
        self.fed = 0

    @property
    def in_call_section(self) -> bool:
        return self.kind == "call"

    @property
    def in_reasoning(self) -> bool:
        return self.kind == "reasoning"

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self.buffer += text
        self.fed += len(text)
        while self.buffer:
            before = (self.state, len(self.buffer))
            if self.state == "header":
                self._header(events)
            else:
                self._body(events)
            if (self.state, len(self.buffer)) == before:
                break
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.buffer:
            events.extend(self._piece(self.buffer))
            self.buffer = ""
        if self.kind == "call" and self.state == "body":
            events.append(CallEnd())
        return events

    def _piece(self, text: str) -> list[Event]:
        if self.kind == "reasoning":
            return [Reasoning(text)]
        if self.kind == "call":
            return [Arguments(text)]
        return [Text(text)]

    def _header(self, events: list[Event]) -> None:
        start = self.buffer.lstrip()
        if start.startswith("<|start|>assistant"):
            start = start[len("<|start|>assistant") :]
        if not start:
            return
        if not start.startswith("<|channel|>"):
            if "<|channel|>".startswith(start) or "<|start|>assistant".startswith(start):
                return
            self.kind, self.state = "text", "body"  # not harmony after all: plain text
            self.buffer = start
            return
        index = start.find("<|message|>")
        if index < 0:
            return
        header = start[len("<|channel|>") : index]
        self.buffer = start[index + len("<|message|>") :]
        self.state = "body"
        recipient = re.search(r"to=functions\.([A-Za-z0-9_.-]+)", header)
        if recipient and self.tools:
            self.kind = "call"
            self.calls += 1
            events.append(CallStart(recipient.group(1)))
        elif header.startswith("analysis"):
            self.kind = "reasoning"
        else:
            self.kind = "text"

    def _body(self, events: list[Event]) -> None:
        hits = [(i, m) for m in self.ENDS if (i := self.buffer.find(m)) >= 0]
        if hits:
            index, marker = min(hits)
            if index:
                events.extend(self._piece(self.buffer[:index]))
            if self.kind == "call":
                events.append(CallEnd())
            self.buffer = self.buffer[index + len(marker) :]
            self.state = "header"
            return
        keep = _held(self.buffer, self.ENDS)
        out = self.buffer[: len(self.buffer) - keep]
        if out:
            events.extend(self._piece(out))
        self.buffer = self.buffer[len(out) :]


Parser = OutputParser | HarmonyParser


# -- prompts and grammars ----------------------------------------------------------------------


def functions_of(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat tools → their function definitions."""
    return [dict(tool["function"]) for tool in tools]


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


def generic_system_text(functions: Sequence[Mapping[str, Any]], *, required: bool) -> str:
    """What the generic scheme tells a model that has no tool format of its own."""
    listing = json.dumps(
        [
            {
                "name": fn["name"],
                "description": fn.get("description", ""),
                "parameters": fn.get("parameters", {}),
            }
            for fn in functions
        ]
    )
    how = (
        "To call a function, reply with only the JSON "
        '{"tool_calls": [{"name": <function>, "arguments": {...}}]}.'
    )
    if not required:
        how += " Otherwise, and once you have the results you need, answer in plain text."
    return f"You can call these functions:\n{listing}\n{how}"


def arguments_object(arguments: str) -> Any:
    """A call's JSON-text arguments as the object chat templates render (text that is not JSON stays text)."""
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return arguments
