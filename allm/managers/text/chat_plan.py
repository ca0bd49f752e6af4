"""Chat planning: how one reply is constrained (a grammar now, or once a call begins) and read.

Every chat engine starts the same way: it checks the request (request.py), renders
its chat template (``chat_format.render_chat``), then asks ``plan_reply`` how the
reply is generated and read; the chat loop (generation.py) follows the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from allm.managers.text.chat_format import THINK_OPEN, Family
from allm.managers.text.chat_grammar import TEXT_ONLY_GRAMMAR, call_grammar, gbnf_literal
from allm.managers.text.chat_parse import HarmonyParser, OutputParser, Parser
from allm.managers.text.request import MAX_CALLS, ChatRequest
from allm.managers.text.sampling import Sampling


@dataclasses.dataclass(slots=True)
class ChatPlan:
    """How one chat reply is generated and read.

    ``grammar``: constrains the reply from its first token (a forced call, a JSON
    answer). ``lazy``: the grammar of a call section found in free text (tool_choice
    auto): given the text from the last clean token boundary up to the section, it
    returns the GBNF the reply continues under, so a call the model begins is
    always valid. ``answered``: calls the conversation already has results for;
    with ``as_text`` (the grammar and parser of a plain answer, given the same
    kind of prefix), a reply that repeats one is taken back and answered in text.
    """

    parser: Parser
    max_calls: int = MAX_CALLS
    grammar: str | None = None
    lazy: Callable[[str], str] | None = None
    answered: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    as_text: Callable[[str], tuple[str, Parser]] | None = None


def plan_sampling(plan: ChatPlan, sampling: Sampling) -> Sampling:
    """The sampling the reply is drawn with: a plan's own grammar covers a JSON answer too."""
    if plan.grammar is not None or plan.lazy is not None:
        return dataclasses.replace(sampling, json_schema=None, json_object=False)
    return sampling


def chat_plan(req: ChatRequest, family: Family, *, think: bool, thinking: bool) -> ChatPlan:
    """How a model's reply is constrained and read (see ChatPlan).

    ``think``: the template's models reason in ``<think>``; ``thinking``: the prompt
    already opened it. Without tools, a JSON answer's grammar is ``json_gbnf``'s.
    """
    tools = req.tools
    sampling = req.sampling
    if family is Family.HARMONY:
        # gpt-oss's own channels carry calls; its special tokens are not held to a grammar here
        return ChatPlan(parser=HarmonyParser(tools=tools is not None))
    answer: dict[str, Any] | None = None
    if sampling.json_schema is not None:
        answer = dict(sampling.json_schema)
    elif sampling.json_object:
        answer = {"type": "object"}
    reasoning = "open" if thinking else ("optional" if think else None)
    if tools is None:
        return ChatPlan(parser=OutputParser(family, tools=False, think=think, thinking=thinking))
    functions = tools.allowed
    max_calls = tools.max_calls
    if tools.required or answer is not None:
        # the reply is constrained from its first token: calls only, or calls or a JSON answer
        grammar = call_grammar(
            family,
            functions,
            max_calls=max_calls,
            answer=None if tools.required else answer,
            think=reasoning,
            custom=tools.custom,
        )
        return ChatPlan(
            parser=OutputParser(family, tools=True, think=think, thinking=thinking),
            max_calls=max_calls,
            grammar=grammar,
        )
    as_text = None
    if family is Family.GENERIC:

        def as_text(prefix: str) -> tuple[str, Parser]:
            grammar = TEXT_ONLY_GRAMMAR.replace("root ::=", f"root ::= {gbnf_literal(prefix)}", 1)
            return grammar, OutputParser(family, tools=False, think=think)

    return ChatPlan(
        parser=OutputParser(family, tools=True, think=think, thinking=thinking, halt_on_open=True),
        max_calls=max_calls,
        lazy=lambda prefix: call_grammar(
            family, functions, max_calls=max_calls, prefix=prefix, custom=tools.custom
        ),
        answered=req.answered(),
        as_text=as_text,
    )


def plan_reply(req: ChatRequest, family: Family, *, think: bool, prompt: str) -> tuple[ChatPlan, Sampling]:
    """The plan of the reply to ``prompt`` (the rendered chat template), and the sampling it is
    drawn with. ``think``: the template's models reason in ``<think>``."""
    thinking = think and prompt.rstrip().endswith(THINK_OPEN)
    plan = chat_plan(req, family, think=think, thinking=thinking)
    return plan, plan_sampling(plan, req.sampling)
