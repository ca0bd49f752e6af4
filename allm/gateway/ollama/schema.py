"""Ollama's API: the request bodies the ollama room checks and publishes, as Ollama's api/types.go has them.

Ollama's fields that allm cannot honour are refused by name (an image, a prompt
template, a ``context`` of tokens, a ``suffix``), or accepted at their neutral value
only (``options.mirostat: 0``); an empty one means "none" in Ollama and is accepted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from allm.gateway.bounds import (
    CALL_ID,
    CALLS,
    DESCRIPTION,
    EXTENSIONS,
    FUNCTION,
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    NAME,
    PARAMETERS_SCHEMA,
    PARTS,
    PENALTIES,
    RESPONSE_SCHEMA,
    SEED,
    STOP,
    TEMPERATURE,
    TEXT,
    TOOLS,
    TOP_LOGPROBS,
    TOP_P,
    Body,
    tools_agree,
)
from allm.gateway.chat.schema import CHAT_TOOL_CHOICE, RAW_TEXT
from allm.gateway.errors import bad_field
from allm.gateway.spec import (
    AnyJson,
    Arr,
    Bool,
    Checked,
    Either,
    Enum,
    Int,
    Map,
    Neutral,
    Node,
    Num,
    Obj,
    Schema,
    Str,
    Tagged,
    tagged_variant,
)

#: Go's time.ParseDuration syntax, which Ollama's keep_alive strings follow ("5m", "1h30m", "-1s", "0")
GO_DURATION = re.compile(r"[-+]?(?:0|(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
#: the most seconds a keep_alive number may say (a negative one means forever, as in Ollama)
MAX_KEEP_ALIVE_S = 2**53
IMAGES_NOT_YET = "allm has no image inputs yet: its text models read text only"


def duration_s(text: str, path: str) -> float:
    """A Go duration as seconds: what a keep_alive string says."""
    if len(text) > 64 or GO_DURATION.fullmatch(text) is None:
        raise bad_field(
            path, f'\'{path}\' must be a duration such as "5m" or "1h30m", or seconds, got {text!r}'
        )
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))


KEEP_ALIVE = Either(
    options=(
        Num(minimum=-MAX_KEEP_ALIVE_S, maximum=MAX_KEEP_ALIVE_S),
        Checked(node=Str(max_length=64), then=duration_s),
    ),
    description='seconds, or a duration such as "5m": the model is unloaded once idle this long '
    "(0: once the answer is sent; negative: never); left out, as [text] idle_unload_s says",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmptyOnly(Node):
    """An Ollama field allm cannot honour: accepted empty (Ollama's "none"), refused by name otherwise."""

    node: Str | Arr
    why: str
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return self.node.kinds()

    def check(self, value: Any, path: str) -> Any:
        if self.node.check(value, path):
            raise bad_field(path, f"'{path}' is not supported: {self.why}")
        return value

    def schema(self) -> Schema:
        bound = "maxItems" if isinstance(self.node, Arr) else "maxLength"
        return {**self.node.schema(), bound: 0, "description": f"only empty: {self.why}"}


IMAGES = EmptyOnly(node=Arr(items=Str(max_length=TEXT), max_items=PARTS), why=IMAGES_NOT_YET)
OPTIONS = Obj(
    fields={
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        **EXTENSIONS,
        **PENALTIES,
        "num_predict": Int(
            minimum=-2, maximum=MAX_TOKENS, description="the most tokens to generate; -1, -2 or 0: no limit"
        ),
        "num_ctx": Int(
            minimum=1,
            maximum=MAX_TOKENS,
            description="the context the request needs: served in the model's own context (its catalog "
            "n_ctx), refused past it",
        ),
        "seed": SEED,
        "stop": STOP,
        "repeat_last_n": Neutral(value=64, description="llama.cpp's penalty window here: 64 only"),
        "typical_p": Neutral(value=1, description="not implemented: 1 only"),
        "tfs_z": Neutral(value=1, description="not implemented: 1 only"),
        "mirostat": Neutral(value=0, description="not implemented: 0 only"),
    },
    description="sampling options; others (load-time options such as num_gpu or num_thread) are "
    "the catalog's and ignored here",
)
FORMAT = Either(
    options=(Enum(values=("", "json")), RESPONSE_SCHEMA),
    description='"json" for any JSON object, or a JSON Schema the answer is held to',
)
THINK = Either(
    options=(Bool(), Enum(values=("low", "medium", "high", "max"))),
    description="reasoning models: false leaves the reasoning out of the answer; a level is passed to "
    "the chat template as its reasoning effort (max as high)",
)
STREAM = Bool(description="false: one JSON object; else NDJSON lines (the default)")
ARGUMENTS = Map(values=AnyJson(), keys=Str(max_length=NAME), max_properties=256)
TOOL_CALL = Obj(
    fields={
        "id": CALL_ID,
        "function": Obj(
            fields={"index": Int(minimum=0, maximum=CALLS), "name": FUNCTION, "arguments": ARGUMENTS},
            required=("name",),
        ),
    },
    required=("function",),
)
CONTENT = Str(max_length=TEXT)
MESSAGE = Tagged(
    tag="role",
    param_at_tag=True,
    variants={
        **{
            role: tagged_variant("role", {"content": CONTENT, "images": IMAGES})
            for role in ("system", "user")
        },
        "assistant": tagged_variant(
            "role",
            {
                "content": CONTENT,
                "thinking": Str(max_length=TEXT, description="the reasoning of an earlier turn"),
                "tool_calls": Arr(items=TOOL_CALL, max_items=CALLS),
                "images": IMAGES,
            },
        ),
        "tool": tagged_variant(
            "role",
            {
                "content": CONTENT,
                "tool_name": Str(max_length=NAME, description="the function whose result this is"),
                "tool_call_id": CALL_ID,
                "images": IMAGES,
            },
        ),
    },
)
TOOL = Tagged(
    tag="type",
    default="function",
    variants={
        "function": tagged_variant(
            "type",
            {
                "function": Obj(
                    fields={
                        "name": FUNCTION,
                        "description": Str(max_length=DESCRIPTION),
                        "parameters": PARAMETERS_SCHEMA,
                    },
                    required=("name",),
                )
            },
            ("function",),
        )
    },
)
LOGPROBS = {
    "logprobs": Bool(description="return each output token's logprob"),
    "top_logprobs": TOP_LOGPROBS,
}
#: what /api/chat and /api/generate both take to generate
GENERATION: dict[str, Node] = {
    "model": MODEL,
    "format": FORMAT,
    "options": OPTIONS,
    "stream": STREAM,
    "keep_alive": KEEP_ALIVE,
    "think": THINK,
    **LOGPROBS,
}
CHAT = Checked(
    node=Obj(
        fields={
            **GENERATION,
            "messages": Arr(
                items=MESSAGE, max_items=MESSAGES, description="none: only load the model (or unload it)"
            ),
            "tools": Arr(items=TOOL, max_items=TOOLS),
            "tool_choice": CHAT_TOOL_CHOICE,
        },
        required=("model",),
    ),
    then=tools_agree(lambda tool: tool["function"], lambda choice: choice["function"]["name"]),
    description="tool_choice is allm's: Ollama has none (auto)",
)


def _raw_alone(body: Body, path: str) -> Body:
    """As Ollama says: a raw prompt is the whole prompt."""
    if body.get("raw") and body.get("system"):
        raise bad_field("system", "raw mode does not support template, system, or context")
    return body


GENERATE = Checked(
    node=Obj(
        fields={
            **GENERATION,
            "prompt": Str(max_length=TEXT, description="none: only load the model (or unload it)"),
            "system": Str(max_length=TEXT),
            "raw": Bool(description="the prompt goes to the model as it is, without the chat template"),
            "images": IMAGES,
            "suffix": EmptyOnly(node=Str(max_length=TEXT), why="allm does not fill in the middle"),
            "template": EmptyOnly(
                node=Str(max_length=TEXT), why="allm renders the model's own chat template (or use raw)"
            ),
            "context": EmptyOnly(
                node=Arr(items=AnyJson(), max_items=MAX_TOKENS),
                why="allm keeps no token context: send the conversation to /api/chat",
            ),
        },
        required=("model",),
    ),
    then=_raw_alone,
)


def _some_text(value: str, path: str) -> str:
    """An embedding input: empty (nothing to embed), or text the tokenizer keeps."""
    return RAW_TEXT.check(value, path) if value else value


ONE_INPUT = Checked(node=Str(max_length=TEXT), then=_some_text, description="empty: only load the model")
EMBED = Obj(
    fields={
        "model": MODEL,
        "input": Either(options=(ONE_INPUT, Arr(items=RAW_TEXT, max_items=2048))),
        "truncate": Bool(description="accepted; allm never truncates: an input past the context is a 400"),
        "dimensions": Int(minimum=1, maximum=1 << 20, description="keep this many, normalized again"),
        "options": OPTIONS,
        "keep_alive": KEEP_ALIVE,
    },
    required=("model",),
)
EMBEDDINGS = Obj(
    fields={"model": MODEL, "prompt": ONE_INPUT, "options": OPTIONS, "keep_alive": KEEP_ALIVE},
    required=("model",),
)


def _named(body: Body, path: str) -> Body:
    if not body.get("model") and not body.get("name"):
        raise bad_field("model", "model is required")
    return body


SHOW = Checked(
    node=Obj(
        fields={
            "model": MODEL,
            "name": Str(max_length=NAME, description="the older name of model"),
            "verbose": Bool(description="accepted; allm shows what it knows either way"),
        }
    ),
    then=_named,
)
