"""Speculative decoding by n-gram lookup: the same greedy text, sooner where it repeats itself.

The real text manager with SmolLM2 twice, once with ``speculative = "ngram"``, through the
real kernel.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError
from tests.model_files import smollm2_path
from tests.waits import until

from .conftest import text_manager

PLAIN = "smollm2"
NGRAM = "smollm2-ngram"
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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def text():
    path = str(smollm2_path())
    settings = {
        "models": [
            {"id": PLAIN, "path": path, "options": {"n_parallel": 2, "n_ctx": 1024}},
            {"id": NGRAM, "path": path, "options": {"n_parallel": 2, "n_ctx": 1024, "speculative": "ngram"}},
            {"id": "bad", "path": path, "options": {"speculative": "medusa"}},
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


async def test_streamed_tokens_are_the_same_as_without_drafts(text):
    client, _ = text
    params = {"messages": REWRITE, "temperature": 0, "max_tokens": 80}
    pieces: dict[str, list[str]] = {}
    for model in (PLAIN, NGRAM):
        async with client.stream("text", "chat", model=model, params=params) as s:
            pieces[model] = [chunk.data.get("text", "") async for chunk in s]
    assert "".join(pieces[NGRAM]) == "".join(pieces[PLAIN])
    assert len(pieces[NGRAM]) > 1  # streamed, not one lump


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
