"""Custom tools' input grammars: Lark and regex parsed by the gateway, rendered as GBNF by the manager.

What the manager's grammar lets a model write, decoded from the call's JSON, is in the
client's grammar's language: random draws under llguidance (the safetensors backends'
engine, which reads the same GBNF as llama.cpp) are checked against an equivalent
Python regular expression written by hand; what cannot be carried faithfully is
refused with the construct named.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from llama_cpp.llama_grammar import LlamaGrammar

from allm import free_grammar
from allm.gateway.responses.grammar import lark_grammar, regex_grammar
from allm.managers.text.chat_format import Family
from allm.managers.text.chat_grammar import call_grammar
from allm.managers.text.guided import GuideTokenizer, guide_for
from allm.managers.text.request import tool_spec
from allm.managers.text.sampling import Sampling, TokenPicker
from tests.codex_tools import APPLY_PATCH
from tests.model_files import write_tokenizer

#: (syntax, definition, an equivalent Python regex of what the input may be)
GRAMMARS = [
    ("regex", r"^(ls|cat) [a-z_./]{1,12}$", r"(ls|cat) [a-z_./]{1,12}"),
    ("regex", r'[a"\\\n\t]{1,6}!', r'[a"\\\n\t]{1,6}!'),  # what JSON must escape
    ("regex", r"\d{2,3}(?:\.\d)?", r"[0-9]{2,3}(\.[0-9])?"),
    ("lark", 'start: "cd " WORD ("/" WORD)~0..2 LF?\n%import common (WORD, LF)',
     r"cd [A-Za-z]+(/[A-Za-z]+){0,2}\n?"),
    ("lark", 'start: pair ("," pair)*\npair: KEY "=" /[^,\\n]{0,4}/\nKEY: "a".."c"',
     r"[a-c]=[^,\n]{0,4}(,[a-c]=[^,\n]{0,4})*"),
    ("lark", 'start: "say"i " " SIGNED_NUMBER\n%import common.SIGNED_NUMBER',
     r"[sS][aA][yY] [+-]?([0-9]+[eE][+-]?[0-9]+|([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    import transformers

    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(hf):
    eos = {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}
    return GuideTokenizer(hf, len(hf) + 16, eos)


def custom_tool(syntax: str, definition: str) -> dict:
    parsed = lark_grammar(definition) if syntax == "lark" else regex_grammar(definition)
    return {
        "type": "custom",
        "custom": {
            "name": "tool",
            "format": {
                "type": "grammar",
                "grammar": {"syntax": syntax, "definition": definition, "parsed": parsed},
            },
        },
    }


def draws(tokenizer, hf, gbnf: str, seeds: range, steps: int = 200) -> list[str]:
    """Texts drawn under ``gbnf`` from random logits, those that ended."""
    sampling = Sampling.from_params({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0})
    out = []
    for seed in seeds:
        picker = TokenPicker(sampling, seed, guide_for(tokenizer, gbnf, client_schema=False))
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        for _ in range(steps):
            token = picker.pick(rng.normal(size=tokenizer.n_vocab).astype(np.float32))
            if token in tokenizer.eos:
                out.append(hf.decode(tokens))
                break
            tokens.append(token)
    return out


@pytest.mark.parametrize(("syntax", "definition", "python"), GRAMMARS)
def test_every_input_a_forced_custom_call_can_have_is_in_the_grammars_language(
    tokenizer, hf, syntax, definition, python
):
    spec = tool_spec([custom_tool(syntax, definition)], "required")
    assert spec is not None
    gbnf = call_grammar(Family.GENERIC, spec.allowed, max_calls=1, custom=spec.custom)
    LlamaGrammar.from_string(gbnf, verbose=False)  # llama.cpp takes it too
    texts = draws(tokenizer, hf, gbnf, range(12), steps=400)
    assert len(texts) >= 3, texts  # random logits do not always close a string in time
    for text in texts:
        [call] = json.loads(text)["tool_calls"]
        assert call["name"] == "tool"
        assert list(call["arguments"]) == ["input"]
        assert re.fullmatch(python, call["arguments"]["input"]), call["arguments"]["input"]


@pytest.mark.parametrize("family", list(Family))
def test_codexs_apply_patch_grammar_compiles_for_every_family(family):
    tools = [
        custom_tool("lark", APPLY_PATCH),
        {"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}},
        {"type": "custom", "custom": {"name": "free"}},
    ]
    for choice in ("required", "auto"):
        spec = tool_spec(tools, choice)
        assert spec is not None
        gbnf = call_grammar(
            family, spec.allowed, max_calls=2, custom=spec.custom, prefix="" if choice == "auto" else None
        )
        LlamaGrammar.from_string(gbnf, verbose=False)


@pytest.mark.parametrize(
    ("syntax", "definition", "words"),
    [
        ("lark", 'start: "a"\n%ignore " "', "%ignore"),
        ("lark", 'start: x\nx{a}: a', "template"),
        ("lark", 'start: "a"\n%declare B', "%declare"),
        ("lark", "start: WORD\n%import other.WORD", "only common terminals"),
        ("lark", "start: C_COMMENT\n%import common.C_COMMENT", "not among the common terminals"),
        ("lark", "start: /a/i", "flags"),
        ("lark", "start: expr\nexpr: expr \"+\" \"1\" | \"1\"", "left-recursive"),
        ("lark", 'start: ("a"?)*', "can be empty"),
        ("lark", 'start: "a" ~ 1001', "1000"),
        ("lark", 'start: b\nb: "x"', None),
        ("lark", "rule: \"x\"", "no 'start' rule"),
        ("lark", 'start: missing', "not defined"),
        ("regex", r"\W+", r"\W"),
        ("regex", r"[^\s]", r"\s inside [^…]"),
        ("regex", r"(a)\1", "backreference"),
        ("regex", r"(?i)abc", "inline flags"),
        ("regex", r"(?=a)a", "lookaround"),
        ("regex", r"a++", "possessive"),
        ("regex", r"[[:alpha:]]", "POSIX"),
        ("regex", r"a{2000}", "1000"),
        ("regex", r"\p{L}", "Unicode property"),
        ("regex", r"a$b", "'$' anywhere but at the end"),
        ("regex", r"x{,3}", "not a repetition"),
    ],
)  # fmt: skip
def test_what_a_grammar_cannot_carry_is_refused_naming_it(syntax, definition, words):
    parse = lark_grammar if syntax == "lark" else regex_grammar
    if words is None:
        assert parse(definition)["rules"]["b"] == ["lit", "x"]
        return
    with pytest.raises(free_grammar.GrammarError) as info:
        parse(definition)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "grammar",
    [
        {"start": "s", "rules": {"s": ["ref", "t"]}},
        {"start": "s", "rules": {"s": ["cls", []]}},
        {"start": "s", "rules": {"s": ["rep", ["lit", "a"], 3, 2]}},
        {"start": "s", "rules": {"s": ["cls", [[0, 0x110000]]]}},
        {"start": "s", "rules": {"s": ["seq", [["ref", "s"], ["lit", "a"]]]}},
        {"start": "s", "rules": {"s": "a"}},
        {"start": "x", "rules": {"s": ["lit", "a"]}},
    ],
)
def test_the_manager_refuses_a_malformed_grammar_from_a_peer(grammar):
    tool = custom_tool("regex", "a")
    tool["custom"]["format"]["grammar"]["parsed"] = grammar
    with pytest.raises(Exception, match="the grammar cannot be used") as info:
        tool_spec([tool], "auto")
    assert info.value.param == "tools[0].custom.format.grammar"
