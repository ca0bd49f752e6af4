"""Sampling options on real engines through the text manager (allm/managers/text/sampling.py).

SmolLM2 runs on llama.cpp; a tiny random-weight llama directory runs on
transformers + torch and on mlx-lm. Each option must change what greedy
decoding picks in the documented way, the same on every engine.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from allm.kernel.codes import AllmError, Code
from tests.model_files import smollm2_path, write_hf_model

from .conftest import text_manager

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMOL = "smollm2"
ENGINES = (SMOL, "llama-transformers", "llama-mlx")
PROMPT = "The capital of France is"
EVERY_OPTION = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.1,
    "repeat_penalty": 1.1,
    "frequency_penalty": 0.3,
    "presence_penalty": 0.2,
    "logit_bias": {"5": -2, "7": 1.5},
    "logprobs": True,
    "top_logprobs": 3,
    "seed": 3,
    "stop": ["\n\n"],
    "max_tokens": 6,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.fixture(scope="module")
def vocab(hf_dir):
    """Each engine's tokenizer here in the test: token id ↔ text."""
    import llama_cpp
    from tokenizers import Tokenizer

    smol = llama_cpp.Llama(str(smollm2_path()), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))

    def smol_ids(text: str) -> list[int]:
        return list(smol.tokenize(text.encode(), add_bos=False, special=False))

    def hf_ids(text: str) -> list[int]:
        return list(hf.encode(text, add_special_tokens=False).ids)

    smol_tools = (smol_ids, lambda ids: smol.detokenize(ids).decode("utf-8", "replace"))
    hf_tools = (hf_ids, lambda ids: hf.decode(ids))
    return {SMOL: smol_tools, "llama-transformers": hf_tools, "llama-mlx": hf_tools}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def text(hf_dir):
    models = [
        {"id": SMOL, "path": str(smollm2_path()), "options": {"n_ctx": 1024}},
        {"id": "llama-transformers", "path": str(hf_dir), "options": {"backend": "transformers"}},
        {"id": "llama-mlx", "path": str(hf_dir), "options": {"backend": "mlx"}},
    ]
    async with text_manager({"models": models, "memory_budget_bytes": None}) as (client, _supervisor):
        yield client


async def complete(client, model: str, **params):
    params = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8, **params}
    return (await client.call("text", "complete", model=model, params=params, timeout_s=120)).data


@pytest.mark.parametrize("model", ENGINES)
async def test_a_bias_of_plus_100_makes_greedy_pick_that_token(text, vocab, model):
    ids, decode = vocab[model]
    token = ids(" banana" if model == SMOL else " dog")[0]
    reply = await complete(text, model, max_tokens=4, logit_bias={str(token): 100})
    assert reply["text"] == decode([token]) * 4
    assert reply["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("model", ENGINES)
async def test_a_bias_of_minus_100_bans_the_token_greedy_would_pick(text, vocab, model):
    ids, decode = vocab[model]
    plain = await complete(text, model)
    first = ids(plain["text"])[0]
    banned = await complete(text, model, logit_bias={str(first): -100})
    assert banned["text"] != plain["text"]
    assert not banned["text"].startswith(decode([first]))
    if model == SMOL:
        assert plain["text"].startswith(" Paris")
        assert "Paris" not in banned["text"]


@pytest.mark.parametrize("model", ENGINES)
@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty", "repeat_penalty"])
async def test_penalties_change_a_repetitive_greedy_output(text, vocab, model, penalty):
    plain = await complete(text, model, max_tokens=30)
    tokens = vocab[model][0](plain["text"])
    assert len(set(tokens)) < len(tokens) * 0.7  # greedy repeats itself here
    penalized = await complete(text, model, max_tokens=30, **{penalty: 1.5})
    assert penalized["text"] != plain["text"]


@pytest.mark.parametrize("model", ENGINES)
async def test_top_k_1_is_greedy_whatever_the_temperature(text, model):
    plain = await complete(text, model, max_tokens=12)
    for seed in (1, 2):
        hot = await complete(text, model, max_tokens=12, temperature=1.8, top_k=1, seed=seed)
        assert hot["text"] == plain["text"]


@pytest.mark.parametrize("model", ENGINES)
async def test_a_logit_bias_outside_the_vocabulary_is_refused_naming_it(text, model):
    with pytest.raises(AllmError) as info:
        await complete(text, model, logit_bias={"1000000": 5})
    assert info.value.code is Code.UNSUPPORTED
    assert info.value.reason == "invalid_request"
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize("model", ENGINES)
async def test_every_engine_takes_the_same_options(text, model):
    messages = [{"role": "user", "content": "Say hello."}]
    params = {"messages": messages, **EVERY_OPTION}
    reply = (await text.call("text", "chat", model=model, params=params, timeout_s=120)).data
    assert 0 < reply["usage"]["completion_tokens"] <= 6
    assert reply["logprobs"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in reply["logprobs"])
    again = (await text.call("text", "chat", model=model, params=params, timeout_s=120)).data
    assert again["text"] == reply["text"]  # seeded


def check_entries(entries, count: int) -> None:
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == count
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        # greedy: the chosen token is the model's most likely
        assert entry["token"] == top[0]["token"]
        assert entry["logprob"] == pytest.approx(top[0]["logprob"])
        assert entry["bytes"] == top[0]["bytes"]


@pytest.mark.parametrize("model", ENGINES)
async def test_logprobs_give_the_chosen_token_and_the_sorted_alternatives(text, model):
    reply = await complete(text, model, logprobs=True, top_logprobs=4)
    entries = reply["logprobs"]
    assert len(entries) == reply["usage"]["completion_tokens"]
    check_entries(entries, 4)
    assert "".join(e["token"] for e in entries) == reply["text"]
    if model == SMOL:
        assert entries[0]["token"] == " Paris"
        assert -1.0 < entries[0]["logprob"] < 0


@pytest.mark.parametrize("model", ENGINES)
async def test_streamed_logprobs_follow_their_text(text, model):
    params = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    async with text.stream("text", "complete", model=model, params=params, timeout_s=120) as s:
        chunks = [chunk.data async for chunk in s]
    assert s.result is not None
    streamed = [e for c in chunks for e in c.get("logprobs", [])]
    assert streamed == s.result.data["logprobs"]
    check_entries(streamed, 2)
    assert len(streamed) == s.result.data["usage"]["completion_tokens"]


@pytest.mark.parametrize("model", ENGINES)
async def test_chat_logprobs_are_streamed_with_their_text(text, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = {"messages": messages, "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    async with text.stream("text", "chat", model=model, params=params, timeout_s=120) as s:
        chunks = [chunk.data async for chunk in s]
    assert s.result is not None
    streamed = [e for c in chunks for e in c.get("logprobs", [])]
    assert streamed == s.result.data["logprobs"]
    check_entries(streamed, 3)
    assert len(streamed) == s.result.data["usage"]["completion_tokens"]
    if model == SMOL:  # GGUF entries carry each token's own bytes: together they are the text
        assert b"".join(bytes(e["bytes"]) for e in streamed).decode() == s.result.data["text"]


async def test_no_logprobs_unless_asked(text):
    reply = await complete(text, SMOL)
    assert not reply.get("logprobs")
