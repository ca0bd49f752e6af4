"""Anthropic's content blocks both ways: a request as the text manager's chat turn, a reply as blocks.

In: ``system`` and each message's blocks become chat messages. Text, documents and search
results are text; an assistant's ``tool_use`` blocks are its calls and a user's ``tool_result``
blocks are ``tool`` messages (in the order they come); ``thinking`` and ``redacted_thinking``
are the reasoning of an earlier turn, read from their sealed ``signature`` or ``data``
(allm/gateway/seal.py), so a block whose text was changed, or that allm did not make, is a
400 naming it.

Out: a thinking block first (when the model reasoned), then the text, then each call as a
``tool_use`` block with a ``toolu_`` id and its input as an object.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from allm.gateway.errors import bad_field
from allm.gateway.seal import Sealer

Block = dict[str, Any]
#: the kind of payload a thinking block's signature (or redacted_thinking's data) seals
THINKING = "thinking"
#: how a reply's reasoning is shown: a thinking block with its text, one with only its signature
#: (``display: "omitted"``), or none (thinking ``disabled``: the model may reason all the same)
SHOWN, OMITTED, HIDDEN = "shown", "omitted", "hidden"


def display_of(payload: dict[str, Any]) -> str:
    thinking = payload.get("thinking", {})
    if thinking.get("type") == "disabled":
        return HIDDEN
    return OMITTED if thinking.get("display") == "omitted" else SHOWN


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def tool_id(call_id: str) -> str:
    """The manager's call id (``call_…``) as Anthropic spells a tool_use id."""
    return "toolu_" + call_id.removeprefix("call_")


def text_of(content: str | list[Block]) -> str:
    """Text content, or the text of its blocks (text, document, search result), a line apart."""
    if isinstance(content, str):
        return content
    return "\n".join(_block_text(block) for block in content)


def _block_text(block: Block) -> str:
    kind = block["type"]
    if kind == "text":
        text: str = block["text"]
        return text
    if kind == "document":
        source = block["source"]
        body = source["data"] if source["type"] == "text" else text_of(source["content"])
        return "\n".join([*(block[k] for k in ("title", "context") if block.get(k)), body])
    # search_result
    return "\n".join([block["title"], block["source"], text_of(block["content"])])


def chat_messages(payload: dict[str, Any], sealer: Sealer) -> list[dict[str, Any]]:
    """The checked body's ``system`` and ``messages`` as the text manager's chat messages."""
    out: list[dict[str, Any]] = []
    if payload.get("system"):
        out.append({"role": "system", "content": text_of(payload["system"])})
    for i, message in enumerate(payload["messages"]):
        where = f"messages[{i}]"
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        elif message["role"] == "assistant":
            out.append(_assistant(content, where, sealer))
        else:
            out.extend(_user(message["role"], content, where))
    return out


def _refused(where: str, kind: str, role: str) -> Exception:
    return bad_field(where, f"'{where}' is a {kind} block, which {role} messages cannot hold")


def _user(role: str, blocks: list[Block], where: str) -> list[dict[str, Any]]:
    """A user (or system) message's blocks: its text, and each tool result as a tool message, in order."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        kind = block["type"]
        if kind == "tool_result":
            if texts:
                out.append({"role": role, "content": "\n".join(texts)})
                texts = []
            out.append(_tool_result(block))
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            raise _refused(f"{where}.content[{j}]", kind, role)
        else:
            texts.append(_block_text(block))
    if texts or not out:
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def _tool_result(block: Block) -> dict[str, Any]:
    text = text_of(block.get("content", ""))
    if block.get("is_error"):
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _assistant(blocks: list[Block], where: str, sealer: Sealer) -> dict[str, Any]:
    """An assistant message's blocks: its text, its calls and its earlier reasoning, as one message."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block["type"]
        at = f"{where}.content[{j}]"
        if kind == "tool_use":
            arguments = json.dumps(block["input"], separators=(",", ":"))
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind == "thinking":
            reasoning.append(_thinking(block, at, sealer))
        elif kind == "redacted_thinking":
            reasoning.append(_opened(sealer, block["data"], f"{at}.data")["text"])
        elif kind == "tool_result":
            raise _refused(at, kind, "assistant")
        else:
            texts.append(_block_text(block))
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    return message


def _opened(sealer: Sealer, token: str, param: str) -> dict[str, Any]:
    payload = sealer.unseal(token, param)
    if payload.get("kind") != THINKING:  # sealed by this server, but for something else
        raise bad_field(param, f"'{param}' does not hold a thinking block's reasoning")
    return payload


def _thinking(block: Block, at: str, sealer: Sealer) -> str:
    """The reasoning a thinking block carries, once its signature shows it is allm's and unchanged."""
    payload = _opened(sealer, block["signature"], f"{at}.signature")
    text: str = payload["text"]
    # an omitted block came with no text: its signature alone carries it
    if block["thinking"] != text and (payload["shown"] or block["thinking"]):
        raise bad_field(
            f"{at}.thinking",
            f"'{at}.thinking' is not the text its signature seals: "
            "send thinking blocks back exactly as they came",
        )
    return text


def thinking_block(reasoning: str, sealer: Sealer, *, shown: bool) -> Block:
    """A thinking block, its signature sealing the reasoning (which ``shown`` false leaves out)."""
    return {
        "type": "thinking",
        "thinking": reasoning if shown else "",
        "signature": signature(reasoning, sealer, shown),
    }


def signature(reasoning: str, sealer: Sealer, shown: bool) -> str:
    return sealer.seal({"kind": THINKING, "text": reasoning, "shown": shown})


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON-text arguments as the object tool_use carries ({} for a call cut short)."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_use_block(call: dict[str, Any]) -> Block:
    return {
        "type": "tool_use",
        "id": tool_id(call["id"]),
        "name": call["name"],
        "input": tool_input(call["arguments"]),
    }


def content(data: dict[str, Any], sealer: Sealer, *, display: str) -> list[Block]:
    """A reply's blocks: thinking, text, calls; an empty text block when it has neither text nor calls."""
    blocks: list[Block] = []
    if data.get("reasoning") and display != HIDDEN:
        blocks.append(thinking_block(data["reasoning"], sealer, shown=display == SHOWN))
    calls = data.get("tool_calls") or []
    if data["text"] or not calls:
        blocks.append({"type": "text", "text": data["text"]})
    blocks.extend(tool_use_block(call) for call in calls)
    return blocks


def stop_reason(data: dict[str, Any]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for the manager's finish."""
    if data.get("stop_sequence") is not None:
        return "stop_sequence", data["stop_sequence"]
    finish = data["finish_reason"]
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls":
        return "tool_use", None
    return "end_turn", None


def usage(data: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage: input_tokens are those not read from the cache (their sum is the prompt)."""
    cached = data.get("cached_tokens", 0)
    return {
        "input_tokens": data["usage"]["prompt_tokens"] - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": data["usage"]["completion_tokens"],
    }


def message(
    message_id: str, model: str, data: dict[str, Any], sealer: Sealer, *, display: str
) -> dict[str, Any]:
    """The whole answer of a request without stream."""
    reason, sequence = stop_reason(data)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content(data, sealer, display=display),
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(data),
    }
