"""The text manager on real models through the kernel: SmolLM2 for real output."""

from __future__ import annotations

import json
import math

import pytest
import pytest_asyncio

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError, Code
from tests.model_files import smollm2_path, truncated_copy, with_bytes, write_gguf, write_tiny_llama_gguf
from tests.waits import until, wait_idle

from .conftest import text_manager

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMOL = "smollm2"
BRIEF = {"role": "system", "content": "Answer in one short sentence."}
MIB = 1024 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def text(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    corrupt = truncated_copy(smollm2_path(), tmp / "cut.gguf", 30 * MIB)
    tiny = write_tiny_llama_gguf(tmp / "tiny.gguf")
    damaged = {
        "tiny-cut": truncated_copy(tiny, tmp / "tiny-cut.gguf", tiny.stat().st_size // 2),
        "tiny-v99": with_bytes(tiny, tmp / "tiny-v99.gguf", 4, (99).to_bytes(4, "little")),
        "tiny-not-gguf": with_bytes(tiny, tmp / "tiny-not.gguf", 0, b"GGML"),
        "frobnicator": write_gguf(tmp / "frob.gguf", arch="frobnicator"),
    }
    notes = tmp / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("no model here")
    settings = {
        "models": [
            {"id": SMOL, "path": str(smollm2_path()), "options": {"n_ctx": 2048}},
            {"id": "smol-small-ctx", "path": str(smollm2_path()), "options": {"n_ctx": 64}},
            {"id": "smol-huge-ctx", "path": str(smollm2_path()), "options": {"n_ctx": 131072}},
            {"id": "cut", "path": str(corrupt)},
            {"id": "not-a-model", "path": str(notes)},
            {"id": "smol-b", "path": str(smollm2_path()), "options": {"n_ctx": 2048}},
            {"id": "tiny", "path": str(tiny), "options": {"n_ctx": 256}},
            {"id": "tiny-gpu", "path": str(tiny), "options": {"n_ctx": 256, "n_gpu_layers": 99}},
            *({"id": key, "path": str(path)} for key, path in damaged.items()),
        ],
        "memory_budget_bytes": 800 * MIB,
    }
    async with text_manager(settings) as (client, supervisor):
        yield client, supervisor


async def chat(client: KernelClient, content: str, model: str = SMOL, **params):
    messages = [BRIEF, {"role": "user", "content": content}]
    return (await client.call("text", "chat", model=model, params={"messages": messages, **params})).data


async def test_smollm2_knows_the_capital_of_france(text):
    client, _ = text
    reply = await chat(client, "What is the capital of France?", temperature=0, max_tokens=30)
    assert "Paris" in reply["text"]
    assert reply["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens"] > 10
    assert 0 < reply["usage"]["completion_tokens"] <= 30


async def test_stream_chunks_add_up_to_the_result(text):
    client, _ = text
    params = {
        "messages": [{"role": "user", "content": "Tell me about cats."}],
        "temperature": 0,
        "max_tokens": 24,
    }
    async with client.stream("text", "chat", model=SMOL, params=params) as s:
        pieces = [chunk.data["text"] async for chunk in s]
    assert s.result is not None
    assert len(pieces) > 5  # token by token, not one buffered piece
    assert "".join(pieces) == s.result.data["text"]
    assert s.result.data["usage"]["completion_tokens"] == 24
    assert s.result.data["finish_reason"] == "length"


@pytest.mark.parametrize("limit", [1, 2, 5, 9])
async def test_max_tokens_is_a_hard_limit(text, limit):
    client, _ = text
    reply = await chat(client, "Write a long story about the sea.", temperature=1.0, max_tokens=limit, seed=3)
    assert reply["usage"]["completion_tokens"] == limit
    assert reply["finish_reason"] == "length"


async def test_stop_sequence_cuts_the_text_before_it(text):
    client, _ = text
    free = await chat(client, "List three fruits.", temperature=0, max_tokens=30)
    words = free["text"].split()
    assert len(words) > 3
    stop = words[2]
    cut = await chat(client, "List three fruits.", temperature=0, max_tokens=30, stop=[stop])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == free["text"][: free["text"].index(stop)]
    assert stop not in cut["text"]


async def test_same_seed_same_text_other_seed_other_text(text):
    client, _ = text
    runs = [
        await chat(client, "Invent a name for a dog.", temperature=1.5, max_tokens=16, seed=s)
        for s in (1, 1, 2)
    ]
    assert runs[0]["text"] == runs[1]["text"]
    assert runs[0]["text"] != runs[2]["text"]


async def test_completion_continues_a_prompt(text):
    client, _ = text
    reply = await client.call(
        "text",
        "complete",
        model=SMOL,
        params={"prompt": "The capital of France is", "temperature": 0, "max_tokens": 4},
    )
    assert "Paris" in reply.data["text"]
    assert reply.data["usage"]["prompt_tokens"] == 5


async def test_a_prompt_longer_than_the_context_is_refused_naming_both_lengths(text):
    client, _ = text
    with pytest.raises(AllmError) as info:
        await chat(client, "word " * 200, model="smol-small-ctx")
    assert info.value.code is Code.UNSUPPORTED
    assert info.value.reason == "context_length_exceeded"
    assert "context holds 64 tokens" in info.value.message
    assert "the prompt is 2" in info.value.message


async def test_json_schema_output_parses_against_the_schema(text):
    client, _ = text
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    reply = await chat(
        client,
        "Describe a person.",
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "schema": schema},
    )
    data = json.loads(reply["text"])
    assert set(data) == {"name", "age"}
    assert isinstance(data["name"], str)
    assert isinstance(data["age"], int)


async def test_a_required_tool_call_comes_back_structured(text):
    client, _ = text
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    reply = await chat(
        client,
        "What is the weather in Paris?",
        temperature=0,
        max_tokens=60,
        tools=[tool],
        tool_choice="required",
    )
    assert reply["finish_reason"] == "tool_calls"
    [call] = reply["tool_calls"]
    assert call["name"] == "get_weather"
    assert isinstance(json.loads(call["arguments"])["city"], str)


async def test_embeddings_are_unit_vectors_of_the_model_width(text):
    client, _ = text
    reply = await client.call(
        "text", "embed", model=SMOL, params={"input": ["a cat", "quantum chromodynamics"]}
    )
    first, second = reply.data["embeddings"]
    assert len(first) == len(second) == 576
    assert math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-3)
    assert first != second
    assert reply.data["usage"]["prompt_tokens"] >= 4


async def test_cancel_stops_generation_and_frees_the_manager(text):
    client, _ = text
    params = {
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        "max_tokens": 1500,
        "temperature": 0,
    }
    async with client.stream("text", "chat", model=SMOL, params=params) as s:
        async for _chunk in s:
            break
    await wait_idle(client)
    assert (
        "Paris"
        in (await chat(client, "What is the capital of France?", temperature=0, max_tokens=30))["text"]
    )


async def test_a_corrupt_model_is_model_corrupt_and_others_keep_serving(text):
    client, supervisor = text
    pid = supervisor.status()[0].pid
    with pytest.raises(AllmError) as info:
        await chat(client, "hi", model="cut")
    assert info.value.code is Code.MODEL_CORRUPT
    assert "truncated" in info.value.message
    with pytest.raises(AllmError) as info:
        await chat(client, "hi", model="not-a-model")
    assert info.value.code is Code.FORMAT_MISMATCH
    assert (await chat(client, "Say hi.", max_tokens=4))["usage"]["completion_tokens"] > 0
    assert supervisor.status()[0].pid == pid


async def test_a_model_that_cannot_fit_is_oom_ram_with_both_figures(text):
    client, _ = text
    with pytest.raises(AllmError) as info:
        await chat(client, "hi", model="smol-huge-ctx")
    assert info.value.code is Code.OOM_RAM
    assert "needs about" in info.value.message
    assert "budget of 800 MiB" in info.value.message


async def test_a_model_outside_the_catalog_is_refused(text):
    client, _ = text
    with pytest.raises(AllmError) as info:
        await chat(client, "hi", model="gpt-17")
    assert info.value.reason == "model_not_found"


async def loaded(client: KernelClient) -> set[str]:
    models = (await client.call("text", "models")).data["models"]
    return {m["id"] for m in models if m["state"] == "loaded"}


async def test_least_recently_used_model_is_unloaded_to_make_room(text):
    client, _ = text
    for model in await loaded(client):
        await client.call("text", "unload", model=model)
    await chat(client, "hi", max_tokens=2)
    await chat(client, "hi", model="smol-small-ctx", max_tokens=2)
    # Both fit the 800 MiB budget together (about 550 + 200 MiB: at n_ctx 2048 the first holds
    # four sequences' caches and as much again for saved prefixes) ...
    assert await loaded(client) == {SMOL, "smol-small-ctx"}
    await chat(client, "hi", model="smol-small-ctx", max_tokens=2)
    # ... a third model would not: the least recently used one makes room.
    await chat(client, "hi", model="smol-b", max_tokens=2)
    assert await loaded(client) == {"smol-small-ctx", "smol-b"}


async def test_a_tiny_written_gguf_chats_through_its_own_template(text):
    client, _ = text
    params = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 7}
    async with client.stream("text", "chat", model="tiny", params=params) as s:
        pieces = [chunk.data["text"] async for chunk in s]
    assert s.result is not None
    # 13 prompt tokens: <|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n, by the template
    assert s.result.data["usage"] == {"prompt_tokens": 13, "completion_tokens": 7, "reasoning_tokens": 0}
    assert "".join(pieces) == s.result.data["text"]


@pytest.mark.parametrize(
    ("model", "code", "needle"),
    [
        ("tiny-cut", Code.MODEL_CORRUPT, "truncated"),
        ("tiny-v99", Code.UNSUPPORTED, "GGUF version 99"),
        ("tiny-not-gguf", Code.FORMAT_MISMATCH, "not a GGUF file"),
        ("frobnicator", Code.UNSUPPORTED, "'frobnicator'"),
    ],
)
async def test_damaged_tiny_ggufs_get_their_own_codes_and_the_manager_serves_on(text, model, code, needle):
    client, supervisor = text
    pid = supervisor.status()[0].pid
    with pytest.raises(AllmError) as info:
        await chat(client, "hi", model=model)
    assert info.value.code is code
    assert needle in info.value.message
    assert (await chat(client, "hi", model="tiny", max_tokens=2))["usage"]["completion_tokens"] == 2
    assert supervisor.status()[0].pid == pid


async def test_idle_models_are_unloaded_after_the_configured_time(tmp_path):
    tiny = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    settings = {
        "models": [{"id": "tiny", "path": str(tiny), "options": {"n_ctx": 128}}],
        "idle_unload_s": 0.3,
    }
    async with text_manager(settings) as (client, _supervisor):
        await client.call("text", "load", model="tiny")
        assert await loaded(client) == {"tiny"}

        async def nothing_loaded() -> bool:
            return not await loaded(client)

        await until(nothing_loaded, 30, "the idle model to be unloaded")
        # and it comes back on demand
        await client.call(
            "text", "chat", model="tiny", params={"messages": [{"role": "user", "content": "x"}]}
        )
        assert await loaded(client) == {"tiny"}


async def test_gpu_layers_on_a_build_without_gpu_offload_are_refused_by_name(text):
    client, _ = text
    with pytest.raises(AllmError) as info:
        await chat(client, "hi", model="tiny-gpu")
    assert info.value.code is Code.UNSUPPORTED
    assert info.value.param == "n_gpu_layers"
    assert "no GPU offload" in info.value.message


async def test_the_embedding_context_takes_its_share_of_the_budget():
    # SmolLM2 at n_ctx 2048 and one sequence is estimated at ~285 MiB (its cache, and as much
    # again for saved prefixes); its embedding context at ~140 MiB more (each further sequence
    # adds its own cache and prefix room: n_parallel 1 keeps the sums).
    settings = {
        "models": [{"id": SMOL, "path": str(smollm2_path()), "options": {"n_ctx": 2048, "n_parallel": 1}}],
        "memory_budget_bytes": 350 * MIB,
    }
    async with text_manager(settings) as (client, _):
        reply = await chat(client, "Hi", max_tokens=2)
        assert reply["usage"]["completion_tokens"] >= 1
        with pytest.raises(AllmError) as info:
            await client.call("text", "embed", model=SMOL, params={"input": "hello"})
        assert info.value.code is Code.OOM_RAM
        assert f"the embedding context of {SMOL} needs about" in info.value.message
        assert "text memory budget 350 MiB" in info.value.message
        # The model itself stays loaded and serving.
        assert (await chat(client, "Hi", max_tokens=2))["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("op", "params", "param"), [("complete", "prompt", "prompt"), ("embed", "input", "input")]
)
async def test_text_the_tokenizer_drops_entirely_is_refused_before_llama_cpp(text, op, params, param):
    client, supervisor = text
    pid = supervisor.pid_of("text#0")
    with pytest.raises(AllmError) as info:
        await client.call("text", op, model=SMOL, params={params: "\x04\x06\x13"})
    assert info.value.code is Code.UNSUPPORTED
    assert info.value.reason == "invalid_request"
    assert info.value.param == param
    assert (await chat(client, "Hi", max_tokens=2))["usage"]["completion_tokens"] >= 1
    assert supervisor.pid_of("text#0") == pid
