"""Chat Completions, Completions and Embeddings: the request bodies the chat room checks and publishes."""

from __future__ import annotations

import dataclasses
import unicodedata

from allm.gateway.bounds import (
    ACCEPTED,
    ARGUMENTS,
    CALL_ID,
    CALLS,
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
    PENALTIES,
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
    Body,
    function_fields,
    tools_agree,
)
from allm.gateway.errors import bad_field
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
    Unsupported,
    tagged_variant,
)


def _has_text(value: str, path: str) -> str:
    """Text the engine tokenizes as it is: control characters alone may become no token at all.

    SmolLM2's tokenizer drops \\x04, \\x06, \\x13, \\x14, \\x16 and \\x1d; llama.cpp then
    gets an empty batch: an assert (INTERNAL) for a completion, a failed decode and
    a corrupted heap for an embedding. (Chat templates always add tokens of their own.)
    """
    if all(unicodedata.category(c) == "Cc" and not c.isspace() for c in value):
        raise bad_field(path, f"'{path}' holds no text, only control characters")
    return value


#: a completion prompt or an embedding input: text of its own, as it reaches the tokenizer
RAW_TEXT = Checked(
    node=Str(min_length=1, max_length=TEXT), then=_has_text, description="not only control characters"
)


def _logprobs_asked(body: Body) -> Body:
    """top_logprobs without logprobs is a client's mistake, as OpenAI says it is."""
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise bad_field("top_logprobs", "top_logprobs needs logprobs: true")
    return body


#: what Chat Completions and Completions both take to generate, in the order both publish it
GENERATION = {
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "seed": SEED,
    "stop": STOP,
    "n": Int(minimum=1, maximum=1, description="only one choice is generated"),
    "stream": STREAM,
}
CHAT_PART = Tagged(
    tag="type",
    variants={"text": tagged_variant("type", {"text": Str(max_length=TEXT)}, ("text",))},
    unsupported={
        "image_url": "text only",
        "input_audio": "text only",
        "file": "text only",
        "refusal": "text only",
    },
)
CHAT_CONTENT = Either(options=(Str(max_length=TEXT), Arr(items=CHAT_PART, max_items=PARTS)))
TOOL_CALL = Obj(
    fields={
        "id": CALL_ID,
        "type": Enum(values=("function",)),
        "function": Obj(fields={"name": FUNCTION, "arguments": ARGUMENTS}, required=("name", "arguments")),
    },
    required=("id", "type", "function"),
)
NAMED = {"name": Str(max_length=NAME)}
CHAT_MESSAGE = Tagged(
    tag="role",
    param_at_tag=True,
    variants={
        **{
            role: tagged_variant("role", {"content": CHAT_CONTENT, **NAMED}, ("content",))
            for role in ("system", "developer", "user")
        },
        # content may be left out (or null) when the assistant called tools instead
        "assistant": tagged_variant(
            "role",
            {
                "content": CHAT_CONTENT,
                **NAMED,
                "tool_calls": Arr(items=TOOL_CALL, max_items=CALLS),
                "refusal": Str(max_length=TEXT),
                "annotations": Arr(items=AnyJson(), max_items=PARTS),
                "reasoning_content": Str(
                    max_length=TEXT, description="allm: the reasoning of an earlier reasoning-model turn"
                ),
            },
        ),
        "tool": tagged_variant(
            "role", {"content": CHAT_CONTENT, "tool_call_id": CALL_ID}, ("content", "tool_call_id")
        ),
    },
)
CHAT_TOOL = Tagged(
    tag="type",
    variants={
        "function": tagged_variant(
            "type", {"function": Obj(fields=function_fields(), required=("name",))}, ("function",)
        )
    },
    unsupported={"custom": "only function tools are supported"},
)
CHAT_TOOL_CHOICE = Either(
    options=(
        Enum(values=("none", "auto", "required")),
        Tagged(
            tag="type",
            variants={
                "function": tagged_variant(
                    "type", {"function": Obj(fields={"name": FUNCTION}, required=("name",))}, ("function",)
                )
            },
            unsupported={"allowed_tools": "name one function", "custom": "only function tools are supported"},
        ),
    )
)
RESPONSE_FORMAT = Tagged(
    tag="type",
    variants={
        "text": tagged_variant("type", {}),
        "json_object": tagged_variant("type", {}),
        "json_schema": tagged_variant(
            "type",
            {
                "json_schema": Obj(
                    fields={
                        "name": FUNCTION,
                        "description": Str(max_length=DESCRIPTION),
                        "schema": RESPONSE_SCHEMA,
                        "strict": Bool(),
                    },
                    required=("name", "schema"),
                )
            },
            ("json_schema",),
        ),
    },
)
CHAT = Checked(
    node=Obj(
        fields={
            "model": MODEL,
            "messages": Arr(items=CHAT_MESSAGE, min_items=1, max_items=MESSAGES),
            "max_tokens": TOKENS,
            "max_completion_tokens": TOKENS,
            **GENERATION,
            "stream_options": Obj(fields={"include_usage": Bool(), "include_obfuscation": Bool()}),
            "response_format": RESPONSE_FORMAT,
            "tools": Arr(items=CHAT_TOOL, max_items=TOOLS),
            "tool_choice": CHAT_TOOL_CHOICE,
            "parallel_tool_calls": PARALLEL,
            "user": USER,
            **PENALTIES,
            **EXTENSIONS,
            "logit_bias": LOGIT_BIAS,
            "logprobs": Bool(description="return each output token's logprob"),
            "top_logprobs": dataclasses.replace(
                TOP_LOGPROBS, description=TOP_LOGPROBS.description + "; needs logprobs"
            ),
            "reasoning_effort": EFFORT,
            "store": Bool(description=ACCEPTED),
            "metadata": METADATA,
            "modalities": Arr(items=Enum(values=("text",)), max_items=1, description="text only"),
            **HABITS,
        },
        required=("model", "messages"),
    ),
    then=lambda body, path: _logprobs_asked(
        tools_agree(lambda tool: tool["function"], lambda choice: choice["function"]["name"])(body, path)
    ),
)

COMPLETIONS = Obj(
    fields={
        "model": MODEL,
        "prompt": Either(
            # an empty prompt trips an assert in llama-cpp-python's generate (an INTERNAL error)
            options=(RAW_TEXT, Arr(items=RAW_TEXT, min_items=1, max_items=1)),
            description="one prompt: a non-empty string, or a list holding one",
        ),
        "max_tokens": TOKENS,
        **GENERATION,
        "user": USER,
        **PENALTIES,
        **EXTENSIONS,
        "logit_bias": LOGIT_BIAS,
        "echo": Neutral(value=False, description=NOT_IMPLEMENTED),
        "best_of": Neutral(value=1, description=NOT_IMPLEMENTED),
    },
    required=("model", "prompt"),
)

EMBEDDINGS = Obj(
    fields={
        "model": MODEL,
        "input": Either(
            options=(RAW_TEXT, Arr(items=RAW_TEXT, min_items=1, max_items=2048)),
        ),
        "encoding_format": Enum(values=("float", "base64")),
        "dimensions": Unsupported(why="the model's embeddings keep their own size"),
        "user": USER,
    },
    required=("model", "input"),
)
