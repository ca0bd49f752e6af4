"""Grammars on the safetensors backends: llguidance's mask inside allm's own sampling order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allm.kernel.codes import InternalError, UnsupportedError
from allm.managers.text.chat_format import Family
from allm.managers.text.chat_grammar import call_grammar, json_gbnf
from allm.managers.text.guided import GuideTokenizer, guide_for
from allm.managers.text.sampling import Sampling, TokenPicker
from tests.model_files import write_tokenizer

YES_NO = 'root ::= "yes" | "no"\n'


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    import transformers

    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


@pytest.fixture(scope="module")
def width(hf):
    return len(hf) + 16  # an embedding wider than the vocabulary, as real models have


@pytest.fixture(scope="module")
def tokenizer(hf, width):
    eos = {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}
    return GuideTokenizer(hf, width, eos)


def generate(tokenizer, hf, gbnf, sampling, *, seed, steps=40):
    """Tokens drawn under ``gbnf`` from random logits until an end token."""
    picker = TokenPicker(sampling, seed, guide_for(tokenizer, gbnf, client_schema=True))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        token = picker.pick(rng.normal(size=tokenizer.n_vocab).astype(np.float32))
        if token in tokenizer.eos:
            return hf.decode(out), True
        out.append(token)
    return hf.decode(out), False


def test_every_draw_is_in_the_grammars_language(tokenizer, hf):
    sampling = Sampling.from_params({"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0})
    seen = set()
    for seed in range(40):
        text, ended = generate(tokenizer, hf, YES_NO, sampling, seed=seed)
        assert ended
        assert text in ("yes", "no"), text
        seen.add(text)
    assert seen == {"yes", "no"}  # the mask restricts; it does not pick


def test_greedy_takes_the_best_token_the_grammar_allows(tokenizer, hf, width):
    logits = np.zeros(width, dtype=np.float32)
    logits[hf.convert_tokens_to_ids("x")] = 50.0  # what an unconstrained greedy pick would take
    n = hf.encode("n")[0]
    logits[n] = 5.0
    picker = TokenPicker(
        Sampling.from_params({"temperature": 0}), 0, guide_for(tokenizer, YES_NO, client_schema=True)
    )
    assert picker.pick(logits) == n


def test_a_json_schema_is_followed_and_ends_with_any_end_token(tokenizer, hf, width):
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "n": {"type": "integer"}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    sampling = Sampling.from_params(
        {"temperature": 1.0, "response_format": {"type": "json_schema", "schema": schema}}
    )
    gbnf = json_gbnf(sampling)
    assert gbnf is not None
    ended = 0
    for seed in range(10):
        text, done = generate(tokenizer, hf, gbnf, sampling, seed=seed, steps=200)
        if done:
            ended += 1
            value = json.loads(text)
            assert set(value) == {"city", "n"}, text
            assert value["city"] in ("Paris", "Rome")
            assert isinstance(value["n"], int)
    assert ended >= 5
    guide = guide_for(tokenizer, 'root ::= "a"\n', client_schema=False)
    guide.consume(hf.encode("a")[0])
    allowed = guide.allowed(width)
    assert set(np.flatnonzero(allowed)) == tokenizer.eos  # both end tokens, nothing else
    assert not allowed[len(hf) :].any()


def test_a_tool_call_grammar_gives_a_valid_call(tokenizer, hf):
    functions = [
        {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        }
    ]
    gbnf = call_grammar(Family.GENERIC, functions, max_calls=1)
    sampling = Sampling.from_params({"temperature": 0.5})
    text, ended = generate(tokenizer, hf, gbnf, sampling, seed=3, steps=300)
    assert ended, text
    [call] = json.loads(text)["tool_calls"]
    assert call["name"] == "get_weather"
    assert call["arguments"]["city"] in ("Paris", "Rome")


def test_a_grammar_llguidance_refuses_is_coded_by_who_wrote_it(tokenizer):
    with pytest.raises(UnsupportedError) as info:
        guide_for(tokenizer, "root ::= undefined-rule\n", client_schema=True)
    assert info.value.param == "response_format"
    with pytest.raises(InternalError):
        guide_for(tokenizer, "root ::= undefined-rule\n", client_schema=False)


def test_a_marker_that_is_an_added_token_may_be_that_token_or_its_spelling(tmp_path):
    import transformers

    from tests.model_files import TEMPLATE_TOKENS

    write_tokenizer(tmp_path, TEMPLATE_TOKENS["qwen2.5"], markers_special=False)  # as Qwen2.5's own
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    tokenizer = GuideTokenizer(hf, len(hf), {hf.convert_tokens_to_ids("<|im_end|>")})
    functions = [{"name": "f", "parameters": {"type": "object"}}]
    guide = guide_for(tokenizer, call_grammar(Family.HERMES, functions, max_calls=1), client_schema=False)
    first = {hf.convert_ids_to_tokens(int(t)) for t in np.flatnonzero(guide.allowed(len(hf)))}
    assert first == {"<tool_call>", "<"}
