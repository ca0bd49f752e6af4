"""OpenAI's stream grammars as checkers: Responses events item by item, Chat Completions chunks.

Both take what a client saw (the openai SDK's event objects or plain dicts off the
wire) and fail with the offending event; they return what the stream built, so a
test can compare it with the final response.
"""

from __future__ import annotations

import json
from typing import Any

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
#: what the SDK's stream helpers add to the events they pass on
HELPER_KEYS = frozenset({"snapshot", "parsed", "parsed_arguments"})


def plain(value: Any) -> Any:
    """An SDK object or a dict as JSON data, without None fields or what the SDK helpers add."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", warnings=False)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None and k not in HELPER_KEYS}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def check_response_events(events: list[Any]) -> list[dict[str, Any]]:
    """Assert the Responses event grammar; the output items the events built, as the terminal's output."""
    evs = [plain(e) for e in events]
    kinds = [e["type"] for e in evs]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds[:3]
    assert kinds[-1] in TERMINAL, kinds[-1]
    assert not set(kinds[:-1]) & set(TERMINAL), kinds
    seqs = [e["sequence_number"] for e in evs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert evs[0]["response"]["status"] == "in_progress"
    assert evs[0]["response"].get("output", []) == []
    rid = evs[0]["response"]["id"]
    items: list[dict[str, Any]] = []
    phase = None  # where the open item is: added, part, text_done, part_done, args_done
    built = ""  # the open item's text or arguments so far
    for e in evs[2:-1]:
        kind = e["type"]
        where = (e.get("item_id"), e.get("output_index"))
        current = (items[-1]["id"], len(items) - 1) if items else None
        if kind == "response.output_item.added":
            assert phase is None, f"item {len(items)} began before item {len(items) - 1} closed: {e}"
            assert e["output_index"] == len(items), e
            item = e["item"]
            if item["type"] == "custom_tool_call":  # OpenAI's custom tool calls have no status
                assert "status" not in item, e
                assert item["input"] == "", e
                assert item["name"], e
                assert item["call_id"], e
            elif item["type"] == "function_call":
                assert item["status"] == "in_progress", e
                assert item["arguments"] == "", e
                assert item["name"], e
                assert item["call_id"], e
            else:
                assert item["status"] == "in_progress", e
                assert item["type"] in ("message", "reasoning"), e
                assert item.get("content", []) == [], e
            items.append(item)
            phase, built = "added", ""
            continue
        assert phase is not None, f"{kind} outside an item: {e}"
        assert current is not None, e
        assert where[1] == current[1], f"{kind} names another item: {e}"
        if kind != "response.output_item.done":
            assert where[0] == current[0], f"{kind} names another item: {e}"
        open_type = items[-1]["type"]
        text_kind = {"message": "output_text", "reasoning": "reasoning_text"}.get(open_type)
        if kind == "response.content_part.added":
            assert (phase, e["content_index"], e["part"]["type"], e["part"]["text"]) == (
                "added",
                0,
                text_kind,
                "",
            ), e
            phase = "part"
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            assert (phase, kind, e["content_index"]) == ("part", f"response.{text_kind}.delta", 0), e
            built += e["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert (phase, kind) == ("part", f"response.{text_kind}.done"), e
            assert e["text"] == built, (e["text"], built)
            phase = "text_done"
        elif kind == "response.content_part.done":
            assert (phase, e["part"]["type"], e["part"]["text"]) == ("text_done", text_kind, built), e
            phase = "part_done"
        elif kind == "response.function_call_arguments.delta":
            assert (open_type, phase) == ("function_call", "added"), e
            built += e["delta"]
        elif kind == "response.function_call_arguments.done":
            assert (open_type, phase, e["arguments"]) == ("function_call", "added", built), e
            assert e.get("name") in (None, items[-1]["name"]), e
            phase = "args_done"
        elif kind == "response.custom_tool_call_input.delta":
            assert (open_type, phase) == ("custom_tool_call", "added"), e
            assert e["delta"], e
            built += e["delta"]
        elif kind == "response.custom_tool_call_input.done":
            assert (open_type, phase, e["input"]) == ("custom_tool_call", "added", built), e
            phase = "args_done"
        elif kind == "response.output_item.done":
            calls = ("function_call", "custom_tool_call")
            assert phase == ("args_done" if open_type in calls else "part_done"), (phase, e)
            item = e["item"]
            assert (item["id"], item["type"]) == (items[-1]["id"], open_type), e
            if open_type != "custom_tool_call":
                assert item["status"] in ("completed", "incomplete"), e
            if open_type == "function_call":
                assert item["arguments"] == built, e
            elif open_type == "custom_tool_call":
                assert item["input"] == built, e
            else:
                assert [part["text"] for part in item["content"]] == [built], e
            items[-1] = item
            phase = None
        else:
            raise AssertionError(f"an event outside the grammar: {e}")
    final = evs[-1]["response"]
    assert final["id"] == rid
    if kinds[-1] != "response.failed":
        assert phase is None, "the stream ended with an item open"
        assert final["output"] == items, (final["output"], items)
        assert final["status"] == kinds[-1].removeprefix("response."), final["status"]
    return items


def check_chat_chunks(chunks: list[Any], *, ended: bool = True) -> dict[str, Any]:
    """Assert the Chat Completions chunk grammar; the message the deltas built, with finish_reason.

    ``ended=False``: the chunks stop before the finishing one (a client gave up there).
    """
    cs = [plain(c) for c in chunks]
    assert len({c["id"] for c in cs}) == 1, "chunks of one completion carry one id"
    with_choices = [c for c in cs if c.get("choices")]
    first = with_choices[0]["choices"][0]["delta"]
    assert first.get("role") == "assistant", first
    content, reasoning, calls = "", "", {}
    finishes = [c["choices"][0].get("finish_reason") for c in with_choices]
    if not ended:
        finishes.append("length")
    assert finishes[-1] is not None, finishes
    assert all(f is None for f in finishes[:-1]), finishes
    for c in with_choices:
        delta = c["choices"][0]["delta"]
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls") or []:
            index = call["index"]
            fn = call.get("function", {})
            if index not in calls:
                assert call["id"], call
                assert call["type"] == "function", call
                assert fn["name"], call
                assert index == len(calls), "calls are numbered in order from 0"
                calls[index] = {"id": call["id"], "name": fn["name"], "arguments": ""}
            else:
                assert "id" not in call, f"a call began twice: {call}"
                assert "name" not in fn, f"a call began twice: {call}"
                assert index == len(calls) - 1, "arguments of a call after the next began"
            calls[index]["arguments"] += fn.get("arguments") or ""
    finish = finishes[-1]
    if finish != "length":
        assert (finish == "tool_calls") == bool(calls), (finish, calls)
        for call in calls.values():
            json.loads(call["arguments"])
    return {"content": content, "reasoning": reasoning, "calls": list(calls.values()), "finish": finish}
