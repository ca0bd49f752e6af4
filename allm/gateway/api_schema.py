"""Every request body and path parameter of the HTTP API, as data: checked at the edge, published as OpenAPI.

The handlers check a body with ``CHAT.check(payload, "")`` (and so on), and
allm/gateway/openapi.py renders the same definitions as the OpenAPI 3.1 document
GET /openapi.json serves: what is published is what is enforced. What a type
cannot say (tool-call arguments are JSON text, a JSON Schema compiles, a
forced tool exists) is a ``Checked`` step beside the type, named in its description.

Why each bound exists:

- ``MAX_TOKENS``: a C ``int`` in llama.cpp; anything larger is a client bug.
- ``SEED``: int64, what every engine's seed takes (torch's and llama.cpp's, masked).
- ``TEXT``: 4 Mi characters per string; more than any context this server runs holds.
- ``STOP``: 4 strings (OpenAI's limit) of at most 256 characters: stop matching
  runs on every token and costs the square of a stop string's length.
- ``MESSAGES`` (2048), ``TOOLS`` (128, OpenAI's), ``PARTS`` (256), ``CALLS`` (128):
  the gateway walks these lists per request; bounds keep that walk small.
- names and ids: OpenAI's function-name rule; response ids are ours
  (``resp_<hex>``) so anything path-like (``../``, ``%00``) is refused early.
- sampling values: ``gateway.config.SAMPLING_BOUNDS``, shared with the catalog's
  per-model ``defaults``; ``logit_bias`` as OpenAI bounds it (300 tokens, ±100);
  ``top_logprobs`` 0 to 20 (OpenAI's).
- images: OpenAI's bounds (a prompt of 32000 characters, ``n`` 1 to 10, compression 0 to
  100); ``steps`` to 150 and ``cfg_scale`` to 30, past any use a diffusion model has; the
  size's limits are the server's (``[image]``), checked in allm/gateway/images.py.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Callable
from typing import Any

from allm.gateway import schemas
from allm.gateway.config import SAMPLING_BOUNDS, SAMPLING_DEFAULTS
from allm.gateway.errors import bad_field
from allm.gateway.fields import parse_json_text
from allm.gateway.spec import (
    INT64_MAX,
    INT64_MIN,
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
from allm.image_names import OUTPUT_FORMATS, SAMPLERS

TEXT = 4 * 1024 * 1024
MAX_TOKENS = 2**31 - 1
MESSAGES = 2048
TOOLS = 128
PARTS = 256
CALLS = 128
NAME = 256
DESCRIPTION = 8192
FUNCTION_NAME = r"[a-zA-Z0-9_-]{1,64}"
RESPONSE_ID = Str(
    min_length=1, max_length=128, pattern=r"[A-Za-z0-9_-]+", description="a stored response's id"
)

# -- shared pieces ---------------------------------------------------------------------------

MODEL = Str(min_length=1, max_length=NAME, description="a model id from GET /v1/models")
SEED = Int(minimum=INT64_MIN, maximum=INT64_MAX, description="the same seed reproduces the same text")
TOKENS = Int(minimum=1, maximum=MAX_TOKENS, description="the most tokens to generate")
STOP = Either(
    options=(
        Str(max_length=256),
        Arr(items=Str(max_length=256), max_items=4),
    ),
    description="up to 4 sequences where generation stops; they are not part of the text",
)
STREAM = Bool(description="answer with server-sent events")
USER = Str(max_length=NAME, description="accepted for compatibility; not used")
PARALLEL = Bool(description="false: at most one tool call per turn (default true)")
NOT_IMPLEMENTED = "not implemented: accepted at its neutral value only"


def _sampling(key: str, description: str) -> Node:
    lo, hi = SAMPLING_BOUNDS[key]
    default = SAMPLING_DEFAULTS[key]
    text = f"{description}; default: the model's catalog default, else {default:g}"
    if key == "top_k":
        return Int(minimum=int(lo), maximum=int(hi), description=text)
    return Num(minimum=lo, maximum=hi, description=text)


TEMPERATURE = _sampling("temperature", "sampling temperature; 0 decodes greedily")
TOP_P = _sampling("top_p", "nucleus sampling mass")


def _penalties(prefix: str = "") -> dict[str, Node]:
    return {
        "frequency_penalty": _sampling(
            "frequency_penalty", prefix + "subtracted from a token's logit once per time it was generated"
        ),
        "presence_penalty": _sampling(
            "presence_penalty", prefix + "subtracted from a token's logit if it was generated"
        ),
    }


PENALTIES = _penalties()
#: allm's own sampling options, llama.cpp's names and meanings, on every text API
EXTENSIONS = {
    "top_k": _sampling("top_k", "allm: sample among the k most likely tokens; 0 turns it off"),
    "min_p": _sampling("min_p", "allm: drop tokens less likely than min_p times the most likely one"),
    "repeat_penalty": _sampling(
        "repeat_penalty", "allm: llama.cpp's penalty on tokens that appeared recently; 1 turns it off"
    ),
}
LOGIT_BIAS = Map(
    values=Num(minimum=-100, maximum=100),
    keys=Str(min_length=1, max_length=10, pattern=r"[0-9]+"),
    max_properties=300,
    description="token id (as a string) → a bias added to its logit; -100 bans it, 100 forces it",
)
TOP_LOGPROBS = Int(minimum=0, maximum=20, description="alternatives returned per token, with their logprobs")
#: a reasoning effort, passed on as reasoning_effort to chat templates that take one
EFFORT = Enum(
    values=("low", "medium", "high"),
    description="how much a reasoning model thinks, for chat templates that take it; others ignore it",
)
ACCEPTED = "accepted for compatibility; not used"
# OpenAI options that clients (the SDKs, LangChain, the Agents SDK) send as a matter of
# course and that change nothing a local server answers: accepted, so they keep working.
HABITS = {
    "service_tier": Enum(values=("auto", "default", "flex", "scale", "priority"), description=ACCEPTED),
    "prompt_cache_key": Str(max_length=NAME, description=ACCEPTED),
    "safety_identifier": Str(max_length=NAME, description=ACCEPTED),
}
METADATA = Map(values=Str(max_length=512), keys=Str(min_length=1, max_length=64), max_properties=16)


def _json_text(value: str, path: str) -> str:
    """Tool-call arguments are JSON text: the engine parses them to show the model its calls."""
    if value.strip():
        parse_json_text(value, path)
    return value


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


def _schema(allow_refs: bool) -> Checked:
    def check(value: Any, path: str) -> Any:
        schemas.check(value, path, allow_refs=allow_refs)
        return value

    return Checked(
        node=Map(values=AnyJson(), keys=Str(max_length=NAME), max_properties=64),
        then=check,
        description="a JSON Schema in the subset llama.cpp's grammar converter compiles safely",
    )


RESPONSE_SCHEMA = _schema(allow_refs=True)
PARAMETERS_SCHEMA = _schema(allow_refs=False)
ARGUMENTS = Checked(node=Str(max_length=TEXT), then=_json_text, description="JSON text")
FUNCTION = Str(max_length=64, pattern=FUNCTION_NAME)
CALL_ID = Str(min_length=1, max_length=NAME)


def _function() -> dict[str, Node]:
    return {
        "name": FUNCTION,
        "description": Str(max_length=DESCRIPTION),
        "parameters": PARAMETERS_SCHEMA,
        "strict": Bool(),
    }


Body = dict[str, Any]


def _tools_agree(
    function_of: Callable[[Body], Body], forced_of: Callable[[Body], str]
) -> Callable[[Body, str], Body]:
    """A body-level check: tool names are distinct, a forced function is one of them, grammars stay small."""

    def names_of(tool: Body) -> str:
        name: str = function_of(tool)["name"]
        return name

    def parameters_of(tool: Body) -> Body | None:
        return function_of(tool).get("parameters")

    def check(body: Body, path: str) -> Body:
        names: list[str] = []
        repeats = 0
        for i, tool in enumerate(body.get("tools", ())):
            name = names_of(tool)
            if name in names:
                raise bad_field(f"tools[{i}]", f"two tools are named {name!r}")
            names.append(name)
            # The engine compiles all tools' parameters into one grammar: one budget for all.
            parameters = parameters_of(tool)
            if parameters is not None:
                repeats += schemas.check(parameters, f"tools[{i}].parameters", allow_refs=False)
            if repeats > schemas.MAX_REPEAT_TOTAL:
                raise bad_field(
                    f"tools[{i}].parameters",
                    f"the tools' parameters repeat more than {schemas.MAX_REPEAT_TOTAL} items in all",
                )
        choice = body.get("tool_choice")
        if (isinstance(choice, dict) or choice == "required") and not names:
            raise bad_field("tool_choice", "tool_choice requires tools")
        if isinstance(choice, dict) and forced_of(choice) not in names:
            raise bad_field(
                "tool_choice", f"tool_choice names {forced_of(choice)!r}, which is not among the tools"
            )
        return body

    return check


def _logprobs_asked(body: Body) -> Body:
    """top_logprobs without logprobs is a client's mistake, as OpenAI says it is."""
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise bad_field("top_logprobs", "top_logprobs needs logprobs: true")
    return body


# -- Chat Completions -----------------------------------------------------------------------

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
            "type", {"function": Obj(fields=_function(), required=("name",))}, ("function",)
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
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "seed": SEED,
            "stop": STOP,
            "n": Int(minimum=1, maximum=1, description="only one choice is generated"),
            "stream": STREAM,
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
        _tools_agree(lambda tool: tool["function"], lambda choice: choice["function"]["name"])(body, path)
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
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "seed": SEED,
        "stop": STOP,
        "n": Int(minimum=1, maximum=1, description="only one choice is generated"),
        "stream": STREAM,
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
        "user": USER,
    },
    required=("model", "input"),
)

# -- Responses --------------------------------------------------------------------------------

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
    variants={"function": tagged_variant("type", _function(), ("name",))},
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
            **_penalties("allm: "),
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
    then=_tools_agree(lambda tool: tool, lambda choice: choice["name"]),
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

# -- Audio: multipart/form-data bodies --------------------------------------------------------
#
# A form's fields arrive as text: allm/gateway/audio.py reads each as its node's JSON type
# (a number's digits as a number, true/false as a boolean, a repeated ``name[]`` as an array)
# and then checks the form with these nodes, as a JSON body is checked.


@dataclasses.dataclass(frozen=True, kw_only=True)
class File(Node):
    """A file part of a multipart/form-data body: its bytes, unread here (the manager decodes them)."""

    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"string"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, bytes):
            raise bad_field(path, f"'{path}' must be a file")
        return value

    def schema(self) -> Schema:
        return self._described({"type": "string", "format": "binary"})


AUDIO_FILE = File(
    description="the audio: WAV, FLAC, OGG/Vorbis, Opus or MP3 (read from its bytes, whatever its name); "
    "an empty file is an empty transcript"
)
AUDIO_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
AUDIO_FORMAT = Enum(
    values=AUDIO_FORMATS,
    description="json (the default): {text}; text, srt and vtt: text/plain; verbose_json: "
    "language, duration, segments, words",
)
AUDIO_TEMPERATURE = Num(
    minimum=0, maximum=1, description="sampling temperature; 0 (the default) decodes greedily"
)
AUDIO_PROMPT = Str(
    max_length=DESCRIPTION,
    description="text in the audio's style, or what came before it; whisper reads its last 224 tokens",
)
LANGUAGE = Str(
    min_length=2,
    max_length=3,
    pattern=r"[a-z]{2,3}",
    description="the spoken language, ISO-639-1 (en, de, ...); left out, the model detects it",
)
GRANULARITIES = Arr(
    items=Enum(values=("segment", "word")),
    max_items=2,
    description="with verbose_json: segment (the default) and/or word timestamps; word needs verbose_json",
)


def _audio_agrees(body: Body, path: str) -> Body:
    """What a field's type cannot say: word timestamps need verbose_json; a stream carries text only."""
    fmt = body.get("response_format", "json")
    if "word" in body.get("timestamp_granularities[]", ()) and fmt != "verbose_json":
        raise bad_field(
            "timestamp_granularities[]", f"word timestamps need response_format verbose_json, not {fmt!r}"
        )
    if body.get("stream") and fmt not in ("json", "text"):
        raise bad_field("stream", f"a stream carries text: response_format json or text, not {fmt!r}")
    return body


TRANSCRIPTION_FORM = Obj(
    fields={
        "file": AUDIO_FILE,
        "model": MODEL,
        "language": LANGUAGE,
        "prompt": AUDIO_PROMPT,
        "response_format": AUDIO_FORMAT,
        "temperature": AUDIO_TEMPERATURE,
        "timestamp_granularities[]": GRANULARITIES,
        "stream": Bool(
            description="true: transcript.text.delta events as the audio is transcribed, then "
            "transcript.text.done (response_format json or text)"
        ),
    },
    required=("file", "model"),
)
TRANSCRIPTIONS = Checked(
    node=TRANSCRIPTION_FORM,
    then=_audio_agrees,
    description="word timestamps need verbose_json; a stream, json or text",
)
TRANSLATIONS = Obj(
    fields={
        "file": AUDIO_FILE,
        "model": MODEL,
        "prompt": dataclasses.replace(AUDIO_PROMPT, description=AUDIO_PROMPT.description + "; in English"),
        "response_format": AUDIO_FORMAT,
        "temperature": AUDIO_TEMPERATURE,
    },
    required=("file", "model"),
)


def form_of(node: Node) -> Obj:
    """The fields of a form body's node, under the checks that wrap them."""
    while isinstance(node, Checked):
        node = node.node
    if not isinstance(node, Obj):
        raise TypeError(f"a form body is an object of fields, not {type(node).__name__}")
    return node


# -- Images -------------------------------------------------------------------------------------
#
# OpenAI's POST /v1/images/generations (openai-python's types/image_generate_params.py), on
# stable-diffusion.cpp: what it cannot do (a transparent background, gif and svg, partial
# images) is refused by name; what only steers OpenAI's own models (quality, style,
# moderation) is accepted and changes nothing. The size's limits are the server's
# ([image] in the config): allm/gateway/images.py checks them and names ``size``.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Whole(Int):
    """An integer, also when a client writes it as a JSON number with nothing after the point (2.0).

    JSON Schema counts 2.0 as an integer too, so the published type is unchanged;
    2.5 is refused as not an integer.
    """

    def check(self, value: Any, path: str) -> Any:
        if isinstance(value, float) and value.is_integer():
            if not self.minimum <= value <= self.maximum:  # before int(): 1e300 has 301 digits
                raise bad_field(
                    path, f"'{path}' must be from {self.minimum} to {self.maximum}, got {value:g}"
                )
            value = int(value)
        return super().check(value, path)


IMAGE_FORMATS = OUTPUT_FORMATS
IMAGE_PROMPT = 32000  # characters, OpenAI's bound
#: "auto" or WIDTHxHEIGHT, x or X, auto in any case; the server's limits are checked after this
IMAGE_SIZE = Str(
    max_length=11,
    pattern=r"(?:[Aa][Uu][Tt][Oo]|[0-9]{1,5}[Xx][0-9]{1,5})",
    description="WIDTHxHEIGHT in pixels, each a multiple of 8 from 64 to the server's [image] max_width "
    "and max_height (1024 by default); auto (the default): the server's [image] default_size (512x512)",
)


def _image_agrees(body: Body, path: str) -> Body:
    """What a field's type cannot say: compression is jpeg's and webp's; a stream carries b64_json."""
    fmt = body.get("output_format", "png")
    if "output_compression" in body and fmt == "png":
        raise bad_field(
            "output_compression", "output_compression is for output_format jpeg or webp, not 'png'"
        )
    if body.get("stream") and body.get("response_format") == "url":
        raise bad_field(
            "stream", "a stream carries each image as b64_json: response_format url cannot stream"
        )
    return body


IMAGES = Checked(
    node=Obj(
        fields={
            "prompt": Str(min_length=1, max_length=IMAGE_PROMPT, description="what the image shows"),
            "model": MODEL,
            "n": Whole(minimum=1, maximum=10, description="how many images (default 1)"),
            "size": IMAGE_SIZE,
            "response_format": Enum(
                values=("b64_json", "url"),
                description="b64_json (the default): the image in the answer; url: a link to "
                "GET /v1/images/files/{name}, kept for the server's [image] url_ttl_s (an hour by default)",
            ),
            "output_format": Enum(values=IMAGE_FORMATS, description="png (the default), jpeg or webp"),
            "output_compression": Whole(
                minimum=0, maximum=100, description="jpeg and webp: 100 is the best quality (the default)"
            ),
            "stream": Bool(
                description="server-sent events: allm's image_generation.progress after each sampling step, "
                "then image_generation.completed for each image, in order"
            ),
            "partial_images": Neutral(value=0, description="0 only: allm sends no partial images"),
            "background": Enum(
                values=("auto", "opaque"), description="auto or opaque: the images are opaque"
            ),
            "quality": Enum(
                values=("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"),
                description=ACCEPTED + "; steps sets the work done",
            ),
            "style": Enum(values=("vivid", "natural"), description=ACCEPTED),
            "moderation": Enum(values=("low", "auto"), description=ACCEPTED),
            "complexity": Enum(values=("low", "medium", "high"), description=ACCEPTED),
            "user": USER,
            "safety_identifier": HABITS["safety_identifier"],
            # allm's own: stable-diffusion.cpp's settings
            "negative_prompt": Str(
                max_length=IMAGE_PROMPT, description="allm: what the image should not show"
            ),
            "seed": Whole(
                minimum=INT64_MIN,
                maximum=INT64_MAX,
                description="allm: the same seed, prompt and settings make the same image; "
                "left out, one is drawn (each answer's data items tell it)",
            ),
            "steps": Whole(
                minimum=1, maximum=150, description="allm: sampling steps; left out, the model's default"
            ),
            "cfg_scale": Num(
                minimum=0,
                maximum=30,
                description="allm: how closely the image follows the prompt; left out, the model's default",
            ),
            "sampler": Enum(
                values=SAMPLERS,
                description="allm: stable-diffusion.cpp's sample method; left out, the model's default",
            ),
        },
        required=("prompt", "model"),
    ),
    then=_image_agrees,
    description="output_compression needs jpeg or webp; a stream, b64_json",
)
#: a stored image's file name, as allm/gateway/images.py makes them: anything else is no file
IMAGE_FILE = Str(
    min_length=1,
    max_length=64,
    pattern=r"[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)",
    description="an image's name, from the url a generation answered",
)
