"""Responses items: a request's input as OpenAI's item shapes with ids, items as chat messages, output items.

A stored response keeps its input items in these shapes (what
``GET /v1/responses/{id}/input_items`` lists), and a follow-up with
``previous_response_id`` continues from them and the earlier output: every
item of the earlier turns, ``system`` and ``developer`` messages included.
"""

from __future__ import annotations

import uuid
from typing import Any

from allm.gateway.fields import text_of

Item = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _parts(content: str | list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Message content as parts of one kind: input_text for what was said to the model, output_text for it."""
    texts = [content] if isinstance(content, str) else [part["text"] for part in content]
    if kind == "output_text":
        return [{"type": kind, "text": text, "annotations": [], "logprobs": []} for text in texts]
    return [{"type": kind, "text": text} for text in texts]


def input_items(raw: str | list[dict[str, Any]]) -> list[Item]:
    """Checked Responses ``input`` (a string or a list of items) as items with ids, in OpenAI's shapes."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    out: list[Item] = []
    for item in raw:
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
        elif kind == "function_call":
            out.append(
                {
                    "type": "function_call",
                    "id": item.get("id") or new_id("fc"),
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                    "status": item.get("status", "completed"),
                }
            )
        elif kind == "function_call_output":
            out.append(
                {
                    "type": "function_call_output",
                    "id": item.get("id") or new_id("fco"),
                    "call_id": item["call_id"],
                    "output": item["output"],
                    "status": item.get("status", "completed"),
                }
            )
        else:  # reasoning
            out.append(
                {
                    "type": "reasoning",
                    "id": item.get("id") or new_id("rs"),
                    "summary": item["summary"],
                    "content": item.get("content", []),
                    "status": item.get("status", "completed"),
                }
            )
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
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if reasoning:
                out[-1].setdefault("reasoning_content", reasoning)
                reasoning = ""
        else:  # function_call_output
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


def call_item(item_id: str, call: dict[str, Any], arguments: str, status: str) -> Item:
    """A function_call item from the manager's call ({id, name, ...})."""
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call["id"],
        "name": call["name"],
        "arguments": arguments,
        "status": status,
    }


def output_items(data: dict[str, Any]) -> list[Item]:
    """A finished reply's output: reasoning if any, the message (if text, or no calls), the calls."""
    out: list[Item] = []
    if data.get("reasoning"):
        out.append(reasoning_item(new_id("rs"), data["reasoning"], "completed"))
    calls = data.get("tool_calls") or []
    if data["text"] or not calls:
        out.append(message_item(new_id("msg"), data["text"], "completed", data.get("logprobs")))
    out.extend(call_item(new_id("fc"), call, call["arguments"], "completed") for call in calls)
    if data["finish_reason"] == "length":
        out[-1]["status"] = "incomplete"
    return out
