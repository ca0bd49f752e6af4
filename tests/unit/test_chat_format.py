"""Chat formats: family detection, the output parser of each family, native template rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from allm.managers.text.chat_format import Family, family_of, template_messages, thinks
from allm.managers.text.chat_grammar import call_grammar
from allm.managers.text.chat_parse import (
    Arguments,
    CallEnd,
    CallStart,
    HarmonyParser,
    OutputParser,
    Reasoning,
    Text,
)
from allm.managers.text.request import check_messages, tool_spec

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def events(parser, text, step=3):
    """Feed ``text`` in pieces of ``step`` characters; merge neighbouring text events."""
    out = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    out += parser.finish()
    merged = []
    for event in out:
        if merged and type(merged[-1]) is type(event) and hasattr(event, "text"):
            merged[-1] = type(event)(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


def test_families_are_read_from_the_templates():
    assert family_of((TEMPLATES / "qwen2.5.jinja").read_text()) is Family.HERMES
    assert family_of((TEMPLATES / "llama3.1.jinja").read_text()) is Family.LLAMA3
    assert family_of("{{ messages }} {% if tools %}[TOOL_CALLS]{% endif %}") is Family.MISTRAL
    assert family_of("<|start|>{{ m }}<|channel|>analysis<|message|>") is Family.HARMONY
    assert family_of("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is Family.GENERIC
    assert family_of(None) is Family.GENERIC
    assert thinks((TEMPLATES / "qwen-think.jinja").read_text())
    assert not thinks((TEMPLATES / "qwen2.5.jinja").read_text())


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_hermes_reasoning_text_and_calls(step):
    text = (
        "<think>the user wants weather</think>\n\nLet me look.<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Pa}r\\"is"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    assert events(OutputParser(Family.HERMES, tools=True, think=True), text, step) == [
        Reasoning("the user wants weather"),
        Text("Let me look."),
        CallStart("get_weather"),
        Arguments('{"city": "Pa}r\\"is"}'),
        CallEnd(),
        CallStart("get_time"),
        Arguments("{}"),
        CallEnd(),
    ]


def test_without_tools_a_call_marker_is_just_text():
    text = '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>'
    assert events(OutputParser(Family.HERMES, tools=False, think=False), text) == [Text(text)]


def test_a_prompt_that_opened_think_starts_in_reasoning():
    parser = OutputParser(Family.HERMES, tools=False, think=True, thinking=True)
    assert events(parser, "hmm, Paris?</think>\n\nParis.") == [Reasoning("hmm, Paris?"), Text("Paris.")]


@pytest.mark.parametrize(
    ("family", "text"),
    [
        (Family.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
        (Family.LLAMA3, ' {"name": "get_weather", "parameters": {"city": "Oslo"}}'),
        (Family.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
        (Family.GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'),
    ],
)
def test_each_family_call_syntax_is_parsed(family, text):
    assert events(OutputParser(family, tools=True, think=False), text, 4) == [
        CallStart("get_weather"),
        Arguments('{"city": "Oslo"}'),
        CallEnd(),
    ]


def test_json_that_is_not_a_call_stays_text():
    """A JSON answer under tool_choice auto begins like a generic call but is not one."""
    text = '{"answer": 42}'
    assert events(OutputParser(Family.GENERIC, tools=True, think=False), text) == [Text(text)]


def test_a_brace_after_text_does_not_open_a_call():
    text = 'Use {"name": "x"} as the example.'
    assert events(OutputParser(Family.GENERIC, tools=True, think=False), text) == [Text(text)]


def test_harmony_channels():
    text = (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>'
    )
    assert events(HarmonyParser(tools=True), text, 4) == [
        Reasoning("Need weather."),
        CallStart("get_weather"),
        Arguments('{"city":"Oslo"}'),
        CallEnd(),
    ]
    final = (
        "<|channel|>analysis<|message|>Easy.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Oslo.<|return|>"
    )
    assert events(HarmonyParser(tools=False), final) == [Reasoning("Easy."), Text("Oslo.")]


def test_halting_at_a_marker_leaves_the_rest_to_a_grammar():
    parser = OutputParser(Family.HERMES, tools=True, think=False, halt_on_open=True)
    assert parser.feed('Hi <tool_call>\n{"na') == [Text("Hi ")]
    assert parser.section_start == 3
    assert parser.unconsumed == '\n{"na'
    # the continuation under the grammar is read whole, however large its pieces
    continuation = '\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert [*parser.feed(continuation), *parser.finish()] == [
        CallStart("get_weather"),
        Arguments('{"city": "Oslo"}'),
        CallEnd(),
    ]


@pytest.mark.parametrize("family", [Family.HERMES, Family.LLAMA3, Family.MISTRAL, Family.GENERIC])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"prefix": " <tool_call>"},
        {"answer": {"type": "object"}},
        {"think": "open"},
        {"think": "optional"},
    ],
)
def test_call_grammars_compile(family, extra):
    LlamaGrammar.from_string(call_grammar(family, [WEATHER["function"]], max_calls=3, **extra), verbose=False)


TRAFFIC = [
    {"role": "user", "content": "weather?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
]


def render(template, messages, tools=None):
    formatter = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    extra = {"tools": tools.tools} if tools is not None else {}
    return formatter(messages=messages, **extra).prompt


def test_qwen_template_gets_the_tools_calls_and_results_with_ids():
    tools = tool_spec([WEATHER], "auto")
    prompt = render(
        (TEMPLATES / "qwen2.5.jinja").read_text(),
        template_messages(check_messages(TRAFFIC), Family.HERMES, tools),
        tools,
    )
    assert json.dumps(WEATHER) in prompt  # the template lists the tools itself
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    assert "Function result" not in prompt


def test_llama3_template_gets_the_tools_and_the_call():
    tools = tool_spec([WEATHER], "auto")
    prompt = render(
        (TEMPLATES / "llama3.1.jinja").read_text(),
        template_messages(check_messages(TRAFFIC), Family.LLAMA3, tools),
        tools,
    )
    assert '"name": "get_weather"' in prompt
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}' in prompt
    # Meta's template writes a result with tojson (a string is "iterable" to Jinja)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny"' in prompt


def test_events_of_different_kinds_never_compare_equal():
    pieces = [Text("x"), Reasoning("x"), Arguments("x")]
    assert [a == b for a in pieces for b in pieces] == [a is b for a in pieces for b in pieces]
    assert Text("x") == Text("x")
    assert repr(Reasoning("x")) == "Reasoning(text='x')"
