"""Saved prefixes: a conversation's start is computed once, whatever sequence serves it next.

The real text manager with SmolLM2 on two sequences, through the real kernel: more
conversations than sequences, so a conversation's sequence is another's by its next turn.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError
from tests.model_files import smollm2_path, write_tiny_llama_gguf
from tests.waits import until

from .conftest import text_manager

SMOL = "smollm2"
SMALL_CACHE = "smollm2-small-cache"
QUANT_KV = "smollm2-q8-kv"
SLOTS = 2
MIB = 2**20


def system(topic: str) -> dict[str, str]:
    """A system prompt of its own for each conversation: about 250 tokens."""
    return {"role": "system", "content": f"You are an expert on {topic}. Answer briefly and plainly. " * 20}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def text(tmp_path_factory):
    tiny = write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    path = str(smollm2_path())
    settings = {
        "models": [
            {"id": SMOL, "path": path, "options": {"n_parallel": SLOTS, "n_ctx": 2048}},
            # room for one saved conversation of ~260 tokens (about 23 KB a token), not two
            {"id": SMALL_CACHE, "path": path,
             "options": {"n_parallel": 1, "n_ctx": 1024, "prefix_cache_mib": 8}},
            {"id": QUANT_KV, "path": path,
             "options": {"n_parallel": 1, "n_ctx": 1024, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}},
            {"id": "f16-kv", "path": path, "options": {"n_parallel": 1, "n_ctx": 1024}},
            {"id": "bad-kv", "path": path, "options": {"cache_type_k": "q3_k"}},
            {"id": "tiny-q-kv", "path": str(tiny), "options": {"n_ctx": 256, "cache_type_v": "q4_0"}},
        ]
    }  # fmt: skip
    async with text_manager(settings, slots=SLOTS) as pair:
        yield pair


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def ask(client: KernelClient, messages: list[dict[str, str]], model: str = SMOL, **params: Any):
    reply = await client.call("text", "chat", model=model, params={"messages": messages, **params})
    return reply.data


async def cache_status(client: KernelClient, model: str, **at_least: int) -> dict[str, int]:
    """The model's prefix cache as a heartbeat shows it, once its counters reach ``at_least``."""

    def seen() -> dict[str, int] | None:
        [view] = client.instances()
        stats = (view.heartbeat.extra.get("model_stats") or {}) if view.heartbeat else {}
        status = stats.get(model, {}).get("prefix_cache")
        if status and all(status[k] >= v for k, v in at_least.items()):
            return dict(status)
        return None

    return await until(seen, timeout_s=30, what=f"{model}'s prefix cache reaching {at_least}")


async def fill_every_sequence(client: KernelClient, model: str = SMOL, slots: int = SLOTS) -> None:
    """Other conversations, one after another, each taking a sequence with a start of its own."""
    for topic in ("volcanoes", "violins", "glaciers")[: slots + 1]:
        await ask(client, [system(topic), {"role": "user", "content": "Say hi."}], model, max_tokens=2)


async def test_a_later_turn_restores_its_prefix_after_others_used_every_sequence(text):
    client, _ = text
    first_turn = [system("lighthouses"), {"role": "user", "content": "What does a lighthouse do?"}]
    first = await ask(client, first_turn, temperature=0, max_tokens=12)
    before = await cache_status(client, SMOL)
    await fill_every_sequence(client)
    later = [*first_turn, {"role": "assistant", "content": first["text"]},
             {"role": "user", "content": "And who keeps it?"}]  # fmt: skip
    second = await ask(client, later, temperature=0, max_tokens=4)
    # the whole first prompt came back from host memory, not from a sequence that kept it
    assert second["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert second["cached_tokens"] < second["usage"]["prompt_tokens"]
    after = await cache_status(client, SMOL, restores=before["restores"] + 1)
    assert after["restored_tokens"] - before["restored_tokens"] >= second["cached_tokens"]
    assert 0 < after["bytes"] <= after["limit_bytes"]


async def test_a_restored_prefix_gives_the_same_seeded_text_as_a_fresh_one(text):
    client, _ = text
    messages = [system("ships"), {"role": "user", "content": "Invent a name for a ship."}]
    params = {"temperature": 1.0, "top_p": 0.95, "seed": 4321, "max_tokens": 24}
    fresh = await ask(client, messages, **params)
    assert fresh["cached_tokens"] == 0  # nobody computed this start before
    restores = (await cache_status(client, SMOL))["restores"]
    await fill_every_sequence(client)
    restored = await ask(client, messages, **params)
    await cache_status(client, SMOL, restores=restores + 1)
    assert restored["cached_tokens"] >= 128  # whole aligned chunks of the seeded cold start
    assert restored["cached_tokens"] % 64 == 0
    assert restored["text"] == fresh["text"]


async def test_the_prefix_cache_stays_within_its_bound(text):
    client, _ = text
    for topic in ("rivers", "deserts", "comets", "bridges"):  # each saved over the one before
        await ask(client, [system(topic), {"role": "user", "content": "Say hi."}], SMALL_CACHE, max_tokens=2)
    status = await cache_status(client, SMALL_CACHE, saves=3)
    assert status["limit_bytes"] == 8 * MIB
    assert 0 < status["bytes"] <= 8 * MIB
    assert status["evictions"] >= 2  # one conversation fits, so each newer one put out the last
    assert status["entries"] == 1


async def test_a_conversation_comes_back_from_a_cache_with_room_for_one(text):
    """Restoring a saved conversation into the only sequence first saves the one it holds,
    which puts the restored one out of the cache: the restore still serves (it once killed
    the batch thread with a KeyError, and every later request hung)."""
    client, _ = text
    first_turn = [system("tides"), {"role": "user", "content": "Say hi."}]
    first = await ask(client, first_turn, SMALL_CACHE, temperature=0, max_tokens=2)
    await ask(client, [system("clouds"), {"role": "user", "content": "Say hi."}], SMALL_CACHE, max_tokens=2)
    again = await ask(client, first_turn, SMALL_CACHE, temperature=0, max_tokens=2)
    assert again["cached_tokens"] == first["usage"]["prompt_tokens"] - 1
    status = await cache_status(client, SMALL_CACHE, restores=1)
    assert status["entries"] == 1  # the clouds, saved over the tides
    # the engine goes on serving; the same prompt from the sequence that holds it now reads the
    # same numbers as from the restored copy (the first turn's last token was computed in one
    # batch with the rest of its prompt: its logits differ in the last bits, its text may too)
    held = await ask(client, first_turn, SMALL_CACHE, temperature=0, max_tokens=2)
    assert held["cached_tokens"] == again["cached_tokens"]
    assert held["text"] == again["text"]


async def test_a_quantized_key_value_cache_answers_in_less_memory(text):
    client, _ = text
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    quantized = await ask(client, messages, QUANT_KV, temperature=0, max_tokens=12)
    plain = await ask(client, messages, "f16-kv", temperature=0, max_tokens=12)
    assert "Paris" in quantized["text"]
    assert "Paris" in plain["text"]

    def held() -> dict[str, int] | None:  # a heartbeat after both loads
        [view] = client.instances()
        stats = view.heartbeat.extra.get("model_stats", {}) if view.heartbeat else {}
        memory = {m: (stats.get(m) or {}).get("memory_bytes") for m in (QUANT_KV, "f16-kv")}
        return memory if all(memory.values()) else None

    memory = await until(held, timeout_s=30, what="a heartbeat with both models loaded")
    # q8_0 keeps 32 values in 34 bytes instead of 64: the cache and the saved prefixes shrink
    assert memory[QUANT_KV] < memory["f16-kv"]


async def test_a_cache_type_llama_cpp_cannot_take_is_a_clear_error(text):
    client, _ = text
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(AllmError) as info:
        await ask(client, messages, "bad-kv", max_tokens=2)
    assert info.value.param == "options.cache_type_k"
    assert "q8_0" in info.value.message
    assert "q3_k" in info.value.message
    with pytest.raises(AllmError) as info:
        await ask(client, messages, "tiny-q-kv", max_tokens=2)
    assert info.value.param == "options.cache_type_v"
    assert "multiple of 32" in info.value.message
