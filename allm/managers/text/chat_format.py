"""Chat formats: each family's chat template, the messages it takes, and what its calls look like.

A model trained for tool calling answers in its own syntax; allm gives such a
model the tools through its own chat template, and reads that syntax back
(``chat_parse.py``) or holds the reply to it (``chat_grammar.py``). The family
is read from the chat template's text (docs/agents.md):

    hermes   Qwen2.5, Qwen3, Hermes   <tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>
    llama3   Llama 3.x               {"name": …, "parameters": {…}} as the whole reply
    mistral  Mistral                 [TOOL_CALLS][{"name": …, "arguments": {…}}, …]
    harmony  gpt-oss                 <|channel|>commentary to=functions.NAME … <|message|>{…}<|call|>
    generic  any other template      the tools are described in the system message and a
                                     call is the JSON {"tool_calls": [{"name": …, "arguments": {…}}]}

Reasoning is ``<think>…</think>`` in templates that know it (Qwen3, DeepSeek-R1
distills) and the ``analysis`` channel of harmony.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from allm.kernel.codes import UnsupportedError

if TYPE_CHECKING:
    from allm.managers.text.request import ChatRequest, ToolSpec


class Family(enum.StrEnum):
    GENERIC = "generic"
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    HARMONY = "harmony"


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def family_of(template: str | None) -> Family:
    """The tool-call family a chat template was written for (generic when it takes no tools)."""
    if not template:
        return Family.GENERIC
    if "<|channel|>" in template and "<|message|>" in template:
        return Family.HARMONY
    if "tools" not in template:
        return Family.GENERIC
    if "<tool_call>" in template:
        return Family.HERMES
    if "[TOOL_CALLS]" in template:
        return Family.MISTRAL
    if "<|start_header_id|>" in template and ("<|python_tag|>" in template or '"parameters"' in template):
        return Family.LLAMA3
    return Family.GENERIC


def thinks(template: str | None) -> bool:
    """Whether the template's models reason inside <think>…</think>."""
    return bool(template) and THINK_CLOSE in str(template)


# -- the call syntax of each family ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Syntax:
    """Where a family's call section begins and how its calls are delimited.

    ``opens``: markers that begin the call section; ``consumed`` says whether the
    marker is outside the calls' JSON (hermes, mistral) or is its first character
    (llama3 and generic: the ``{`` that begins the reply). ``at_start``: the section
    may only begin the reply. After a call's arguments, ``more`` leads to the next
    call's head and ``done`` ends the section.
    """

    opens: tuple[str, ...]
    consumed: bool
    at_start: bool
    head: re.Pattern[str]
    more: re.Pattern[str] | None
    done: re.Pattern[str] | None
    starts: tuple[str, ...] = ()  # how a head may begin, whitespace removed


_NAME = r'"(?P<name>[^"\\]*)"'
SYNTAXES: Mapping[Family, Syntax] = {
    Family.HERMES: Syntax(
        opens=("<tool_call>",),
        consumed=True,
        at_start=False,
        head=re.compile(r'\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'),
        more=re.compile(r"\s*\}\s*</tool_call>\s*<tool_call>"),
        done=None,
    ),
    Family.LLAMA3: Syntax(
        opens=("<|python_tag|>", "{"),
        consumed=False,
        at_start=True,
        head=re.compile(
            r'\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"parameters"\s*:\s*'
        ),
        more=None,
        done=re.compile(r"\s*\}"),
        starts=('{"name"', "<|python_tag|>"),
    ),
    Family.MISTRAL: Syntax(
        opens=("[TOOL_CALLS]",),
        consumed=True,
        at_start=False,
        head=re.compile(r'\s*\[?\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'),
        more=re.compile(r"\s*\}\s*,"),
        done=re.compile(r"\s*\}\s*\]"),
    ),
    Family.GENERIC: Syntax(
        opens=("{",),
        consumed=False,
        at_start=True,
        head=re.compile(
            r'\s*(?:\{\s*"tool_calls"\s*:\s*\[)?\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'
        ),
        more=re.compile(r"\s*\}\s*,"),
        done=re.compile(r"\s*\}\s*\]\s*\}"),
        starts=('{"tool_calls"', '{"name"'),
    ),
}

# -- what a template is given --------------------------------------------------------------

Rendered = TypeVar("Rendered")


def render_chat(
    model_id: str,
    req: ChatRequest,
    family: Family,
    render: Callable[..., Rendered],
    refusals: tuple[type[Exception], ...],
) -> Rendered:
    """``req`` through the model's chat template: ``render(messages, **extras)``.

    ``refusals`` are what the template itself raises, by its library: a template that
    cannot take these messages (its ``raise_exception``, an undefined name it reads) is
    the client's to fix, UNSUPPORTED. Anything else raised here is a bug, allm's or the
    library's: it goes on, so the runtime answers INTERNAL and logs its traceback.
    """
    messages = template_messages(req.messages, family, req.tools)
    extras = template_extras(req, family)
    try:
        return render(messages, **extras)
    except refusals as exc:
        raise UnsupportedError(f"{model_id}'s chat template refused the messages: {exc}") from exc


def template_messages(
    messages: list[dict[str, Any]], family: Family, tools: ToolSpec | None
) -> list[dict[str, Any]]:
    """Checked messages as the model's chat template takes them.

    A template with a tool format of its own gets calls (arguments as objects,
    which templates render with ``tojson``) and tool results (with the call's id
    and function name) as they are. Any other template gets the generic scheme:
    calls as the JSON it asks for, results as user text naming the call, and
    with tools, their description in the system message.
    """
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        if role == "developer" and family is not Family.HARMONY:
            role = "system"
        if family is Family.GENERIC:
            if role == "tool":
                call_id = msg.get("tool_call_id", "")
                name = names.get(call_id, "a function")
                out.append(
                    {"role": "user", "content": f"Result of {name} (call {call_id}): {msg['content']}"}
                )
            elif msg.get("tool_calls"):
                calls = [
                    {"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}
                    for c in msg["tool_calls"]
                ]
                out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
            else:
                out.append({"role": role, "content": msg["content"]})
            continue
        clean = {**msg, "role": role}
        if msg.get("tool_calls"):
            clean["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": arguments_object(c["function"]["arguments"]),
                    },
                }
                for c in msg["tool_calls"]
            ]
        if role == "tool":
            clean["name"] = names.get(msg.get("tool_call_id", ""), "")
        if family is Family.HARMONY and "reasoning_content" in clean:
            clean["thinking"] = clean["reasoning_content"]
        out.append(clean)
    if family is Family.GENERIC and tools is not None:
        text = generic_system_text(tools.allowed, required=tools.required)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def template_extras(req: ChatRequest, family: Family) -> dict[str, Any]:
    """What a chat template gets beside its messages: the tools, when the family's template
    takes them (the generic scheme lists them in a system message instead), and the
    reasoning effort."""
    extra: dict[str, Any] = {}
    if req.tools is not None and family is not Family.GENERIC:
        extra["tools"] = req.tools.tools
    if req.reasoning_effort is not None:
        extra["reasoning_effort"] = req.reasoning_effort
    return extra


def generic_system_text(functions: Sequence[Mapping[str, Any]], *, required: bool) -> str:
    """What the generic scheme tells a model that has no tool format of its own."""
    listing = json.dumps(
        [
            {
                "name": fn["name"],
                "description": fn.get("description", ""),
                "parameters": fn.get("parameters", {}),
            }
            for fn in functions
        ]
    )
    how = (
        "To call a function, reply with only the JSON "
        '{"tool_calls": [{"name": <function>, "arguments": {...}}]}.'
    )
    if not required:
        how += " Otherwise, and once you have the results you need, answer in plain text."
    return f"You can call these functions:\n{listing}\n{how}"


def arguments_object(arguments: str) -> Any:
    """A call's JSON-text arguments as the object chat templates render (text that is not JSON stays text)."""
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return arguments
