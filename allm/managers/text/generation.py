"""What every text engine shares: parameters, the token loop, stop sequences, tool calls.

Parameters arrive from a peer, so they are validated here (UNSUPPORTED with
reason ``invalid_request`` and the field in ``param``), never asserted.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, Protocol

from allm.kernel.codes import UnsupportedError
from allm.kernel.runtime import Reply, RequestContext
from allm.managers.text.chat_format import (
    TEXT_ONLY_GRAMMAR,
    Arguments,
    CallEnd,
    CallStart,
    Event,
    Family,
    HarmonyParser,
    OutputParser,
    Parser,
    Reasoning,
    Text,
    arguments_object,
    call_grammar,
    gbnf_literal,
    generic_system_text,
    strict_strings,
)
from allm.managers.text.sampling import Sampling

INVALID = "invalid_request"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _bad(param: str, message: str) -> UnsupportedError:
    return UnsupportedError(message, reason=INVALID, param=param)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages into the plain shape chat templates expect.

    Roles stay as sent (``developer`` too: gpt-oss's template has it; the others
    see it as ``system``); calls keep their ids and tool results their call ids.
    """
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise _bad(f"messages[{i}]", "each message must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"role must be one of {sorted(ROLES)}, got {role!r}")
        content = msg.get("content") or ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "content must be text")
        clean: dict[str, Any] = {"role": role, "content": content}
        calls = msg.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(
                isinstance(c, Mapping) and isinstance(c.get("function"), Mapping) for c in calls
            ):
                raise _bad(f"messages[{i}].tool_calls", "tool_calls must be a list of function calls")
            clean["tool_calls"] = [
                {
                    "id": str(c.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(c["function"].get("name", "")),
                        "arguments": str(c["function"].get("arguments") or "{}"),
                    },
                }
                for c in calls
            ]
        for key in ("tool_call_id", "reasoning_content", "name"):
            if isinstance(msg.get(key), str) and msg[key]:
                clean[key] = msg[key]
        out.append(clean)
    return out


class StopMatcher:
    """Cuts generated text at the first stop sequence, holding back what may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop sequence was reached."""
        if not self.stops:
            return text, False
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


#: calls one reply may make when parallel calls are allowed
MAX_CALLS = 8
EFFORTS = ("low", "medium", "high")


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    """The tools a reply may call: all of them, or the one ``tool_choice`` forces."""

    tools: list[dict[str, Any]]  # OpenAI chat tools, as chat templates take them
    required: bool  # tool_choice required or a named function: the reply is calls only
    forced: str | None
    max_calls: int  # 1 with parallel_tool_calls false

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [dict(t["function"]) for t in self.tools]

    @property
    def allowed(self) -> list[dict[str, Any]]:
        return [fn for fn in self.functions if self.forced is None or fn["name"] == self.forced]


def tool_spec(tools: Any, tool_choice: Any, parallel: Any = True) -> ToolSpec | None:
    """Checked tools and tool_choice; None when the reply may not call any."""
    if not tools or tool_choice == "none":
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list")
    clean = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise _bad(f"tools[{i}]", "each tool must be {'type': 'function', 'function': {'name': ...}}")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise _bad(f"tools[{i}].function.parameters", "parameters must be a JSON Schema object")
        clean.append({"type": "function", "function": dict(fn)})
    names = [t["function"]["name"] for t in clean]
    forced: str | None = None
    if isinstance(tool_choice, Mapping):
        forced = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if forced not in names:
            raise _bad("tool_choice", f"tool_choice names {forced!r}, which is not among the tools {names}")
    elif tool_choice not in (None, "auto", "required"):
        raise _bad(
            "tool_choice", f"tool_choice must be none, auto, required or a function, got {tool_choice!r}"
        )
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "parallel_tool_calls must be true or false")
    return ToolSpec(
        tools=clean,
        required=forced is not None or tool_choice == "required",
        forced=forced,
        max_calls=MAX_CALLS if parallel else 1,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request as every engine starts from it: checked, not yet rendered."""

    messages: list[dict[str, Any]]
    sampling: Sampling
    tools: ToolSpec | None
    reasoning_effort: str | None = None

    def answered(self) -> set[tuple[str, str]]:
        """(name, arguments) of the calls in the conversation that already have a result."""
        results = {m.get("tool_call_id") for m in self.messages if m["role"] == "tool"}
        return {
            (c["function"]["name"], _canonical(c["function"]["arguments"]))
            for m in self.messages
            for c in m.get("tool_calls", ())
            if c["id"] in results
        }


def chat_request(params: Mapping[str, Any]) -> ChatRequest:
    messages = check_messages(params.get("messages"))
    sampling = Sampling.from_params(params)
    tools = tool_spec(params.get("tools"), params.get("tool_choice"), params.get("parallel_tool_calls", True))
    effort = params.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise _bad("reasoning_effort", f"reasoning_effort must be one of {list(EFFORTS)}, got {effort!r}")
    return ChatRequest(messages, sampling, tools, effort)


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return arguments


def template_messages(
    messages: list[dict[str, Any]], family: Family, tools: ToolSpec | None
) -> list[dict[str, Any]]:
    """Checked messages as the model's chat template takes them.

    A template with a tool format of its own gets calls (arguments as objects,
    which templates render with ``tojson``) and tool results (with the call's id
    and function name) as they are. Any other template gets the generic scheme:
    calls as the JSON it asks for, results as user text naming the call, and
    with tools, their description in the system message.
    """
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        if role == "developer" and family is not Family.HARMONY:
            role = "system"
        if family is Family.GENERIC:
            if role == "tool":
                call_id = msg.get("tool_call_id", "")
                name = names.get(call_id, "a function")
                out.append(
                    {"role": "user", "content": f"Result of {name} (call {call_id}): {msg['content']}"}
                )
            elif msg.get("tool_calls"):
                calls = [
                    {"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}
                    for c in msg["tool_calls"]
                ]
                out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
            else:
                out.append({"role": role, "content": msg["content"]})
            continue
        clean = {**msg, "role": role}
        if msg.get("tool_calls"):
            clean["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": arguments_object(c["function"]["arguments"]),
                    },
                }
                for c in msg["tool_calls"]
            ]
        if role == "tool":
            clean["name"] = names.get(msg.get("tool_call_id", ""), "")
        if family is Family.HARMONY and "reasoning_content" in clean:
            clean["thinking"] = clean["reasoning_content"]
        out.append(clean)
    if family is Family.GENERIC and tools is not None:
        text = generic_system_text(tools.allowed, required=tools.required)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def prompt_of(params: Mapping[str, Any]) -> str:
    """A completion request's prompt, checked."""
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt", "prompt must be a string")
    return prompt


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
class ChatPlan:
    """How one chat reply is generated and read.

    ``grammar``: constrains the reply from its first token (a forced call, a JSON
    answer). ``lazy``: the grammar of a call section found in free text (tool_choice
    auto): given the text from the last clean token boundary up to the section, it
    returns the GBNF the reply continues under, so a call the model begins is
    always valid. ``answered``: calls the conversation already has results for;
    with ``as_text`` (the grammar and parser of a plain answer, given the same
    kind of prefix), a reply that repeats one is taken back and answered in text.
    """

    parser: Parser
    max_calls: int = MAX_CALLS
    grammar: str | None = None
    lazy: Callable[[str], str] | None = None
    answered: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    as_text: Callable[[str], tuple[str, Parser]] | None = None


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
            raise _bad("response_format", f"the JSON schema cannot be turned into a grammar: {exc}") from exc
    return str(JSON_GBNF)


def template_extras(req: ChatRequest, family: Family) -> dict[str, Any]:
    """What a chat template gets beside its messages: the tools, when the family's template
    takes them (the generic scheme lists them in a system message instead), and the
    reasoning effort."""
    extra: dict[str, Any] = {}
    if req.tools is not None and family is not Family.GENERIC:
        extra["tools"] = req.tools.tools
    if req.reasoning_effort is not None:
        extra["reasoning_effort"] = req.reasoning_effort
    return extra


def plan_sampling(plan: ChatPlan, sampling: Sampling) -> Sampling:
    """The sampling the reply is drawn with: a plan's own grammar covers a JSON answer too."""
    if plan.grammar is not None or plan.lazy is not None:
        return dataclasses.replace(sampling, json_schema=None, json_object=False)
    return sampling


def chat_plan(req: ChatRequest, family: Family, *, think: bool, thinking: bool) -> ChatPlan:
    """How a model's reply is constrained and read (see ChatPlan).

    ``think``: the template's models reason in ``<think>``; ``thinking``: the prompt
    already opened it. Without tools, a JSON answer's grammar is ``json_gbnf``'s.
    """
    tools = req.tools
    sampling = req.sampling
    if family is Family.HARMONY:
        # gpt-oss's own channels carry calls; its special tokens are not held to a grammar here
        return ChatPlan(parser=HarmonyParser(tools=tools is not None))
    answer: dict[str, Any] | None = None
    if sampling.json_schema is not None:
        answer = dict(sampling.json_schema)
    elif sampling.json_object:
        answer = {"type": "object"}
    reasoning = "open" if thinking else ("optional" if think else None)
    if tools is None:
        return ChatPlan(parser=OutputParser(family, tools=False, think=think, thinking=thinking))
    functions = tools.allowed
    max_calls = tools.max_calls
    if tools.required or answer is not None:
        # the reply is constrained from its first token: calls only, or calls or a JSON answer
        grammar = call_grammar(
            family,
            functions,
            max_calls=max_calls,
            answer=None if tools.required else answer,
            think=reasoning,
        )
        return ChatPlan(
            parser=OutputParser(family, tools=True, think=think, thinking=thinking),
            max_calls=max_calls,
            grammar=grammar,
        )
    as_text = None
    if family is Family.GENERIC:

        def as_text(prefix: str) -> tuple[str, Parser]:
            grammar = TEXT_ONLY_GRAMMAR.replace("root ::=", f"root ::= {gbnf_literal(prefix)}", 1)
            return grammar, OutputParser(family, tools=False, think=think)

    return ChatPlan(
        parser=OutputParser(family, tools=True, think=think, thinking=thinking, halt_on_open=True),
        max_calls=max_calls,
        lazy=lambda prefix: call_grammar(family, functions, max_calls=max_calls, prefix=prefix),
        answered=req.answered(),
        as_text=as_text,
    )


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
    ) -> None:
        self.ctx = ctx
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
            key = (call.name, _canonical(call.arguments))
            if key in {(c.name, _canonical(c.arguments)) for c in calls[:-1]}:
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
) -> Reply:
    """The chat token loop: text, reasoning and calls, each streamed as it is generated.

    Stream chunks are ``{"text"[, "logprobs"]}``, ``{"reasoning"}``,
    ``{"call": {"index", "id", "name"}}`` and ``{"arguments", "index"}``
    (docs/agents.md). A reply never holds the same call twice (the repeat ends
    it) nor more than ``plan.max_calls``; a call after the first is streamed
    once it is complete, since it may be such a repeat.
    """
    limit = min(sampling.max_tokens or room, room)
    loop = _ChatLoop(ctx, plan, sampling, logprob_of)
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
    if logprob_of is not None:
        loop.logprobs.extend(loop.pending)
        data["logprobs"] = loop.logprobs
    return Reply(data)
