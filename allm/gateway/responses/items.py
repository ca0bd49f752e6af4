"""Responses items: a request's input as OpenAI's item shapes with ids, items as chat messages, output items.

A stored response keeps its input items in these shapes (what
``GET /v1/responses/{id}/input_items`` lists), and a follow-up with
``previous_response_id`` continues from them and the earlier output: every
item of the earlier turns, ``system`` and ``developer`` messages included.

The model sees every callable tool as a function, by its ``shown`` name: a namespace's
tools as ``namespace.name``, a custom tool as a function of one string, ``input``
(allm/managers/text/chat_grammar.py). Calls come back under those names, and become
``function_call`` items (with their ``namespace``) or ``custom_tool_call`` items.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from allm.gateway.fields import text_of

Item = dict[str, Any]


class Tool(NamedTuple):
    """A callable tool as the request named it: its kind (function or custom), name and namespace."""

    kind: str
    name: str
    namespace: str | None


#: the tools by the name the model sees them by
Shown = Mapping[str, Tool]


def shown_name(name: str, namespace: str | None) -> str:
    """The name the model sees a tool by: a namespace's tools as ``namespace.name``."""
    return f"{namespace}.{name}" if namespace else name


def custom_arguments(text: str) -> str:
    """A custom call's input as the arguments the model wrote it in."""
    return json.dumps({"input": text}, ensure_ascii=False)


def custom_input(arguments: str) -> str:
    """The input of a custom call from its arguments: ``{"input": "…"}``, or as much of it as the
    reply holds (it was cut short at the token limit); other text is the input itself."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        decoder = InputDecoder()
        decoder.feed(arguments)
        return decoder.text if decoder.at is not None else arguments
    text = value.get("input") if isinstance(value, dict) else None
    return text if isinstance(text, str) else arguments


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _parts(content: str | list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Message content as parts of one kind: input_text for what was said to the model, output_text for it."""
    texts = [content] if isinstance(content, str) else [part["text"] for part in content]
    if kind == "output_text":
        return [{"type": kind, "text": text, "annotations": [], "logprobs": []} for text in texts]
    return [{"type": kind, "text": text} for text in texts]


def input_items(
    raw: str | list[dict[str, Any]], reasoning_of: Callable[[str, str], str] | None = None
) -> list[Item]:
    """Checked Responses ``input`` (a string or a list of items) as items with ids, in OpenAI's shapes.

    ``reasoning_of(encrypted_content, param)``: the reasoning text a sealed reasoning item
    holds (a 400 naming ``param`` if allm did not seal it); a reasoning item without its
    text gets it back from there.
    """
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    out: list[Item] = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message")
        if kind == "message":
            assistant = item["role"] == "assistant"
            out.append(
                {
                    "type": "message",
                    "id": item.get("id") or new_id("msg"),
                    "role": item["role"],
                    "status": item.get("status", "completed"),
                    "content": _parts(item["content"], "output_text" if assistant else "input_text"),
                }
            )
        elif kind in ("function_call", "custom_tool_call"):
            call = {
                "type": kind,
                "id": item.get("id") or new_id("fc" if kind == "function_call" else "ctc"),
                "call_id": item["call_id"],
                "name": item["name"],
                **({"arguments": item["arguments"]} if kind == "function_call" else {"input": item["input"]}),
                "status": item.get("status", "completed"),
            }
            if "namespace" in item:
                call["namespace"] = item["namespace"]
            out.append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append(
                {
                    "type": kind,
                    "id": item.get("id") or new_id("fco" if kind == "function_call_output" else "ctco"),
                    "call_id": item["call_id"],
                    "output": item["output"],
                    "status": item.get("status", "completed"),
                }
            )
        else:  # reasoning
            reasoning: Item = {
                "type": "reasoning",
                "id": item.get("id") or new_id("rs"),
                "summary": item["summary"],
                "content": item.get("content", []),
                "status": item.get("status", "completed"),
            }
            sealed = item.get("encrypted_content")
            if sealed is not None and reasoning_of is not None:
                text = reasoning_of(sealed, f"input[{i}].encrypted_content")
                reasoning["encrypted_content"] = sealed
                if not reasoning["content"] and text:
                    reasoning["content"] = [{"type": "reasoning_text", "text": text}]
            out.append(reasoning)
    return out


def item_messages(items: list[Item]) -> list[dict[str, Any]]:
    """Items as the manager's chat messages: roles kept, calls on their assistant message, results by id.

    A function call joins the assistant message just before it (a model may write text,
    then call); a reasoning item becomes ``reasoning_content`` of the assistant turn after it.
    """
    out: list[dict[str, Any]] = []
    reasoning = ""
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            parts = item.get("content") or item["summary"]
            reasoning += "".join(part["text"] for part in parts)
        elif kind == "message":
            msg: dict[str, Any] = {"role": item["role"], "content": text_of(item["content"])}
            if item["role"] == "assistant" and reasoning:
                msg["reasoning_content"], reasoning = reasoning, ""
            out.append(msg)
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item["arguments"] if kind == "function_call" else custom_arguments(item["input"])
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": shown_name(item["name"], item.get("namespace")), "arguments": arguments},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if reasoning:
                out[-1].setdefault("reasoning_content", reasoning)
                reasoning = ""
        else:  # function_call_output, custom_tool_call_output
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text_of(item["output"])})
    return out


def reasoning_item(item_id: str, text: str | None, status: str) -> Item:
    """A reasoning item; ``text`` None while it is only announced."""
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def message_item(item_id: str, text: str | None, status: str, logprobs: list[Any] | None = None) -> Item:
    """An assistant message item with one output_text part; ``text`` None while it is only announced."""
    content = (
        []
        if text is None
        else [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(call: dict[str, Any], arguments: str, status: str, shown: Shown) -> Item:
    """The item of the manager's call ({id, name, ...}): a function_call, or a custom_tool_call
    whose input is ``arguments`` decoded (``""`` while it is only announced)."""
    tool = shown.get(call["name"], Tool("function", call["name"], None))
    if tool.kind == "custom":
        item: Item = {
            "type": "custom_tool_call",
            "id": new_id("ctc"),
            "call_id": call["id"],
            "name": tool.name,
            "input": custom_input(arguments) if arguments else "",
        }
    else:
        item = {
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": call["id"],
            "name": tool.name,
            "arguments": arguments,
            "status": status,
        }
    if tool.namespace:
        item["namespace"] = tool.namespace
    return item


def output_items(data: dict[str, Any], shown: Shown, seal: Callable[[str], str] | None = None) -> list[Item]:
    """A finished reply's output: reasoning if any, the message (if text, or no calls), the calls.

    ``seal``: the reasoning's ``encrypted_content``, when the request included it."""
    out: list[Item] = []
    if data.get("reasoning"):
        out.append(reasoning_item(new_id("rs"), data["reasoning"], "completed"))
        if seal is not None:
            out[-1]["encrypted_content"] = seal(data["reasoning"])
    calls = data.get("tool_calls") or []
    if data["text"] or not calls:
        out.append(message_item(new_id("msg"), data["text"], "completed", data.get("logprobs")))
    out.extend(call_item(call, call["arguments"], "completed", shown) for call in calls)
    if data["finish_reason"] == "length" and "status" in out[-1]:
        out[-1]["status"] = "incomplete"
    return out


JSON_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"'}


class InputDecoder:
    """A custom call's input as its arguments stream in: the text of the JSON string ``input``.

    The grammar makes the arguments ``{"input": "…"}``; each piece of them gives the
    input's characters it completes (an escape cut in two waits for its second half).
    """

    HEAD = re.compile(r'\s*\{\s*"input"\s*:\s*"')

    def __init__(self) -> None:
        self.raw = ""
        self.at: int | None = None  # where the undecoded input begins in ``raw``
        self.done = False
        self.text = ""  # the input decoded so far

    def feed(self, piece: str) -> str:
        """The input text that ``piece`` of the arguments completes."""
        self.raw += piece
        if self.at is None:
            head = self.HEAD.match(self.raw)
            if head is None:
                return ""
            self.at = head.end()
        out: list[str] = []
        raw, at = self.raw, self.at
        while not self.done and at < len(raw):
            c = raw[at]
            if c == '"':
                self.done = True
                break
            if c != "\\":
                out.append(c)
                at += 1
                continue
            step, char = self._escape(raw, at)
            if not step:
                break
            out.append(char)
            at += step
        self.at = at
        text = "".join(out)
        self.text += text
        return text

    def _escape(self, raw: str, at: int) -> tuple[int, str]:
        """(characters used, text) of the escape at ``raw[at]``; (0, "") if it is not complete yet."""
        if at + 1 >= len(raw):
            return 0, ""
        kind = raw[at + 1]
        if kind != "u":
            return 2, JSON_ESCAPES.get(kind, kind)
        if at + 6 > len(raw):
            return 0, ""
        code = _hex(raw[at + 2 : at + 6])
        if code is None:
            return 2, "u"
        if 0xD800 <= code < 0xDC00:  # a high surrogate: its low half follows
            low = raw[at + 6 : at + 12]
            if len(low) < 6 and "\\u".startswith(low[:2]):
                return 0, ""
            second = _hex(low[2:]) if low.startswith("\\u") else None
            if second is not None and 0xDC00 <= second < 0xE000:
                return 12, chr(0x10000 + ((code - 0xD800) << 10) + (second - 0xDC00))
        return 6, chr(code)


def _hex(digits: str) -> int | None:
    if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        return None
    return int(digits, 16)
