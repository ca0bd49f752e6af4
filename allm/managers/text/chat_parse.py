"""Chat output parsers: a model's generated text, piece by piece, as events in its family's syntax.

``OutputParser`` turns the generated text into events: answer text, reasoning
text, the start of a call (its name), argument text as it is generated, the end
of a call. It holds back only what may be the start of a marker, so everything
else streams as soon as it is generated. gpt-oss's harmony messages have a
parser of their own (``HarmonyParser``).
"""

from __future__ import annotations

import dataclasses
import json
import re

from allm.managers.text.chat_format import SYNTAXES, THINK_CLOSE, THINK_OPEN, Family
from allm.managers.text.stops import held_back

# -- events -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Piece:
    text: str


class Text(_Piece):
    """Answer text."""

    __slots__ = ()


class Reasoning(_Piece):
    """Reasoning text (``<think>``, harmony's analysis channel)."""

    __slots__ = ()


class Arguments(_Piece):
    """Text of the current call's JSON arguments, as generated."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True, slots=True)
class CallStart:
    """A call begins: the function's name."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallEnd:
    """The current call's arguments are complete."""


Event = Text | Reasoning | CallStart | Arguments | CallEnd


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


class _Parser:
    """Text fed piece by piece, stepped through a parser's states until a step makes no headway."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.buffer = ""
        self.fed = 0  # characters consumed so far
        self.calls = 0
        self.section_start: int | None = None  # where the call section's marker begins, in fed characters
        self.marker = ""
        self.unconsumed = ""  # what followed the marker in the piece that completed it (halt_on_open)

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

    def _step(self, events: list[Event]) -> None:
        raise NotImplementedError


class OutputParser(_Parser):
    """Generated text → events, for one family (harmony has its own parser).

    ``tools``: whether calls are parsed at all (no tools: everything is text).
    ``thinking``: the reply begins inside reasoning (the prompt opened ``<think>``).
    ``halt_on_open``: stop consuming at a call marker, so the caller can continue
    the generation under a grammar from there (``section_start``, ``unconsumed``).
    """

    def __init__(
        self, family: Family, *, tools: bool, think: bool, thinking: bool = False, halt_on_open: bool = False
    ) -> None:
        super().__init__("reasoning" if thinking else "text")
        self.syntax = SYNTAXES.get(family, SYNTAXES[Family.GENERIC])
        self.tools = tools
        self.think = think or thinking
        self.halt_on_open = halt_on_open
        self.seen_text = False  # visible text came before (at_start markers no longer open calls)
        self.args: _JsonEnd | None = None
        self.after_think = False

    @property
    def in_call_section(self) -> bool:
        return self.state in ("head", "args", "tail", "done")

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

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
        keep = held_back(self.buffer, markers)
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
        keep = held_back(self.buffer, [THINK_CLOSE])
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


class HarmonyParser(_Parser):
    """gpt-oss's harmony messages: analysis is reasoning, final is text, a recipient is a call.

    The reply is a sequence of ``<|channel|>NAME[ to=functions.F][ <|constrain|>json]<|message|>BODY``
    ended by ``<|end|>`` (and ``<|start|>assistant`` before the next), ``<|call|>`` or ``<|return|>``.
    """

    ENDS = ("<|end|>", "<|call|>", "<|return|>")

    def __init__(self, *, tools: bool) -> None:
        super().__init__("header")  # section_start stays None: harmony calls are not continued lazily
        self.tools = tools
        self.kind = "text"

    @property
    def in_call_section(self) -> bool:
        return self.kind == "call"

    @property
    def in_reasoning(self) -> bool:
        return self.kind == "reasoning"

    def _step(self, events: list[Event]) -> None:
        if self.state == "header":
            self._header(events)
        else:
            self._body(events)

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
        keep = held_back(self.buffer, self.ENDS)
        out = self.buffer[: len(self.buffer) - keep]
        if out:
            events.extend(self._piece(out))
        self.buffer = self.buffer[len(out) :]


Parser = OutputParser | HarmonyParser
