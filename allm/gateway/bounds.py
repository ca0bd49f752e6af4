"""The request nodes and bounds several APIs share: model, text, stop, sampling, tools, habits.

Each API's room holds its own body (``allm/gateway/<api>/schema.py``); the handlers check a
body with ``CHAT.check(payload, "")`` (and so on), and allm/gateway/openapi.py renders the
same definitions as the OpenAPI 3.1 document GET /openapi.json serves: what is published
is what is enforced. What a type cannot say (tool-call arguments are JSON text, a JSON
Schema compiles, a forced tool exists) is a ``Checked`` step beside the type, named in its
description.

Why each bound exists:

- ``MAX_TOKENS``: a C ``int`` in llama.cpp; anything larger is a client bug.
- ``SEED``: int64, what every engine's seed takes (torch's and llama.cpp's, masked).
- ``TEXT``: 4 Mi characters per string; more than any context this server runs holds.
- ``STOP``: 4 strings (OpenAI's limit) of at most 256 characters: stop matching
  runs on every token and costs the square of a stop string's length.
- ``MESSAGES`` (2048), ``TOOLS`` (128, OpenAI's), ``PARTS`` (256), ``CALLS`` (128):
  the gateway walks these lists per request; bounds keep that walk small.
- names and ids: OpenAI's function-name rule; response ids are ours
  (``resp_<hex>``, ``RESPONSE_ID`` in allm/gateway/responses/schema.py) so anything
  path-like (``../``, ``%00``) is refused early.
- sampling values: ``gateway.config.SAMPLING_BOUNDS``, shared with the catalog's
  per-model ``defaults``; ``logit_bias`` as OpenAI bounds it (300 tokens, ±100);
  ``top_logprobs`` 0 to 20 (OpenAI's).
- images: see allm/gateway/images/schema.py.
"""

from __future__ import annotations

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
    Node,
    Num,
    Str,
)

TEXT = 4 * 1024 * 1024
MAX_TOKENS = 2**31 - 1
MESSAGES = 2048
TOOLS = 128
PARTS = 256
CALLS = 128
NAME = 256
DESCRIPTION = 8192
FUNCTION_NAME = r"[a-zA-Z0-9_-]{1,64}"

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


def sampling_node(key: str, description: str) -> Node:
    """A sampling option's node: its bounds and default are the catalog's (gateway.config)."""
    lo, hi = SAMPLING_BOUNDS[key]
    default = SAMPLING_DEFAULTS[key]
    text = f"{description}; default: the model's catalog default, else {default:g}"
    if key == "top_k":
        return Int(minimum=int(lo), maximum=int(hi), description=text)
    return Num(minimum=lo, maximum=hi, description=text)


TEMPERATURE = sampling_node("temperature", "sampling temperature; 0 decodes greedily")
TOP_P = sampling_node("top_p", "nucleus sampling mass")


def penalties(prefix: str = "") -> dict[str, Node]:
    """OpenAI's two penalties; ``prefix`` marks them as allm's own where the API has none."""
    return {
        "frequency_penalty": sampling_node(
            "frequency_penalty", prefix + "subtracted from a token's logit once per time it was generated"
        ),
        "presence_penalty": sampling_node(
            "presence_penalty", prefix + "subtracted from a token's logit if it was generated"
        ),
    }


PENALTIES = penalties()
#: allm's own sampling options, llama.cpp's names and meanings, on every text API
EXTENSIONS = {
    "top_k": sampling_node("top_k", "allm: sample among the k most likely tokens; 0 turns it off"),
    "min_p": sampling_node("min_p", "allm: drop tokens less likely than min_p times the most likely one"),
    "repeat_penalty": sampling_node(
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
    "prompt_cache_key": Str(
        max_length=NAME,
        description="names a conversation: its turns go to the manager instance holding its prefix",
    ),
    "safety_identifier": Str(max_length=NAME, description=ACCEPTED),
}
METADATA = Map(values=Str(max_length=512), keys=Str(min_length=1, max_length=64), max_properties=16)


def _json_text(value: str, path: str) -> str:
    """Tool-call arguments are JSON text: the engine parses them to show the model its calls."""
    if value.strip():
        parse_json_text(value, path)
    return value


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


def function_fields() -> dict[str, Node]:
    """A function tool's fields: Chat nests them under ``function``, Responses puts them on the tool."""
    return {
        "name": FUNCTION,
        "description": Str(max_length=DESCRIPTION),
        "parameters": PARAMETERS_SCHEMA,
        "strict": Bool(),
    }


Body = dict[str, Any]


def tools_agree(
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
