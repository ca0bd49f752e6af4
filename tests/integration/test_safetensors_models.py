"""Safetensors directories through the text manager, on both backends, every architecture.

The models are tiny random-weight HF directories the fixtures write (weights
with transformers or mlx, a byte-level BPE tokenizer trained here, offline).
Random weights speak nonsense, but greedy decoding in float32 must give the
same nonsense on mlx-lm and on transformers + torch.
"""

from __future__ import annotations

import json

import pytest
import pytest_asyncio

from allm.kernel.codes import AllmError, Code
from tests.model_files import SAFETENSORS_ARCHITECTURES, write_hf_model

from .conftest import text_manager

pytestmark = pytest.mark.asyncio(loop_scope="module")

BACKENDS = ("transformers", "mlx")
RUNS_ON = {arch: BACKENDS for arch in SAFETENSORS_ARCHITECTURES} | {"qwen": ("mlx",)}
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: write_hf_model(root / arch, arch) for arch in SAFETENSORS_ARCHITECTURES}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def text(model_dirs):
    models = [
        {"id": f"{arch}-{backend}", "path": str(path), "options": {"backend": backend}}
        for arch, path in model_dirs.items()
        for backend in BACKENDS
    ]
    models.append({"id": "no-such-dir", "path": str(model_dirs["llama"].parent / "missing")})
    async with text_manager({"models": models, "memory_budget_bytes": None}) as (client, _supervisor):
        yield client


async def greedy(client, model, max_tokens=10):
    params = {"messages": HELLO, "temperature": 0, "max_tokens": max_tokens}
    return (await client.call("text", "chat", model=model, params=params, timeout_s=120)).data


@pytest.mark.parametrize("arch", [a for a in SAFETENSORS_ARCHITECTURES if a != "qwen"])
async def test_both_backends_load_and_give_the_same_greedy_text(text, arch):
    torch_reply = await greedy(text, f"{arch}-transformers")
    mlx_reply = await greedy(text, f"{arch}-mlx")
    for reply in (torch_reply, mlx_reply):
        assert reply["usage"]["prompt_tokens"] > 5
        assert reply["usage"]["completion_tokens"] > 0
        assert reply["finish_reason"] in ("stop", "length")
    if arch == "gpt_oss_mxfp4":
        # transformers de-quantises MXFP4 to bf16 on the CPU; mlx-lm computes in MXFP4:
        # rounding may part them after a few tokens.
        first = await greedy(text, f"{arch}-transformers", 3), await greedy(text, f"{arch}-mlx", 3)
        assert first[0]["text"] == first[1]["text"]
    else:
        assert torch_reply["text"] == mlx_reply["text"]
        assert torch_reply["usage"] == mlx_reply["usage"]


async def test_the_original_qwen_runs_on_mlx_and_is_refused_by_transformers(text):
    reply = await greedy(text, "qwen-mlx")
    assert reply["usage"]["completion_tokens"] > 0
    with pytest.raises(AllmError) as info:
        await greedy(text, "qwen-transformers")
    assert info.value.code is Code.UNSUPPORTED
    assert "'qwen'" in info.value.message


@pytest.mark.parametrize("backend", BACKENDS)
async def test_streaming_sends_the_text_piece_by_piece(text, backend):
    params = {"messages": HELLO, "temperature": 0, "max_tokens": 12}
    async with text.stream("text", "chat", model=f"llama-{backend}", params=params) as s:
        pieces = [chunk.data["text"] async for chunk in s]
    assert s.result is not None
    assert "".join(pieces) == s.result.data["text"]
    assert len(pieces) > 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_max_tokens_seed_and_completion(text, backend):
    model = f"qwen2-{backend}"
    params = {"messages": HELLO, "temperature": 1.0, "max_tokens": 5, "seed": 11}
    one = (await text.call("text", "chat", model=model, params=params)).data
    two = (await text.call("text", "chat", model=model, params=params)).data
    assert one["text"] == two["text"]
    assert one["usage"]["completion_tokens"] <= 5
    done = await text.call("text", "complete", model=model, params={"prompt": "The capital", "max_tokens": 3})
    assert done.data["usage"]["completion_tokens"] <= 3


async def test_a_path_that_does_not_exist_is_load_failed_not_a_hub_lookup(text):
    with pytest.raises(AllmError) as info:
        await greedy(text, "no-such-dir")
    assert info.value.code is Code.LOAD_FAILED
    assert "not found" in info.value.message


async def test_json_output_follows_its_schema_on_both_backends(text):
    # llguidance holds each backend to the grammar the GGUF engine uses (guided.py).
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    params = {
        "messages": HELLO,
        "temperature": 0,
        "max_tokens": 80,
        "response_format": {"type": "json_schema", "schema": schema},
    }
    replies = [
        (await text.call("text", "chat", model=f"llama-{backend}", params=params, timeout_s=120)).data
        for backend in BACKENDS
    ]
    assert replies[0]["text"] == replies[1]["text"]
    value = json.loads(replies[0]["text"])
    assert set(value) == {"city", "days"}
    assert value["city"] in ("Paris", "Rome")


async def test_the_tiny_directories_are_what_the_release_layouts_look_like(model_dirs):
    mxfp4 = json.loads((model_dirs["gpt_oss_mxfp4"] / "config.json").read_text())
    assert mxfp4["quantization_config"]["quant_method"] == "mxfp4"
    bf16 = json.loads((model_dirs["gpt_oss"] / "config.json").read_text())
    assert "quantization_config" not in bf16
    assert json.loads((model_dirs["qwen"] / "config.json").read_text())["model_type"] == "qwen"
