"""Ollama's answers: NDJSON lines as chunks come, a last line with counts and durations, or one object.

A stream is ``application/x-ndjson``, one JSON object a line: a line per piece of text or
reasoning (``done: false``), the tool calls whole in one line (their arguments as objects),
then the last line (``done: true``, ``done_reason``, the counts and the durations in
nanoseconds). An error after the stream has begun is one line ``{"error": "..."}``, the last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from allm.gateway.errors import OLLAMA, describe, shaped
from allm.gateway.ollama.models import now_text
from allm.gateway.streaming import Framing
from allm.kernel.codes import AllmError

#: the manager's finish reasons as Ollama's done_reason (Ollama ends a turn of calls with stop)
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}


def line(payload: Mapping[str, Any]) -> str:
    """One NDJSON line: compact JSON and a newline."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n"


def _failed(exc: AllmError) -> str:
    """After the stream began, an error is its last line, in Ollama's shape."""
    status, payload, _headers = describe(exc)
    return line(shaped(OLLAMA, status, payload)[1])


NDJSON = Framing("application/x-ndjson", {}, _failed)


class Clock:
    """The durations Ollama reports, in nanoseconds, as the gateway measures them: from the request's
    arrival to the model being ready (load), to the first piece of the answer (the prompt's
    evaluation, queueing included), to the end (generation)."""

    def __init__(self) -> None:
        self.started = time.monotonic_ns()
        self.loaded = self.started
        self.first: int | None = None

    def ready(self) -> None:
        """The model is loaded: what follows is the answer's."""
        self.loaded = time.monotonic_ns()

    def piece(self) -> None:
        """A piece of the answer came (only the first one counts)."""
        if self.first is None:
            self.first = time.monotonic_ns()

    def left_s(self, budget_s: float) -> float:
        """What is left of the request's time (request_timeout_s) once the model is ready."""
        return max(0.0, budget_s - (time.monotonic_ns() - self.started) / 1e9)

    def metrics(self, usage: Mapping[str, Any]) -> dict[str, int]:
        end = time.monotonic_ns()
        first = end if self.first is None else self.first
        return {
            "total_duration": end - self.started,
            "load_duration": self.loaded - self.started,
            "prompt_eval_count": usage["prompt_tokens"],
            "prompt_eval_duration": first - self.loaded,
            "eval_count": usage.get("completion_tokens", 0),
            "eval_duration": end - first,
        }


def tool_calls(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reply's calls as Ollama's, arguments as objects. A call the token limit cut short (its
    arguments are not a whole JSON object yet) is no call: done_reason says length."""
    calls: list[dict[str, Any]] = []
    for call in data.get("tool_calls") or ():
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except json.JSONDecodeError:
            continue
        if isinstance(arguments, dict):
            function = {"index": len(calls), "name": call["name"], "arguments": arguments}
            calls.append({"id": call["id"], "function": function})
    return calls


class Reply:
    """One answer of /api/chat or /api/generate; the endpoint says how its text is held (``body``).

    ``thinking``: the answer shows the model's reasoning (false when the request says ``think:
    false``); ``logprobs``: each piece carries its tokens' logprobs.
    """

    def __init__(self, name: str, *, thinking: bool, logprobs: bool) -> None:
        self.name = name
        self.thinking = thinking
        self.logprobs = logprobs

    def body(
        self,
        text: str,
        *,
        thinking: str = "",
        calls: list[dict[str, Any]] | None = None,
        logprobs: list[Any] | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _object(self, body: Mapping[str, Any], *, done: bool, **tail: Any) -> dict[str, Any]:
        return {"model": self.name, "created_at": now_text(), **body, "done": done, **tail}

    def feed(self, data: Mapping[str, Any]) -> str:
        """A chunk's line: a piece of text or of reasoning; calls wait for the end, whole."""
        if "text" in data:
            logprobs = data.get("logprobs") if self.logprobs else None
            return line(self._object(self.body(data["text"], logprobs=logprobs), done=False))
        if "reasoning" in data and self.thinking:
            return line(self._object(self.body("", thinking=data["reasoning"]), done=False))
        return ""

    def finish(self, data: Mapping[str, Any], metrics: Mapping[str, int]) -> str:
        """The stream's end: the calls in one line, then the last line."""
        calls = tool_calls(data)
        out = line(self._object(self.body("", calls=calls), done=False)) if calls else ""
        return out + line(self._done(self.body(""), data, metrics))

    def whole(self, data: Mapping[str, Any], metrics: Mapping[str, int]) -> dict[str, Any]:
        """The answer in one object (``stream: false``)."""
        body = self.body(
            data["text"],
            thinking=data.get("reasoning", "") if self.thinking else "",
            calls=tool_calls(data),
            logprobs=data.get("logprobs") if self.logprobs else None,
        )
        return self._done(body, data, metrics)

    def _done(
        self, body: Mapping[str, Any], data: Mapping[str, Any], metrics: Mapping[str, int]
    ) -> dict[str, Any]:
        return self._object(body, done=True, done_reason=DONE_REASONS[data["finish_reason"]], **metrics)

    def loaded(self, reason: str) -> dict[str, Any]:
        """The answer to a request with nothing to answer: the model was loaded (or unloaded)."""
        return self._object(self.body(""), done=True, done_reason=reason)


class ChatReply(Reply):
    """/api/chat's: the text in ``message``."""

    def body(
        self,
        text: str,
        *,
        thinking: str = "",
        calls: list[dict[str, Any]] | None = None,
        logprobs: list[Any] | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        out: dict[str, Any] = {"message": message}
        if logprobs:
            out["logprobs"] = logprobs
        return out


class GenerateReply(Reply):
    """/api/generate's: the text in ``response``."""

    def body(
        self,
        text: str,
        *,
        thinking: str = "",
        calls: list[dict[str, Any]] | None = None,
        logprobs: list[Any] | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"response": text}
        if thinking:
            out["thinking"] = thinking
        if calls:
            out["tool_calls"] = calls
        if logprobs:
            out["logprobs"] = logprobs
        return out
