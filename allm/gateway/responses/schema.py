"""The Responses API's request bodies: input items, function tools, text formats, the input_items query."""

from __future__ import annotations

import dataclasses

from allm.gateway.bounds import (
    ACCEPTED,
    ARGUMENTS,
    CALL_ID,
    DESCRIPTION,
    EFFORT,
    EXTENSIONS,
    FUNCTION,
    HABITS,
    LOGIT_BIAS,
    MESSAGES,
    METADATA,
    MODEL,
    NAME,
    NOT_IMPLEMENTED,
    PARALLEL,
    PARTS,
    RESPONSE_SCHEMA,
    SEED,
    STOP,
    STREAM,
    TEMPERATURE,
    TEXT,
    TOKENS,
    TOOLS,
    TOP_LOGPROBS,
    TOP_P,
    USER,
    function_fields,
    penalties,
    tools_agree,
)
from allm.gateway.spec import (
    AnyJson,
    Arr,
    Bool,
    Checked,
    Either,
    Enum,
    Int,
    Neutral,
    Obj,
    Str,
    Tagged,
    tagged_variant,
)

RESPONSE_ID = Str(
    min_length=1, max_length=128, pattern=r"[A-Za-z0-9_-]+", description="a stored response's id"
)

ANNOTATED = {
    "annotations": Arr(items=AnyJson(), max_items=PARTS),
    "logprobs": Arr(items=AnyJson(), max_items=65536),
}
INPUT_PART = Tagged(
    tag="type",
    variants={
        "input_text": tagged_variant("type", {"text": Str(max_length=TEXT)}, ("text",)),
        "output_text": tagged_variant("type", {"text": Str(max_length=TEXT), **ANNOTATED}, ("text",)),
    },
    unsupported={
        "input_image": "text only",
        "input_file": "text only",
        "input_audio": "text only",
        "refusal": "text only",
    },
)
INPUT_CONTENT = Either(options=(Str(max_length=TEXT), Arr(items=INPUT_PART, max_items=PARTS)))


def _text_part(kind: str) -> Obj:
    return Obj(fields={"type": Enum(values=(kind,)), "text": Str(max_length=TEXT)}, required=("type", "text"))


ITEM_STATUS = Enum(values=("in_progress", "completed", "incomplete"))
ITEM_ID = Str(max_length=NAME)
INPUT_ITEM = Tagged(
    tag="type",
    default="message",
    variants={
        "message": tagged_variant(
            "type",
            {
                "role": Enum(values=("system", "developer", "user", "assistant")),
                "content": INPUT_CONTENT,
                "id": ITEM_ID,
                "status": ITEM_STATUS,
            },
            ("role", "content"),
        ),
        "function_call": tagged_variant(
            "type",
            {
                "call_id": CALL_ID,
                "name": FUNCTION,
                "arguments": ARGUMENTS,
                "id": ITEM_ID,
                "status": ITEM_STATUS,
            },
            ("call_id", "name", "arguments"),
        ),
        "function_call_output": tagged_variant(
            "type",
            {"call_id": CALL_ID, "output": INPUT_CONTENT, "id": ITEM_ID, "status": ITEM_STATUS},
            ("call_id", "output"),
        ),
        # an earlier turn's reasoning, sent back by clients that keep the conversation themselves
        "reasoning": tagged_variant(
            "type",
            {
                "id": ITEM_ID,
                "summary": Arr(items=_text_part("summary_text"), max_items=PARTS),
                "content": Arr(items=_text_part("reasoning_text"), max_items=PARTS),
                "encrypted_content": Str(max_length=TEXT, description="accepted; allm never makes any"),
                "status": ITEM_STATUS,
            },
            ("summary",),
        ),
    },
    unsupported={
        kind: "messages, reasoning and function calls only"
        for kind in (
            "item_reference",
            "file_search_call",
            "web_search_call",
            "computer_call",
            "computer_call_output",
            "image_generation_call",
            "code_interpreter_call",
            "local_shell_call",
            "local_shell_call_output",
            "mcp_call",
            "mcp_list_tools",
            "mcp_approval_request",
            "mcp_approval_response",
            "custom_tool_call",
            "custom_tool_call_output",
        )
    },
)
HOSTED_TOOLS = (
    "file_search",
    "web_search",
    "web_search_preview",
    "computer_use_preview",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "custom",
)
RESPONSE_TOOL = Tagged(
    tag="type",
    variants={"function": tagged_variant("type", function_fields(), ("name",))},
    unsupported={kind: "only function tools are supported" for kind in HOSTED_TOOLS},
)
RESPONSE_TOOL_CHOICE = Either(
    options=(
        Enum(values=("none", "auto", "required")),
        Tagged(
            tag="type",
            variants={"function": tagged_variant("type", {"name": FUNCTION}, ("name",))},
            unsupported={
                "allowed_tools": "name one function",
                **{kind: "only function tools are supported" for kind in HOSTED_TOOLS},
            },
        ),
    )
)
TEXT_FORMAT = Tagged(
    tag="type",
    variants={
        "text": tagged_variant("type", {}),
        "json_object": tagged_variant("type", {}),
        "json_schema": tagged_variant(
            "type",
            {
                "name": FUNCTION,
                "description": Str(max_length=DESCRIPTION),
                "schema": RESPONSE_SCHEMA,
                "strict": Bool(),
            },
            ("schema",),
        ),
    },
)
INCLUDABLE = (
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
)
RESPONSES = Checked(
    node=Obj(
        fields={
            "model": MODEL,
            "input": Either(
                options=(Str(max_length=TEXT), Arr(items=INPUT_ITEM, min_items=1, max_items=MESSAGES))
            ),
            "instructions": Str(max_length=TEXT),
            "max_output_tokens": TOKENS,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            **EXTENSIONS,
            # allm's own, as in Chat Completions (OpenAI's Responses API has none of these)
            **penalties("allm: "),
            "logit_bias": dataclasses.replace(LOGIT_BIAS, description="allm: " + LOGIT_BIAS.description),
            "seed": dataclasses.replace(SEED, description="allm: " + SEED.description),
            "stop": dataclasses.replace(STOP, description="allm: " + STOP.description),
            "text": Obj(
                fields={
                    "format": TEXT_FORMAT,
                    "verbosity": Enum(values=("low", "medium", "high"), description="accepted; not used"),
                }
            ),
            "tools": Arr(items=RESPONSE_TOOL, max_items=TOOLS),
            "tool_choice": RESPONSE_TOOL_CHOICE,
            "parallel_tool_calls": PARALLEL,
            "metadata": METADATA,
            "store": Bool(description="keep the response for GET and previous_response_id (default true)"),
            "previous_response_id": RESPONSE_ID,
            "include": Arr(
                items=Enum(values=INCLUDABLE),
                max_items=len(INCLUDABLE),
                description="message.output_text.logprobs: each output token's logprob, in the text "
                "deltas and the output_text part; the others are accepted and have nothing to add",
            ),
            "truncation": Enum(values=("disabled",)),
            "stream": STREAM,
            "user": USER,
            "background": Neutral(value=False, description=NOT_IMPLEMENTED),
            "top_logprobs": dataclasses.replace(
                TOP_LOGPROBS,
                description=TOP_LOGPROBS.description + "; with include message.output_text.logprobs",
            ),
            "reasoning": Obj(
                fields={
                    "effort": EFFORT,
                    "summary": Enum(
                        values=("auto", "concise", "detailed"),
                        description="accepted; reasoning items carry the reasoning text itself",
                    ),
                }
            ),
            "stream_options": Obj(fields={"include_obfuscation": Bool()}),
            **HABITS,
        },
        required=("model", "input"),
    ),
    then=tools_agree(lambda tool: tool, lambda choice: choice["name"]),
)

#: GET /v1/responses/{id}/input_items: the query string, as OpenAI's list endpoints take it
INPUT_ITEMS_QUERY = Obj(
    fields={
        "limit": Int(minimum=1, maximum=100, description="items per page (default 20)"),
        "order": Enum(values=("asc", "desc"), description="desc (the default): the newest item first"),
        "after": Str(max_length=NAME, description="an item id: the page starts after it"),
        "include": Arr(items=Enum(values=INCLUDABLE), max_items=len(INCLUDABLE), description=ACCEPTED),
    }
)
