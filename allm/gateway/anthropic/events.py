"""A Messages stream: the manager's chunks as Anthropic's server-sent events, block by block.

Each event is ``event: <type>`` and ``data: {"type": <type>, …}``, in Anthropic's grammar
(anthropic-sdk-python's ``types/raw_message_stream_event.py``):

- ``message_start``: the message with empty content and the prompt's ``input_tokens``;
- per block, in the order the model makes them, its index rising from 0:
  ``content_block_start``, ``content_block_delta``* (``thinking_delta`` then one
  ``signature_delta``, ``text_delta``, or ``input_json_delta`` with ``partial_json``),
  ``content_block_stop``, a block closing when the next begins or the reply ends;
- ``message_delta`` with ``stop_reason``, ``stop_sequence`` and the final usage
  (``input_tokens``, the cache's share and ``output_tokens``);
- ``message_stop``.

``ping`` events keep a connection busy while the first token is long in coming; an error
after the stream began is one ``error`` event, ``{"type": "error", "error": {…}}``, and the
stream ends (``FRAMING``).
"""

from __future__ import annotations

from typing import Any

from allm.gateway.anthropic.blocks import HIDDEN, SHOWN, Block, signature, stop_reason, tool_id, usage
from allm.gateway.errors import ANTHROPIC, describe, shaped
from allm.gateway.seal import Sealer
from allm.gateway.streaming import Framing, sse
from allm.kernel.codes import AllmError


def event(kind: str, **fields: Any) -> str:
    return sse({"type": kind, **fields}, event=kind)


PING = event("ping")


def failed(exc: AllmError) -> str:
    """An error after the stream began: one error event in Anthropic's shape."""
    status, payload, _headers = describe(exc)
    _status, body = shaped(ANTHROPIC, status, payload)
    return sse(body, event="error")


FRAMING = Framing("text/event-stream", {"Cache-Control": "no-cache"}, failed)


class Events:
    """One message's stream: the manager's chunks as events, and the blocks they build."""

    def __init__(self, message_id: str, model: str, sealer: Sealer, *, display: str) -> None:
        self.message_id = message_id
        self.model = model
        self.sealer = sealer
        self.display = display  # how reasoning is shown (blocks.SHOWN, OMITTED, HIDDEN)
        self.blocks: list[Block] = []  # every block so far; the open one (if any) last
        self.open = False
        self.reasoning = ""  # the open thinking block's text, sent or not
        self.calls: dict[int, int] = {}  # the manager's call index → its block's index

    def start(self, prompt_tokens: int, cached: int = 0) -> str:
        """message_start: the message as it begins, with the prompt's length where known yet
        (``input_tokens`` those not read from the cache, as in the final usage)."""
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": prompt_tokens - cached,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached,
                "output_tokens": 0,
            },
        }
        return event("message_start", message=message)

    def _begin(self, block: Block) -> str:
        out = self.close()
        self.blocks.append(block)
        self.open = True
        return out + event("content_block_start", index=len(self.blocks) - 1, content_block=block)

    def _delta(self, **delta: Any) -> str:
        return event("content_block_delta", index=len(self.blocks) - 1, delta=delta)

    def _open_kind(self) -> str | None:
        return self.blocks[-1]["type"] if self.open else None

    def feed(self, data: dict[str, Any]) -> str:
        """The events of one chunk: text, reasoning, a call's start or a call's arguments."""
        if data.get("text"):
            out = "" if self._open_kind() == "text" else self._begin({"type": "text", "text": ""})
            return out + self._delta(type="text_delta", text=data["text"])
        if data.get("reasoning"):
            if self.display == HIDDEN:
                return ""
            out = ""
            if self._open_kind() != "thinking":
                out = self._begin({"type": "thinking", "thinking": "", "signature": ""})
                self.reasoning = ""
            self.reasoning += data["reasoning"]
            if self.display != SHOWN:
                return out
            return out + self._delta(type="thinking_delta", thinking=data["reasoning"])
        if "call" in data:
            call = data["call"]
            block = {"type": "tool_use", "id": tool_id(call["id"]), "name": call["name"], "input": {}}
            out = self._begin(block)
            self.calls[call["index"]] = len(self.blocks) - 1
            return out
        if "arguments" in data:
            if self._open_kind() != "tool_use" or self.calls.get(data["index"]) != len(self.blocks) - 1:
                return ""  # arguments of a call that is not open: nothing to say them with
            return self._delta(type="input_json_delta", partial_json=data["arguments"])
        return ""

    def close(self) -> str:
        """Close the open block, if any: a thinking block's signature, then its stop."""
        if not self.open:
            return ""
        out = ""
        if self.blocks[-1]["type"] == "thinking":
            out += self._delta(
                type="signature_delta",
                signature=signature(self.reasoning, self.sealer, self.display == SHOWN),
            )
        self.open = False
        return out + event("content_block_stop", index=len(self.blocks) - 1)

    def finish(self, data: dict[str, Any]) -> str:
        """The closing events for the final reply.

        What the reply holds that no chunk announced (calls an engine delivers only at
        the end, text it never streamed) goes out as blocks of its own first, so the
        blocks are those a request without stream gets.
        """
        kinds = {block["type"] for block in self.blocks}
        out = ""
        if data.get("reasoning") and "thinking" not in kinds:
            out += self.feed({"reasoning": data["reasoning"]})
        if data["text"] and "text" not in kinds:
            out += self.feed({"text": data["text"]})
        for index, call in enumerate(data.get("tool_calls") or []):
            if index not in self.calls:
                out += self.feed({"call": {"index": index, "id": call["id"], "name": call["name"]}})
                out += self._delta(type="input_json_delta", partial_json=call["arguments"])
        if not {block["type"] for block in self.blocks} & {"text", "tool_use"}:
            out += self._begin({"type": "text", "text": ""})  # an empty answer is still a text block
        out += self.close()
        reason, sequence = stop_reason(data)
        out += event(
            "message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=usage(data)
        )
        return out + event("message_stop")
