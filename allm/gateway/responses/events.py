"""A Responses stream: the manager's chunks as OpenAI's events, item by item, and the output they build.

A stream follows OpenAI's event grammar whatever the request: response.created
and response.in_progress together, once the manager has taken the request (its
first chunk: a request it refuses is a plain HTTP error, never a stream); then
each output item in the order the model makes it, an item closing when the next
begins or the stream ends:

- reasoning: output_item.added, content_part.added, reasoning_text.delta*,
  reasoning_text.done, content_part.done, output_item.done;
- message: output_item.added, content_part.added, output_text.delta*,
  output_text.done, content_part.done, output_item.done;
- function call: output_item.added (arguments ""), function_call_arguments.delta*
  as the arguments are generated, function_call_arguments.done, output_item.done;
- custom tool call: output_item.added (input ""), custom_tool_call_input.delta* as
  the input is generated (decoded from the ``{"input": "…"}`` the model writes),
  custom_tool_call_input.done, output_item.done;

then response.completed (response.incomplete at the token limit, or
response.failed with the error), each event with a rising sequence_number.
The final response's output is the items the events built. A reasoning item
gets its ``encrypted_content`` when it closes (output_item.done), when asked for.
"""

from __future__ import annotations

from typing import Any

from allm.gateway.errors import describe
from allm.gateway.responses.items import (
    InputDecoder,
    Item,
    call_item,
    custom_input,
    message_item,
    new_id,
    reasoning_item,
)
from allm.gateway.responses.turn import Turn
from allm.gateway.streaming import sse
from allm.kernel.codes import AllmError


class Events:
    """One response's stream: the manager's chunks as events, item by item, and the output they build."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.seq = 0
        self.output: list[Item] = []  # every item so far; the open one (if any) last
        self.open: str | None = None  # the type of the open item
        self.calls: dict[int, Item] = {}  # the manager's call index → its item
        self.inputs: dict[int, InputDecoder] = {}  # a custom call's index → its input so far
        self.arguments: dict[int, str] = {}  # a call's index → its arguments as the model wrote them

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(payload, event=kind)

    def failed(self, exc: AllmError) -> str:
        """The stream's end on a kernel error: response.failed, with the output so far and the error."""
        _status, body, _headers = describe(exc)
        error = {"code": body["error"]["code"], "message": exc.message}
        failed = self.turn.response("failed", output=self.output, error=error)
        return self.event("response.failed", response=failed)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}

    def _add(self, item: Item) -> str:
        out = self.close()
        self.output.append(item)
        self.open = item["type"]
        return out + self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)

    def _begin(self, kind: str) -> str:
        """Open a text item of this kind (reasoning or message) unless it is the open one."""
        if self.open == kind:
            return ""
        if kind == "reasoning":
            out = self._add(reasoning_item(new_id("rs"), None, "in_progress"))
            part: Item = {"type": "reasoning_text", "text": ""}
        else:
            out = self._add(message_item(new_id("msg"), None, "in_progress"))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out += self.event("response.content_part.added", **self._where(), content_index=0, part=part)
        self.output[-1]["content"].append(part)
        return out

    def feed(self, data: dict[str, Any]) -> str:
        """The events of one chunk: text, reasoning, a call's start or a call's arguments."""
        if "text" in data:
            out = self._begin("message")
            part = self.output[-1]["content"][0]
            part["text"] += data["text"]
            logprobs = (data.get("logprobs") or []) if self.turn.logprobs else []
            part["logprobs"].extend(logprobs)
            return out + self.event(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=data["text"],
                logprobs=logprobs,
            )
        if "reasoning" in data:
            out = self._begin("reasoning")
            self.output[-1]["content"][0]["text"] += data["reasoning"]
            return out + self.event(
                "response.reasoning_text.delta", **self._where(), content_index=0, delta=data["reasoning"]
            )
        if "call" in data:
            call = data["call"]
            item = call_item(call, "", "in_progress", self.turn.shown)
            self.calls[call["index"]] = item
            self.arguments[call["index"]] = ""
            if item["type"] == "custom_tool_call":
                self.inputs[call["index"]] = InputDecoder()
            return self._add(item)
        if "arguments" in data:
            index = data["index"]
            open_call = self.calls.get(index)
            if open_call is None or open_call is not self.output[-1] or self.open is None:
                return ""  # arguments of a call that is not open: nothing to say it with
            self.arguments[index] += data["arguments"]
            decoder = self.inputs.get(index)
            if decoder is None:
                open_call["arguments"] += data["arguments"]
                return self.event(
                    "response.function_call_arguments.delta", **self._where(), delta=data["arguments"]
                )
            return self._input_delta(open_call, decoder.feed(data["arguments"]))
        return ""

    def _input_delta(self, item: Item, delta: str) -> str:
        if not delta:
            return ""
        item["input"] += delta
        return self.event("response.custom_tool_call_input.delta", **self._where(), delta=delta)

    def close(self, status: str = "completed") -> str:
        """Close the open item, if any: its done events, with the item as it ended."""
        if self.open is None:
            return ""
        item = self.output[-1]
        where = self._where()
        if item["type"] != "custom_tool_call":  # OpenAI's custom tool calls have no status
            item["status"] = status
        out = ""
        if self.open == "message":
            part = item["content"][0]
            out += self.event(
                "response.output_text.done",
                **where,
                content_index=0,
                text=part["text"],
                logprobs=part["logprobs"],
            )
            out += self.event("response.content_part.done", **where, content_index=0, part=part)
        elif self.open == "reasoning":
            part = item["content"][0]
            out += self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            out += self.event("response.content_part.done", **where, content_index=0, part=part)
            seal = self.turn.sealing()
            if seal is not None:
                item["encrypted_content"] = seal(part["text"])
        elif self.open == "custom_tool_call":
            index = next(i for i, call in self.calls.items() if call is item)
            final = custom_input(self.arguments[index])
            if final.startswith(item["input"]):  # what the decoder held back, or all of it
                out += self._input_delta(item, final[len(item["input"]) :])
            item["input"] = final
            out += self.event("response.custom_tool_call_input.done", **where, input=final)
        else:
            out += self.event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            )
        self.open = None
        return out + self.event("response.output_item.done", output_index=where["output_index"], item=item)

    def finish(self, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The closing events for the final reply, and the final response.

        What the reply holds that no chunk announced (calls the engine delivers only at
        the end, text it never streamed) is sent as items of its own first, so the
        output is the same as a request without stream would get.
        """
        kinds = {item["type"] for item in self.output}
        out = ""
        if data.get("reasoning") and "reasoning" not in kinds:
            out += self.feed({"reasoning": data["reasoning"]})
        if data["text"] and "message" not in kinds:
            out += self.feed({"text": data["text"], "logprobs": data.get("logprobs")})
        for index, call in enumerate(data.get("tool_calls") or []):
            if index not in self.calls:
                out += self.feed({"call": {"index": index, "id": call["id"], "name": call["name"]}})
                out += self.feed({"arguments": call["arguments"], "index": index})
        answered = ("message", "function_call", "custom_tool_call")
        if not any(item["type"] in answered for item in self.output):
            out += self._begin("message")  # an empty answer is still a message, as without stream
        out += self.close("incomplete" if data["finish_reason"] == "length" else "completed")
        final = self.turn.response("completed", output=self.output, data=data)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + self.event(kind, response=final), final
