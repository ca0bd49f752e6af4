"""The Responses API's request bodies: input items, tools, text formats, the input_items query.

Tools: ``function`` and ``custom`` ones (free-form input, held to a Lark or regex grammar:
allm/gateway/responses/grammar.py), and ``namespace`` ones that group both under a name.
The tools OpenAI runs itself (web search, file search, code interpreter, MCP, …) are
accepted and ignored, noted in ``spec.IGNORED`` by their path (``tools[4]``) like any
field allm does not know, so a client that always sends them keeps working; a
``tool_choice`` that forces one is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from allm.free_grammar import GrammarError
from allm.gateway import schemas
from allm.gateway.bounds import (
    ACCEPTED,
    ARGUMENTS,
    CALL_ID,
    DESCRIPTION,
    EFFORT,
    EXTENSIONS,
    FUNCTION,
    FUNCTION_NAME,
    HABITS,
    LOGIT_BIAS,
    MAX_TOKENS,
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
    Body,
    function_fields,
    penalties,
)
from allm.gateway.errors import bad_field
from allm.gateway.responses.grammar import MAX_DEFINITION, format_grammar
from allm.gateway.spec import (
    IGNORED,
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
    Obj,
    Schema,
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


NAMESPACE = Str(max_length=64, pattern=FUNCTION_NAME, description="the namespace tool the call belongs to")
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
                "namespace": NAMESPACE,
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
        "custom_tool_call": tagged_variant(
            "type",
            {
                "call_id": CALL_ID,
                "name": FUNCTION,
                "input": Str(max_length=TEXT),
                "namespace": NAMESPACE,
                "id": ITEM_ID,
                "status": ITEM_STATUS,
            },
            ("call_id", "name", "input"),
        ),
        "custom_tool_call_output": tagged_variant(
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
                "encrypted_content": Str(
                    max_length=TEXT,
                    description="the reasoning as allm sealed it (include reasoning.encrypted_content); "
                    "the model continues from it, and one that allm did not make, or that was "
                    "changed, is refused",
                ),
                "status": ITEM_STATUS,
            },
            ("summary",),
        ),
    },
    unsupported={
        kind: "messages, reasoning, and function and custom tool calls only"
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
            "shell_call",
            "shell_call_output",
            "apply_patch_call",
            "apply_patch_call_output",
            "tool_search_call",
            "mcp_call",
            "mcp_list_tools",
            "mcp_approval_request",
            "mcp_approval_response",
        )
    },
)
#: the tools only OpenAI runs (web search, file search, …): accepted, never shown to the model
HOSTED_TOOLS = (
    "file_search",
    "web_search",
    "web_search_2025_08_26",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "computer",
    "computer_use",
    "computer_use_preview",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
    "tool_search",
    "programmatic_tool_calling",
)
HOSTED = "a tool only OpenAI runs; allm does not run it"
#: what a function tool takes beyond Chat's: accepted, and not needed here
FUNCTION_EXTRAS = {
    "defer_loading": Bool(description="accepted; allm has no tool search, so every tool is shown at once"),
    "output_schema": AnyJson(description=ACCEPTED),
}


def _parsed_format(fmt: Body, path: str) -> Body:
    """A grammar format parsed once here: a definition allm cannot carry faithfully is a 400."""
    try:
        grammar = format_grammar(fmt)
    except GrammarError as exc:
        raise bad_field(f"{path}.definition", f"'{path}.definition' cannot be used: {exc}") from exc
    return fmt if grammar is None else {**fmt, "parsed": grammar}


CUSTOM_FORMAT = Checked(
    node=Tagged(
        tag="type",
        variants={
            "text": tagged_variant("type", {}),
            "grammar": tagged_variant(
                "type",
                {
                    "syntax": Enum(values=("lark", "regex")),
                    "definition": Str(min_length=1, max_length=MAX_DEFINITION),
                },
                ("syntax", "definition"),
            ),
        },
    ),
    then=_parsed_format,
    description="a grammar the input follows (llama.cpp's grammar sampler holds it); text: any text",
)
CUSTOM_TOOL = tagged_variant(
    "type",
    {
        "name": FUNCTION,
        "description": Str(max_length=DESCRIPTION),
        "format": CUSTOM_FORMAT,
        "defer_loading": FUNCTION_EXTRAS["defer_loading"],
    },
    ("name",),
)
FUNCTION_TOOL = tagged_variant("type", {**function_fields(), **FUNCTION_EXTRAS}, ("name",))
NAMESPACE_TOOL = tagged_variant(
    "type",
    {
        "name": NAMESPACE,
        "description": Str(max_length=DESCRIPTION),
        "tools": Arr(
            items=Tagged(tag="type", variants={"function": FUNCTION_TOOL, "custom": CUSTOM_TOOL}),
            min_items=1,
            max_items=TOOLS,
        ),
    },
    ("name", "tools"),
)
CALLABLE_TOOL = Tagged(
    tag="type", variants={"function": FUNCTION_TOOL, "custom": CUSTOM_TOOL, "namespace": NAMESPACE_TOOL}
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseTool(Node):
    """A tool: a function, custom or namespace tool, or one OpenAI runs, which is noted and ignored."""

    known: Tagged = CALLABLE_TOOL
    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"object"})

    def check(self, value: Any, path: str) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind in HOSTED_TOOLS:
            noted = IGNORED.get()
            if noted is not None:
                noted.append(path)
            return {"type": kind}
        return self.known.check(value, path)

    def schema(self) -> Schema:
        out = self.known.schema()
        out["oneOf"].append(
            {
                "type": "object",
                "properties": {"type": {"type": "string", "enum": list(HOSTED_TOOLS)}},
                "required": ["type"],
                "description": f"{HOSTED}: accepted and ignored",
            }
        )
        return out


RESPONSE_TOOL_CHOICE = Either(
    options=(
        Enum(values=("none", "auto", "required")),
        Tagged(
            tag="type",
            variants={
                "function": tagged_variant("type", {"name": FUNCTION}, ("name",)),
                "custom": tagged_variant("type", {"name": FUNCTION}, ("name",)),
            },
            unsupported={
                "allowed_tools": "name one tool",
                **{kind: HOSTED for kind in HOSTED_TOOLS},
            },
        ),
    )
)


def visible_tools(tools: list[Body]) -> dict[str, tuple[str, str, str | None, Body]]:
    """The callable tools by the name the model sees: (kind, name, namespace, tool).

    A namespace's tools are shown as ``namespace.name``: a tool's own name has no dot.
    """
    out: dict[str, tuple[str, str, str | None, Body]] = {}
    for tool in tools:
        if tool["type"] == "namespace":
            for inner in tool["tools"]:
                out[f"{tool['name']}.{inner['name']}"] = (inner["type"], inner["name"], tool["name"], inner)
        elif tool["type"] in ("function", "custom"):
            out[tool["name"]] = (tool["type"], tool["name"], None, tool)
    return out


def forced_tool(tools: list[Body], choice: Body) -> str | None:
    """The visible name of the tool ``tool_choice`` names: its own, else the one namespaced tool so named."""
    shown = visible_tools(tools)
    if shown.get(choice["name"], ("",))[0] == choice["type"]:
        return str(choice["name"])
    inner = [
        key
        for key, (kind, name, ns, _) in shown.items()
        if ns and name == choice["name"] and kind == choice["type"]
    ]
    return inner[0] if len(inner) == 1 else None


def _tools_agree(body: Body, path: str) -> Body:
    """Tool names the model sees are distinct, a forced tool is one of them, grammars stay small."""
    seen: set[str] = set()
    repeats = 0
    definitions = 0
    for i, tool in enumerate(body.get("tools", ())):
        inner = tool["tools"] if tool["type"] == "namespace" else [tool]
        for j, one in enumerate(inner):
            where = f"tools[{i}]" if tool["type"] != "namespace" else f"tools[{i}].tools[{j}]"
            if one["type"] not in ("function", "custom"):
                continue
            name = one["name"] if tool["type"] != "namespace" else f"{tool['name']}.{one['name']}"
            if name in seen:
                raise bad_field(where, f"two tools are named {name!r}")
            seen.add(name)
            if len(seen) > TOOLS:
                raise bad_field(where, f"more than {TOOLS} tools in all, namespaces' included")
            # The engine compiles every tool into one grammar: one budget for all definitions.
            definitions += len(one.get("format", {}).get("definition", ""))
            if definitions > MAX_DEFINITION:
                raise bad_field(
                    f"{where}.format.definition",
                    f"the tools' grammars hold more than {MAX_DEFINITION} characters in all",
                )
            parameters = one.get("parameters")
            if parameters is not None:
                # The engine compiles all tools' parameters into one grammar: one budget for all.
                repeats += schemas.check(parameters, f"{where}.parameters", allow_refs=False)
                if repeats > schemas.MAX_REPEAT_TOTAL:
                    raise bad_field(
                        f"{where}.parameters",
                        f"the tools' parameters repeat more than {schemas.MAX_REPEAT_TOTAL} items in all",
                    )
    choice = body.get("tool_choice")
    if (isinstance(choice, dict) or choice == "required") and not seen:
        raise bad_field("tool_choice", "tool_choice requires tools allm can call")
    if isinstance(choice, dict) and forced_tool(body.get("tools", []), choice) is None:
        raise bad_field(
            "tool_choice",
            f"tool_choice names the {choice['type']} tool {choice['name']!r}, which is not among the tools",
        )
    return body


#: OpenAI's reasoning efforts, as the chat templates that take one know them
EFFORTS = {
    "none": None,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}
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
            "tools": Arr(items=ResponseTool(), max_items=TOOLS),
            "tool_choice": RESPONSE_TOOL_CHOICE,
            "parallel_tool_calls": PARALLEL,
            "metadata": METADATA,
            "store": Bool(description="keep the response for GET and previous_response_id (default true)"),
            "previous_response_id": RESPONSE_ID,
            "include": Arr(
                items=Enum(values=INCLUDABLE),
                max_items=len(INCLUDABLE),
                description="message.output_text.logprobs: each output token's logprob, in the text "
                "deltas and the output_text part; reasoning.encrypted_content: each reasoning item "
                "sealed, for a later request to continue from (with store false); the others are "
                "accepted and have nothing to add",
            ),
            "truncation": Enum(
                values=("disabled", "auto"),
                description="auto: when the prompt is longer than the model's context, the oldest "
                "exchanges are dropped until it fits",
            ),
            "stream": STREAM,
            "user": USER,
            "background": Neutral(value=False, description=NOT_IMPLEMENTED),
            "top_logprobs": dataclasses.replace(
                TOP_LOGPROBS,
                description=TOP_LOGPROBS.description + "; with include message.output_text.logprobs",
            ),
            "reasoning": Obj(
                fields={
                    "effort": Enum(
                        values=tuple(EFFORTS),
                        description=EFFORT.description + "; minimal is low, xhigh and max are high, "
                        "none sends none",
                    ),
                    "summary": Enum(
                        values=("auto", "concise", "detailed"),
                        description="accepted; reasoning items carry the reasoning text itself",
                    ),
                }
            ),
            "stream_options": Obj(fields={"include_obfuscation": Bool()}),
            "max_tool_calls": Int(
                minimum=0, maximum=MAX_TOKENS, description="accepted; it bounds the tools OpenAI runs"
            ),
            **HABITS,
            "prompt_cache_key": Str(
                max_length=NAME,
                description="routes the request to the manager instance that served this key last, "
                "which holds the prompt's prefix in its cache",
            ),
            "client_metadata": Map(
                values=Str(max_length=TEXT),
                keys=Str(min_length=1, max_length=NAME),
                max_properties=64,
                description=ACCEPTED,
            ),
        },
        required=("model", "input"),
    ),
    then=_tools_agree,
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
