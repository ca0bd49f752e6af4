"""Anthropic's Messages API: the request bodies of POST /v1/messages and /v1/messages/count_tokens.

The shapes are anthropic-sdk-python's (``types/message_create_params.py``, ``message_param.py``,
``tool_param.py``, ``message_count_tokens_params.py``). Content is text: an image, a PDF or a
server tool's block is refused naming the block (``messages[0].content[1]``). A server tool
(``web_search_…``, ``code_execution_…``, ``bash_…``: any ``type`` but ``custom``) is dropped
and noted like an unknown field, so a client that offers one still gets an answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from allm.gateway import schemas
from allm.gateway.bounds import (
    ACCEPTED,
    CALL_ID,
    EXTENSIONS,
    FUNCTION,
    MESSAGES,
    MODEL,
    NAME,
    PARAMETERS_SCHEMA,
    PARTS,
    RESPONSE_SCHEMA,
    SEED,
    STREAM,
    TEMPERATURE,
    TEXT,
    TOKENS,
    TOOLS,
    TOP_P,
    Body,
    penalties,
    sampling_node,
)
from allm.gateway.errors import bad_field
from allm.gateway.spec import (
    IGNORED,
    MAX_NOTED_NAME,
    AnyJson,
    Arr,
    Bool,
    Checked,
    Either,
    Enum,
    Int,
    Map,
    Node,
    Obj,
    Schema,
    Str,
    Tagged,
    tagged_variant,
)

#: Claude Code's own tools have descriptions past OpenAI's 8 KB
TOOL_DESCRIPTION = 65536
TEXT_ONLY = "text only: image inputs are not supported yet"
SERVER_BLOCK = "the blocks of Anthropic's server tools are not supported"
CACHE_CONTROL = Obj(
    fields={"type": Enum(values=("ephemeral",)), "ttl": Enum(values=("5m", "1h"))},
    required=("type",),
    description="accepted: each conversation's prompt prefix is cached without being asked",
)
CITATIONS = Arr(items=AnyJson(), max_items=PARTS, description=ACCEPTED)
TEXT_BLOCK = tagged_variant(
    "type",
    {"text": Str(max_length=TEXT), "cache_control": CACHE_CONTROL, "citations": CITATIONS},
    ("text",),
)
TEXT_PARTS = Arr(
    items=Tagged(tag="type", variants={"text": TEXT_BLOCK}, unsupported={"image": TEXT_ONLY}),
    max_items=PARTS,
)
DOCUMENT_SOURCE = Tagged(
    tag="type",
    variants={
        "text": tagged_variant(
            "type", {"data": Str(max_length=TEXT), "media_type": Enum(values=("text/plain",))}, ("data",)
        ),
        "content": tagged_variant(
            "type", {"content": Either(options=(Str(max_length=TEXT), TEXT_PARTS))}, ("content",)
        ),
    },
    unsupported={kind: "text documents only" for kind in ("base64", "url", "file")},
)
DOCUMENT = tagged_variant(
    "type",
    {
        "source": DOCUMENT_SOURCE,
        "title": Str(max_length=TEXT),
        "context": Str(max_length=TEXT),
        "citations": AnyJson(description=ACCEPTED),
        "cache_control": CACHE_CONTROL,
    },
    ("source",),
)
SEARCH_RESULT = tagged_variant(
    "type",
    {
        "content": TEXT_PARTS,
        "source": Str(max_length=TEXT),
        "title": Str(max_length=TEXT),
        "citations": AnyJson(description=ACCEPTED),
        "cache_control": CACHE_CONTROL,
    },
    ("content", "source", "title"),
)
TOOL_RESULT_PART = Tagged(
    tag="type",
    variants={"text": TEXT_BLOCK, "document": DOCUMENT, "search_result": SEARCH_RESULT},
    unsupported={"image": TEXT_ONLY, "tool_reference": "tool search is not supported"},
)
TOOL_INPUT = Map(values=AnyJson(), keys=Str(max_length=NAME), max_properties=1024)
SERVER_BLOCKS = (
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "container_upload",
)
BLOCK = Tagged(
    tag="type",
    variants={
        "text": TEXT_BLOCK,
        "document": DOCUMENT,
        "search_result": SEARCH_RESULT,
        "tool_use": tagged_variant(
            "type",
            {
                "id": CALL_ID,
                "name": Str(min_length=1, max_length=NAME),
                "input": TOOL_INPUT,
                "cache_control": CACHE_CONTROL,
                "caller": AnyJson(description=ACCEPTED),
            },
            ("id", "name", "input"),
        ),
        "tool_result": tagged_variant(
            "type",
            {
                "tool_use_id": CALL_ID,
                "content": Either(
                    options=(Str(max_length=TEXT), Arr(items=TOOL_RESULT_PART, max_items=PARTS))
                ),
                "is_error": Bool(description="the tool failed: the model reads the content as its error"),
                "cache_control": CACHE_CONTROL,
            },
            ("tool_use_id",),
        ),
        "thinking": tagged_variant(
            "type",
            {
                "thinking": Str(max_length=TEXT),
                "signature": Str(
                    min_length=1, max_length=TEXT, description="as allm made it: it seals the thinking text"
                ),
            },
            ("thinking", "signature"),
        ),
        "redacted_thinking": tagged_variant(
            "type", {"data": Str(min_length=1, max_length=TEXT, description="as allm made it")}, ("data",)
        ),
    },
    unsupported={"image": TEXT_ONLY, **dict.fromkeys(SERVER_BLOCKS, SERVER_BLOCK)},
)
MESSAGE = Obj(
    fields={
        "role": Enum(values=("user", "assistant", "system")),
        "content": Either(options=(Str(max_length=TEXT), Arr(items=BLOCK, max_items=PARTS))),
    },
    required=("role", "content"),
)
SYSTEM = Either(
    options=(Str(max_length=TEXT), TEXT_PARTS), description="the system prompt: text or text blocks"
)
CUSTOM_TOOL = Obj(
    fields={
        "type": Enum(values=("custom",)),
        "name": FUNCTION,
        "description": Str(max_length=TOOL_DESCRIPTION),
        "input_schema": PARAMETERS_SCHEMA,
        "cache_control": CACHE_CONTROL,
        "strict": Bool(description=ACCEPTED + ": a call is always held to its input_schema"),
        "defer_loading": Bool(description=ACCEPTED),
        "eager_input_streaming": Bool(description=ACCEPTED),
        "input_examples": Arr(items=AnyJson(), max_items=PARTS, description=ACCEPTED),
        "allowed_callers": Arr(items=Str(max_length=NAME), max_items=PARTS, description=ACCEPTED),
    },
    required=("name", "input_schema"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tools(Node):
    """Anthropic's tools: a custom tool (``type`` absent or ``custom``) is checked and kept; a server
    tool (any other ``type``) is dropped and noted in ``IGNORED``, never shown to the model."""

    custom: Obj
    max_items: int
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"array"})

    def check(self, value: Any, path: str) -> Any:
        items = Arr(items=AnyJson(), max_items=self.max_items).check(value, path)
        noted = IGNORED.get()
        kept = []
        for i, tool in enumerate(items):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "custom":
                if noted is not None:
                    noted.append(f"{path}[{i}] ({kind[:MAX_NOTED_NAME]})")
                continue
            kept.append(self.custom.check(tool, f"{path}[{i}]"))
        return kept

    def schema(self) -> Schema:
        server: Schema = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "not": {"const": "custom"}}},
            "description": "a server tool (web_search_…, code_execution_…, bash_…): ignored",
        }
        items = {"anyOf": [self.custom.schema(), server]}
        return self._described({"type": "array", "items": items, "maxItems": self.max_items})


DISABLE_PARALLEL = Bool(description="true: at most one tool call")
TOOL_CHOICE = Tagged(
    tag="type",
    variants={
        "auto": tagged_variant("type", {"disable_parallel_tool_use": DISABLE_PARALLEL}),
        "any": tagged_variant("type", {"disable_parallel_tool_use": DISABLE_PARALLEL}),
        "tool": tagged_variant(
            "type", {"name": FUNCTION, "disable_parallel_tool_use": DISABLE_PARALLEL}, ("name",)
        ),
        "none": tagged_variant("type", {}),
    },
    description="auto (the default), any (a call is required), tool (this one), none",
)
DISPLAY = Enum(
    values=("summarized", "omitted"),
    description="omitted: thinking blocks come with empty text (their signature still carries it)",
)
THINKING = Tagged(
    tag="type",
    variants={
        "enabled": tagged_variant(
            "type",
            {
                "budget_tokens": Int(
                    minimum=1, maximum=TOKENS.maximum, description="sets the reasoning effort (docs/api.md)"
                ),
                "display": DISPLAY,
            },
            ("budget_tokens",),
        ),
        "adaptive": tagged_variant("type", {"display": DISPLAY}),
        "disabled": tagged_variant("type", {}),
    },
    description="how much a reasoning model thinks; a model that does not reason just answers",
)
OUTPUT_CONFIG = Obj(
    fields={
        "effort": Enum(
            values=("low", "medium", "high", "xhigh", "max"),
            description="the reasoning effort (xhigh and max are high); before thinking's",
        ),
        "format": Tagged(
            tag="type",
            variants={"json_schema": tagged_variant("type", {"schema": RESPONSE_SCHEMA}, ("schema",))},
        ),
    }
)
#: what shapes the prompt: count_tokens takes exactly these
PROMPT = {
    "model": MODEL,
    "messages": Arr(items=MESSAGE, min_items=1, max_items=MESSAGES),
    "system": SYSTEM,
    "tools": Tools(custom=CUSTOM_TOOL, max_items=TOOLS),
    "tool_choice": TOOL_CHOICE,
    "thinking": THINKING,
    "output_config": OUTPUT_CONFIG,
    "cache_control": CACHE_CONTROL,
}


def _tools_agree(body: Body, path: str) -> Body:
    """Tool names are distinct, a forced tool is one of them, the grammars stay small."""
    names: list[str] = []
    repeats = 0
    for i, tool in enumerate(body.get("tools", ())):
        if tool["name"] in names:
            raise bad_field(f"tools[{i}]", f"two tools are named {tool['name']!r}")
        names.append(tool["name"])
        # The engine compiles all tools' schemas into one grammar: one budget for all.
        repeats += schemas.check(tool["input_schema"], f"tools[{i}].input_schema", allow_refs=False)
        if repeats > schemas.MAX_REPEAT_TOTAL:
            raise bad_field(
                f"tools[{i}].input_schema",
                f"the tools' input schemas repeat more than {schemas.MAX_REPEAT_TOTAL} items in all",
            )
    choice: Mapping[str, Any] = body.get("tool_choice", {})
    if choice.get("type") in ("any", "tool") and not names:
        raise bad_field("tool_choice", f"tool_choice {choice['type']!r} needs tools")
    if choice.get("type") == "tool" and choice["name"] not in names:
        raise bad_field(
            "tool_choice.name", f"tool_choice names {choice['name']!r}, which is not among the tools"
        )
    return body


MESSAGES_BODY = Checked(
    node=Obj(
        fields={
            **PROMPT,
            "max_tokens": TOKENS,
            "stop_sequences": Arr(
                items=Str(max_length=256),
                max_items=4,
                description="up to 4 sequences where generation stops; stop_reason names the one met",
            ),
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "top_k": sampling_node("top_k", "sample among the k most likely tokens; 0 turns it off"),
            "min_p": EXTENSIONS["min_p"],
            "repeat_penalty": EXTENSIONS["repeat_penalty"],
            **penalties("allm: "),
            "seed": dataclasses.replace(SEED, description="allm: " + SEED.description),
            "metadata": Obj(fields={"user_id": Str(max_length=NAME)}, description=ACCEPTED),
            "service_tier": Enum(values=("auto", "standard_only"), description=ACCEPTED),
            "stream": STREAM,
        },
        required=("model", "messages", "max_tokens"),
    ),
    then=_tools_agree,
)
COUNT_TOKENS_BODY = Checked(node=Obj(fields=PROMPT, required=("model", "messages")), then=_tools_agree)
