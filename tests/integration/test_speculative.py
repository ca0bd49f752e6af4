"""Speculative decoding, by n-gram lookup and by a draft model: the same greedy text.

The real text manager with SmolLM2 three times (plain, with ``speculative = "ngram"``, and with
a draft model: SmolLM2 with a noisy output norm, whose guesses are often right and often wrong),
through the real kernel; and a draft model of another tokenizer, refused.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_asyncio

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError
from tests.model_files import smollm2_path, smollm2_perturbed, write_tiny_llama_gguf
from tests.waits import until

from .conftest import text_manager

PLAIN = "smollm2"
NGRAM = "smollm2-ngram"
DRAFTED = "smollm2-drafted"
#: plain SmolLM2 that is sent exactly what DRAFTED is, in the same order: a reused prefix is
#: computed in a batch of another size than a fresh one, which can differ in the last bits and
#: turn a near tie, so greedy text is compared between models whose caches hold the same
REFERENCE = "smollm2-reference"
CODE = """def total(prices, tax):
    subtotal = 0
    for price in prices:
        subtotal = subtotal + price
    return subtotal * (1 + tax)


def average(prices):
    count = 0
    for price in prices:
        count = count + 1
    return total(prices, 0) / count
"""
#: a rewrite with a small edit: most of the reply is in the prompt already
REWRITE = [
    {"role": "system", "content": "You rewrite code exactly as asked and print only the code."},
    {"role": "user", "content": f"Rename the variable `prices` to `amounts` in this code:\n\n{CODE}"},
]
#: prompts for the draft model: a rewrite, and questions whose answers are not in their prompts
#: (n-gram lookup would have little to copy from)
EDIT = [
    REWRITE[0],
    {"role": "user", "content": f"Rename the function `total` to `gross` in this code:\n\n{CODE}"},
]
ESSAY = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
WALK = [{"role": "user", "content": "Describe a walk through a forest at dawn."}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def text(tmp_path_factory):
    path = str(smollm2_path())
    work = tmp_path_factory.mktemp("drafts")
    small = {"n_parallel": 2, "n_ctx": 1024}
    settings = {
        "models": [
            {"id": PLAIN, "path": path, "options": small},
            {"id": NGRAM, "path": path, "options": {**small, "speculative": "ngram"}},
            {"id": "bad", "path": path, "options": {"speculative": "medusa"}},
            {"id": "noisy", "path": str(smollm2_perturbed(work / "smollm2-noisy.gguf")), "options": small},
            {"id": DRAFTED, "path": path, "options": {**small, "draft": "noisy"}},
            {"id": REFERENCE, "path": path, "options": small},
            {"id": "tiny", "path": str(write_tiny_llama_gguf(work / "tiny.gguf")), "options": small},
            {"id": "other-tokenizer", "path": path, "options": {**small, "draft": "tiny"}},
            {"id": "no-such-draft", "path": path, "options": {**small, "draft": "nowhere"}},
            {"id": "two-kinds", "path": path, "options": {**small, "draft": "noisy", "speculative": "ngram"}},
        ]
    }
    async with text_manager(settings, slots=2) as pair:
        yield pair


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def ask(client: KernelClient, model: str, **params: Any) -> dict[str, Any]:
    return (await client.call("text", "chat", model=model, params={"messages": REWRITE, **params})).data


async def test_greedy_text_is_the_same_token_for_token_and_most_drafts_are_kept(text):
    client, _ = text
    plain = await ask(client, PLAIN, temperature=0, max_tokens=120)
    drafted = await ask(client, NGRAM, temperature=0, max_tokens=120)
    assert drafted["text"] == plain["text"]
    assert drafted["usage"] == plain["usage"]
    assert "speculative" not in plain
    drafts = drafted["speculative"]
    # SmolLM2 copies the code's lines into its answer: a third of its 98 tokens came from drafts
    assert drafts["accepted"] > 20
    assert drafts["accepted"] <= drafts["drafted"]

    def counted() -> dict[str, int] | None:  # a heartbeat after the reply's last step
        [view] = client.instances()
        stats = view.heartbeat.extra["model_stats"][NGRAM]["speculative"] if view.heartbeat else None
        caught_up = stats and all(stats[k] >= drafts[k] for k in ("drafted", "accepted"))
        return stats if caught_up else None

    # the model's counts hold the reply's (and what its last steps drew ahead of its reader)
    await until(counted, timeout_s=30, what="a heartbeat counting the reply's drafts")


@pytest.mark.parametrize(
    ("plain", "drafted", "messages"), [(PLAIN, NGRAM, REWRITE), (REFERENCE, DRAFTED, WALK)]
)
async def test_streamed_tokens_are_the_same_as_without_drafts(text, plain, drafted, messages):
    client, _ = text
    params = {"messages": messages, "temperature": 0, "max_tokens": 80}
    pieces: dict[str, list[str]] = {}
    for model in (plain, drafted):
        async with client.stream("text", "chat", model=model, params=params) as s:
            pieces[model] = [chunk.data.get("text", "") async for chunk in s]
    assert "".join(pieces[drafted]) == "".join(pieces[plain])
    assert len(pieces[drafted]) > 1  # streamed, not one lump


async def test_a_seeded_request_is_not_drafted_and_keeps_its_text(text):
    client, _ = text
    params = {"temperature": 0.9, "seed": 11, "max_tokens": 40}
    plain = await ask(client, PLAIN, **params)
    drafted = await ask(client, NGRAM, **params)
    assert "speculative" not in drafted
    assert drafted["text"] == plain["text"]


async def test_an_unknown_kind_of_speculation_is_a_clear_error(text):
    client, _ = text
    with pytest.raises(AllmError) as info:
        await ask(client, "bad", max_tokens=2)
    assert info.value.param == "options.speculative"
    assert "ngram" in info.value.message


async def test_a_draft_model_gives_the_same_greedy_text_with_kept_and_rejected_guesses(text):
    client, _ = text
    kept = tried = 0
    for messages in (EDIT, ESSAY):
        plain = await ask(client, REFERENCE, messages=messages, temperature=0, max_tokens=120)
        drafted = await ask(client, DRAFTED, messages=messages, temperature=0, max_tokens=120)
        assert drafted["text"] == plain["text"]
        assert drafted["usage"] == plain["usage"]
        drafts = drafted["speculative"]
        kept, tried = kept + drafts["accepted"], tried + drafts["drafted"]
    # the noisy copy guesses SmolLM2's tokens: right often, and wrong often, which the target
    # must catch (the texts above are the proof that it did)
    assert 20 < kept < tried


async def test_concurrent_requests_on_a_draft_model_each_get_their_own_text(text):
    client, _ = text
    questions = [[{"role": "user", "content": f"Count from {n} to {n + 9}, in words."}] for n in (1, 40, 300)]
    texts = {}
    for model in (REFERENCE, DRAFTED):
        replies = await asyncio.gather(
            *(ask(client, model, messages=m, temperature=0, max_tokens=60) for m in questions)
        )
        texts[model] = [r["text"] for r in replies]
    assert texts[DRAFTED] == texts[REFERENCE]
    assert len(set(texts[DRAFTED])) == 3  # each its own


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("other-tokenizer", "another tokenizer"),
        ("no-such-draft", "not a text model of the catalog"),
        ("two-kinds", "two kinds of speculative decoding"),
    ],
)
async def test_a_draft_model_that_cannot_serve_is_refused_at_load(text, model, said):
    client, _ = text
    with pytest.raises(AllmError) as info:
        await ask(client, model, max_tokens=2)
    assert info.value.param == "options.draft"
    assert said in info.value.message
