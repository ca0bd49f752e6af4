"""The generation loops: a completion's tokens to text, and a chat reply's to text, reasoning and calls.

Cancel and the deadline are checked between every two tokens; ``max_tokens`` is
a hard limit; stop sequences cut the text; usage is counted in tokens. The
engines give the tokens (a ``TokenSource`` for chat, which can continue under a
grammar) and their text (a ``Detokenizer``).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

from allm.kernel.contract import Reply, RequestContext
from allm.managers.text.chat_parse import Arguments, CallEnd, CallStart, Event, Reasoning, Text
from allm.managers.text.chat_plan import ChatPlan
from allm.managers.text.request import canonical
from allm.managers.text.sampling import Sampling
from allm.managers.text.stops import StopMatcher


class Detokenizer(Protocol):
    """Turns generated tokens into text, one token at a time."""

    def feed(self, token: int) -> str:
        """Text this token completes (may be empty while a character is incomplete)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back at the end."""
        ...


def run_generation(
    ctx: RequestContext,
    tokens: Iterator[int],
    detokenizer: Detokenizer,
    is_end: Callable[[int], bool],
    sampling: Sampling,
    *,
    prompt_tokens: int,
    room: int,
    stream: bool,
    model_id: str,
    logprob_of: Callable[[int], dict[str, Any]] | None = None,
) -> Reply:
    """The token loop of a completion (chat replies go through ``run_chat``).

    Cancel and the deadline are checked between every two tokens; ``max_tokens``
    is a hard limit; stop sequences cut the text; usage is counted in tokens.
    With ``logprob_of`` (called right after each token is drawn), each text
    chunk carries the logprobs of the tokens whose text it holds.
    """
    limit = min(sampling.max_tokens or room, room)
    stopper = StopMatcher(sampling.stop)
    parts: list[str] = []
    logprobs: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    generated = 0
    finish = "length"
    cut = False  # a stop sequence ended the text: what is held back is dropped

    def out(text: str) -> None:
        nonlocal pending
        parts.append(text)
        chunk: dict[str, Any] = {"text": text}
        if logprob_of is not None:
            chunk["logprobs"], pending = pending, []
            logprobs.extend(chunk["logprobs"])
        if stream:
            ctx.emit(chunk)

    for token in tokens:
        ctx.check()
        if is_end(token):
            finish = "stop"
            break
        generated += 1
        if logprob_of is not None:
            pending.append(logprob_of(token))
        text, stopped = stopper.feed(detokenizer.feed(token))
        if text:
            out(text)
        if stopped:
            finish, cut = "stop", True
            break
        if generated >= limit:
            break
    tail = "" if cut else stopper.feed(detokenizer.flush())[0] + stopper.flush()
    if tail:
        out(tail)
    data: dict[str, Any] = {
        "text": "".join(parts),
        "finish_reason": finish,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated},
        "model": model_id,
    }
    if logprob_of is not None:
        data["logprobs"] = [*logprobs, *pending]
    return Reply(data)


class ChatDetokenizer(Detokenizer, Protocol):
    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are held back (no clean token boundary)."""
        ...


class TokenSource(Protocol):
    """What the chat loop needs of an engine that can continue under a grammar."""

    def tokens(self, prompt: list[int], grammar: str | None) -> Generator[int, None, None]:
        """Generated tokens after ``prompt``, constrained by the GBNF ``grammar`` if given."""
        ...

    def detokenizer(self, prompt: list[int]) -> ChatDetokenizer: ...

    def is_end(self, token: int) -> bool: ...


@dataclasses.dataclass(slots=True)
class _Call:
    id: str
    name: str
    arguments: str = ""
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    held: bool = False  # its chunks wait until it is complete: it may yet be dropped


class _ChatLoop:
    """The state of one chat reply; see ``run_chat``."""

    def __init__(
        self,
        ctx: RequestContext,
        plan: ChatPlan,
        sampling: Sampling,
        logprob_of: Callable[[int], dict[str, Any]] | None,
        prompt_tokens: int,
        *,
        cached_tokens: Callable[[], int] | None,
    ) -> None:
        self.ctx = ctx
        self.prompt_tokens = prompt_tokens  # told with the first chunk, for APIs that open with it
        self.cached_tokens = cached_tokens  # and of them, those its cache held (once it is known)
        self.plan = plan
        self.parser = plan.parser
        self.stopper = StopMatcher(sampling.stop)
        self.logprob_of = logprob_of
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[_Call] = []
        self.logprobs: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is not out yet
        self.reasoning_tokens = 0
        self.out: list[int] = []  # the reply's tokens
        self.fed: list[str] = []  # the characters fed to the parser
        self.fed_chars = 0
        self.boundaries: list[tuple[int, int]] = [(0, 0)]  # (tokens, characters) where a token ended cleanly
        self.skip = 0  # characters of a continuation that the parser has already seen
        self.ended = False  # the calls end the reply (a repeat, or max_calls)
        self.repeated_answered = False

    def emit(self, chunk: dict[str, Any]) -> None:
        if self.ctx.stream:
            if not self.ctx.seq:
                chunk = {**chunk, "prompt_tokens": self.prompt_tokens}
                if self.cached_tokens is not None:
                    chunk["cached_tokens"] = self.cached_tokens()
            self.ctx.emit(chunk)

    def on(self, event: Event) -> None:
        calls = self.calls
        if isinstance(event, Text):
            self.text.append(event.text)
            chunk: dict[str, Any] = {"text": event.text}
            if self.logprob_of is not None:
                chunk["logprobs"], self.pending = self.pending, []
                self.logprobs.extend(chunk["logprobs"])
            self.emit(chunk)
        elif isinstance(event, Reasoning):
            self.reasoning.append(event.text)
            self.emit({"reasoning": event.text})
        elif isinstance(event, CallStart):
            call = _Call(id=f"call_{uuid.uuid4().hex[:24]}", name=event.name)
            call.held = bool(calls) or any(event.name == name for name, _ in self.plan.answered)
            calls.append(call)
            self._call_chunk(call, {"call": {"index": len(calls) - 1, "id": call.id, "name": call.name}})
        elif isinstance(event, Arguments) and calls:
            calls[-1].arguments += event.text
            self._call_chunk(calls[-1], {"arguments": event.text, "index": len(calls) - 1})
        elif isinstance(event, CallEnd) and calls:
            call = calls[-1]
            key = (call.name, canonical(call.arguments))
            if key in {(c.name, canonical(c.arguments)) for c in calls[:-1]}:
                calls.pop()  # the same call twice: the reply ends with the first
                self.ended = True
                return
            if len(calls) == 1 and key in self.plan.answered and self.plan.as_text is not None:
                self.repeated_answered = True
                return
            if call.held:
                call.held = False
                for chunk in call.events:
                    self.emit(chunk)
            if len(calls) >= self.plan.max_calls:
                self.ended = True

    def _call_chunk(self, call: _Call, chunk: dict[str, Any]) -> None:
        if call.held:
            call.events.append(chunk)
        else:
            self.emit(chunk)

    def feed(self, token: int, piece: str, *, clean: bool) -> bool:
        """Take one token and its text; True when a stop sequence ended the reply."""
        parser = self.parser
        in_reasoning = parser.in_reasoning
        if self.logprob_of is not None and not in_reasoning and not parser.in_call_section:
            self.pending.append(self.logprob_of(token))
        self.out.append(token)
        if self.skip:
            cut = min(self.skip, len(piece))
            self.skip -= cut
            piece = piece[cut:]
        stopped = self.feed_text(piece)
        if in_reasoning:
            self.reasoning_tokens += 1
        if clean:
            self.boundaries.append((len(self.out), self.fed_chars))
        return stopped

    def feed_text(self, text: str) -> bool:
        """Text through the stop sequences to the parser; True when one ended the reply."""
        piece, stopped = self.stopper.feed(text)
        self.fed.append(piece)
        self.fed_chars += len(piece)
        for event in self.parser.feed(piece):
            self.on(event)
        return stopped

    def rewind(self, end: int) -> str:
        """Go back to the last clean token boundary at or before character ``end``.

        Returns the text from there to ``end``, which the continuation's grammar
        repeats and the parser does not see again.
        """
        kept, at = max(b for b in self.boundaries if b[1] <= end)
        prefix = "".join(self.fed)[at:end]
        del self.out[kept:]
        self.boundaries = [b for b in self.boundaries if b[0] <= kept]
        self.skip = len(prefix)
        return prefix


def run_chat(
    ctx: RequestContext,
    source: TokenSource,
    prompt: list[int],
    plan: ChatPlan,
    sampling: Sampling,
    *,
    room: int,
    model_id: str,
    logprob_of: Callable[[int], dict[str, Any]] | None = None,
    cached_tokens: Callable[[], int] | None = None,
) -> Reply:
    """The chat token loop: text, reasoning and calls, each streamed as it is generated.

    Stream chunks are ``{"text"[, "logprobs"]}``, ``{"reasoning"}``,
    ``{"call": {"index", "id", "name"}}`` and ``{"arguments", "index"}``
    (docs/agents.md); the first also says ``prompt_tokens``, and ``cached_tokens`` where the
    engine says how many of them its cache held (``cached_tokens``, read at the first chunk). A reply never
    holds the same call twice (the repeat ends it) nor more than
    ``plan.max_calls``; a call after the first is streamed once it is
    complete, since it may be such a repeat. A stop sequence that ends the
    reply is named in the result's ``stop_sequence``.
    """
    limit = min(sampling.max_tokens or room, room)
    loop = _ChatLoop(ctx, plan, sampling, logprob_of, len(prompt), cached_tokens=cached_tokens)
    grammar = plan.grammar
    constrained = grammar is not None
    finish = "length"
    cut = False  # a stop sequence ended the reply: what follows it is dropped
    tokens = source.tokens(prompt, grammar)
    detok = source.detokenizer(prompt)
    while True:
        section = False
        for token in tokens:
            ctx.check()
            if source.is_end(token):
                finish = "stop"
                break
            if loop.feed(token, detok.feed(token), clean=not detok.pending):
                finish, cut = "stop", True
                break
            if loop.ended:
                finish = "tool_calls"
                break
            if loop.repeated_answered or len(loop.out) >= limit:
                break
            if not constrained and plan.lazy is not None and loop.parser.section_start is not None:
                section = True
                break
        if loop.repeated_answered and plan.as_text is not None:
            # The reply repeats a call the conversation has answered: take the call
            # back and answer in text from where it began.
            start = loop.parser.section_start
            assert start is not None
            loop.calls.clear()
            loop.repeated_answered = False
            grammar, loop.parser = plan.as_text(loop.rewind(start))
            plan.as_text = None
        elif section:
            # A call section begins in free text: continue under the call grammar
            # from the last clean token boundary before it.
            start = loop.parser.section_start
            assert start is not None
            assert plan.lazy is not None
            grammar = plan.lazy(loop.rewind(start + len(loop.parser.marker)))
        else:
            break
        constrained = True
        finish = "length"
        tokens.close()  # the old generation lets go of the engine before the new one starts
        tokens = source.tokens(prompt + loop.out, grammar)
        detok = source.detokenizer(prompt + loop.out)
    # The last token may have ended mid-character, and the stop sequences may hold text that
    # began one: both belong to the reply unless a stop sequence cut it.
    rest = "" if cut else detok.flush()
    if rest and loop.feed_text(rest):
        finish, cut = "stop", True
    tail = "" if cut else loop.stopper.flush()
    if tail:
        for event in loop.parser.feed(tail):
            loop.on(event)
    for event in loop.parser.finish():
        loop.on(event)
    calls = [c for c in loop.calls if not c.held]
    if calls and finish != "length":
        finish = "tool_calls"
    answer = "".join(loop.text)
    data: dict[str, Any] = {
        "text": "" if calls and not answer.strip() else answer,
        "reasoning": "".join(loop.reasoning),
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls],
        "finish_reason": finish,
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(loop.out),
            "reasoning_tokens": loop.reasoning_tokens,
        },
        "model": model_id,
    }
    if cut:
        data["stop_sequence"] = loop.stopper.matched
    if logprob_of is not None:
        loop.logprobs.extend(loop.pending)
        data["logprobs"] = loop.logprobs
    return Reply(data)
