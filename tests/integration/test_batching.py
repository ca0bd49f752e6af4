"""Continuous batching of GGUF models: concurrent requests share one context, each keeps its own.

The real text manager with SmolLM2 and four slots, through the real kernel.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import pytest_asyncio

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError, Code
from tests.model_files import smollm2_path
from tests.waits import until

from .conftest import text_manager

SMOL = "smollm2"
SLOTS = 4
SYSTEM = {"role": "system", "content": "You are a patient teacher who answers in full sentences. " * 8}
PROMPTS = [
    "Write a long essay about rivers.",
    "Describe a mountain village at dawn.",
    "Explain how bread is made, step by step.",
    "Tell the story of a lighthouse keeper.",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def text():
    settings = {"models": [{"id": SMOL, "path": str(smollm2_path()), "options": {"n_parallel": SLOTS}}]}
    async with text_manager(settings, slots=SLOTS) as pair:
        yield pair


async def chat(client: KernelClient, content: str, **params):
    messages = [SYSTEM, {"role": "user", "content": content}]
    return (await client.call("text", "chat", model=SMOL, params={"messages": messages, **params})).data


def state(client: KernelClient) -> tuple[int, int]:
    """(running, in line), as the manager's latest heartbeat says."""
    [view] = client.instances()
    return (view.heartbeat.active, view.heartbeat.queued) if view.heartbeat else (0, 0)


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_concurrent_requests_run_together_and_each_gets_its_own_greedy_text(text):
    client, _ = text
    alone = [await chat(client, p, temperature=0, max_tokens=40) for p in PROMPTS]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, state(client)[0])
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*(chat(client, p, temperature=0, max_tokens=40) for p in PROMPTS))
    watcher.cancel()
    assert peak == SLOTS  # all four were running at once
    # Each answered its own prompt (batched arithmetic rounds differently: greedy text may
    # part from the lone run after a while; seeded requests are the ones that reproduce).
    for reply, lone, word in zip(together, alone, ("river", "village", "bread", "lighthouse"), strict=True):
        assert word in reply["text"].lower(), reply["text"]
        assert reply["usage"] == lone["usage"]
    [view] = client.instances()
    assert view.heartbeat is not None
    assert view.heartbeat.capacity == SLOTS + 8  # the slots, then the queue


async def test_a_shared_prefix_is_not_computed_again_and_usage_says_so(text):
    client, _ = text
    first = await chat(client, "Name a colour.", temperature=0, max_tokens=5)
    second = await chat(client, "Name a fruit.", temperature=0, max_tokens=5)
    # the system prompt and the chat template's start, at least
    assert second["cached_tokens"] >= 60
    assert second["cached_tokens"] < second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
    # the same request again: all but its last prompt token come from the cache
    again = await chat(client, "Name a fruit.", temperature=0, max_tokens=5)
    assert again["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["text"] == second["text"]


async def test_a_seeded_request_gives_the_same_text_alone_in_a_batch_and_from_the_cache(text):
    client, _ = text
    params = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 48}
    alone = await chat(client, "Invent a name for a ship.", **params)
    others = [chat(client, p, temperature=0.8, max_tokens=60) for p in PROMPTS[:3]]
    batched, *_ = await asyncio.gather(chat(client, "Invent a name for a ship.", **params), *others)
    cached = await chat(client, "Invent a name for a ship.", **params)
    assert cached["cached_tokens"] > 0
    assert batched["text"] == alone["text"]
    assert cached["text"] == alone["text"]
    different = await chat(client, "Invent a name for a ship.", **{**params, "seed": 99})
    assert different["text"] != alone["text"]  # the seed does choose


async def test_a_seeded_request_reuses_only_a_prefix_a_seeded_request_computed(text):
    """A batched request's cache differs from a cold start's in the last bits: a seeded request
    that reused it could part from its own lone text (it did, one run in seven)."""
    client, _ = text
    # a system prompt of its own: no earlier request of this module computed its start
    messages = [{"role": "system", "content": "You name trees and nothing else. " * 12}]
    messages.append({"role": "user", "content": "Name a tree."})

    async def ask(**params):
        reply = await client.call("text", "chat", model=SMOL, params={"messages": messages, **params})
        return reply.data

    params = {"temperature": 1.0, "seed": 7, "max_tokens": 4}
    plain = await ask(temperature=0, max_tokens=4)
    assert plain["usage"]["prompt_tokens"] > 64  # the system prompt alone fills a chunk
    first = await ask(**params)
    assert first["cached_tokens"] == 0  # the same prompt was cached, but by a plain request
    again = await ask(**params)
    assert again["cached_tokens"] > 0
    assert again["cached_tokens"] % 64 == 0
    assert again["text"] == first["text"]


async def test_a_cancelled_stream_frees_its_sequence_for_a_waiting_request(text):
    client, _ = text
    long = {"temperature": 0, "max_tokens": 300}
    streams = [
        client.stream(
            "text", "chat", model=SMOL, params={"messages": [{"role": "user", "content": p}], **long}
        )
        for p in PROMPTS
    ]
    opened = [await s.__aenter__() for s in streams]
    for s in opened:
        await anext(aiter(s))  # each is generating
    waiting = asyncio.create_task(chat(client, "Say hi.", temperature=0, max_tokens=3))
    # Four sequences, four streams: it waits in line.
    await until(lambda: state(client) == (SLOTS, 1), 30, "four running and one in line")
    assert not waiting.done()
    await opened[0].aclose()
    reply = await asyncio.wait_for(waiting, 30)  # it took the freed sequence
    assert reply["usage"]["completion_tokens"] >= 1
    for s in opened[1:]:
        await s.aclose()


async def test_the_hard_token_limit_holds_for_every_sequence_of_a_batch(text):
    client, _ = text
    limits = [1, 7, 13, 29]
    replies = await asyncio.gather(
        *(chat(client, p, temperature=0, max_tokens=n) for p, n in zip(PROMPTS, limits, strict=True))
    )
    assert [r["usage"]["completion_tokens"] for r in replies] == limits


async def test_a_manager_killed_mid_batch_gives_every_sequence_its_coded_error():
    settings = {"models": [{"id": SMOL, "path": str(smollm2_path()), "options": {"n_parallel": SLOTS}}]}
    async with text_manager(settings, slots=SLOTS) as (client, supervisor):
        params = {"temperature": 0, "max_tokens": 300}

        async def one(p: str):
            async with client.stream(
                "text", "chat", model=SMOL, params={"messages": [{"role": "user", "content": p}], **params}
            ) as s:
                async for _ in s:
                    pass

        tasks = [asyncio.create_task(one(p)) for p in PROMPTS]
        await until(lambda: state(client)[0] == SLOTS, 30, "every sequence to run")
        os.kill(supervisor.pid_of("text#0"), signal.SIGKILL)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, AllmError) for o in outcomes), outcomes
        assert {o.code for o in outcomes} == {Code.INTERNAL}
        assert all("SIGKILL" in o.message for o in outcomes)
