"""The onnx backend: safetensors directories converted by ONNX Runtime GenAI's model builder.

The tiny random-weight HF directories of tests/model_files.py, through the real text
manager under the real supervisor, on the CPU (the only execution provider here).
In float32, greedy decoding must give the same nonsense as transformers + torch on the
same weights; the conversion runs once per source and precision, in the manager; the
builder is stopped with the request that started it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal

import psutil
import pytest
import pytest_asyncio

from allm.kernel.codes import AllmError, Code
from allm.managers.text.onnx_engine import GENAI_CONFIG, POLL_S, cache_name, convert
from allm.managers.text.options import OnnxOptions
from allm.managers.text.safetensors_engine import check_directory
from tests.model_files import write_hf_model
from tests.waits import until, wait_idle

from .conftest import text_manager

pytestmark = pytest.mark.asyncio(loop_scope="module")

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "gemma")
HELLO = [{"role": "user", "content": "hello there"}]
EOS = 2  # <|im_end|> in the fixtures' tokenizer
LOAD_STALL_S = 30.0  # longer than importing torch and transformers in the manager (~3 s here)
BUILDER = "onnxruntime_genai.models.builder"


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    made = {arch: write_hf_model(root / arch, arch) for arch in (*ARCHITECTURES, "phi")}
    made["qwen2.5"] = write_hf_model(root / "qwen2.5", "qwen2", template="qwen2.5")  # hermes tool calls
    _edit_config(made["qwen2.5"], max_position_embeddings=2048)  # its tool prompt is long in 384 tokens
    # transformers writes original_max_position_embeddings = 4096 beside our 512, which the
    # builder takes for Phi-3's LongRoPE variant (and asks for its rope_scaling factors);
    # real Phi-3 4k checkpoints have both at 4096. transformers computes the same either way.
    _edit_config(made["phi3"], original_max_position_embeddings=512)
    for name in ("made-up", "damaged", "timeout", "cancel", "sigkill"):
        made[name] = root / name
        shutil.copytree(made["llama"], made[name])
    _edit_config(made["made-up"], architectures=["LlamaForMadeUpLM"])
    weights = made["damaged"] / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    made["genai"] = root / "genai-copy"  # a converted model copied out of the cache (see below)
    return made


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _onnx(path, **options):
    return {"path": str(path), "options": {"backend": "onnx", **options}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def text(dirs, cache):
    models = []
    for arch in ARCHITECTURES:
        models.append(
            {"id": f"{arch}-transformers", "path": str(dirs[arch]), "options": {"backend": "transformers"}}
        )
        models.append({"id": f"{arch}-onnx", **_onnx(dirs[arch])})  # fp32: the default on the CPU
    models += [
        {"id": "llama-fp32", **_onnx(dirs["llama"], precision="fp32", execution_provider="cpu")},
        {"id": "llama-int4", **_onnx(dirs["llama"], precision="int4")},
        {"id": "genai", "path": str(dirs["genai"]), "options": {}},  # detected, not registered
        {"id": "qwen2.5-onnx", **_onnx(dirs["qwen2.5"])},
        {"id": "qwen2.5-transformers", "path": str(dirs["qwen2.5"]), "options": {"backend": "transformers"}},
        {"id": "made-up", **_onnx(dirs["made-up"])},
        {"id": "phi-onnx", **_onnx(dirs["phi"])},
        {"id": "damaged", **_onnx(dirs["damaged"])},
        {"id": "timeout", **_onnx(dirs["timeout"])},
        {"id": "cancel", **_onnx(dirs["cancel"])},
        {"id": "sigkill", **_onnx(dirs["sigkill"])},
        {"id": "bad-provider", **_onnx(dirs["llama"], execution_provider="tpu")},
        {"id": "bad-precision", **_onnx(dirs["llama"], precision="int3")},
        {"id": "bad-pair", **_onnx(dirs["llama"], precision="fp16", execution_provider="cpu")},
        {"id": "no-cuda", **_onnx(dirs["llama"], precision="fp16", execution_provider="cuda")},
        {"id": "dtype-on-onnx", **_onnx(dirs["llama"], dtype="float16")},
        {
            "id": "precision-elsewhere",
            "path": str(dirs["llama"]),
            "options": {"backend": "transformers", "precision": "int4"},
        },
    ]
    settings = {
        "models": models,
        "memory_budget_bytes": None,
        "cache_dir": str(cache),
        "load_stall_s": LOAD_STALL_S,
    }
    async with text_manager(settings) as pair:
        yield pair


async def greedy(client, model, max_tokens=12, op="chat"):
    params = {"temperature": 0, "max_tokens": max_tokens}
    params |= {"messages": HELLO} if op == "chat" else {"prompt": "The capital of France"}
    return (await client.call("text", op, model=model, params=params, timeout_s=120)).data


def converted(cache) -> list[str]:
    return sorted(p.name for p in (cache / "onnx").iterdir() if not p.name.startswith("."))


def builders_running(path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(BUILDER in part for part in cmdline) and str(path) in cmdline:
            found.append(proc)
    return found


async def _fails(client, model, timeout_s=120.0, **params) -> AllmError:
    with pytest.raises(AllmError) as info:
        await client.call(
            "text", "chat", model=model, params={"messages": HELLO, **params}, timeout_s=timeout_s
        )
    return info.value


@pytest.mark.parametrize("arch", ARCHITECTURES)
async def test_fp32_onnx_gives_the_greedy_text_of_transformers(text, arch):
    client, supervisor = text
    restarts = supervisor.status()[0].restarts
    torch_reply = await greedy(client, f"{arch}-transformers")
    loading: list[dict] = []
    answer = asyncio.create_task(greedy(client, f"{arch}-onnx"))
    while not answer.done():  # the first load converts: /status shows it, the watchdog lets it run
        hb = next(v.heartbeat for v in client.instances())
        if hb is not None and f"{arch}-onnx" in hb.extra.get("loading", {}):
            loading.append(hb.extra["loading"][f"{arch}-onnx"])
        await asyncio.sleep(0.05)
    onnx_reply = await answer
    assert onnx_reply["usage"]["prompt_tokens"] > 5
    assert onnx_reply["usage"]["completion_tokens"] > 0
    assert onnx_reply["text"] == torch_reply["text"]
    assert onnx_reply["usage"] == torch_reply["usage"]
    assert onnx_reply["finish_reason"] == torch_reply["finish_reason"]
    assert supervisor.status()[0].restarts == restarts  # the conversion was never taken for a hang
    fractions = [r["fraction"] for r in loading if r["fraction"] is not None]
    assert fractions == sorted(fractions)
    assert fractions[-1] > 0.5


async def test_completion_and_seeded_sampling_match_transformers(text):
    client, _ = text
    onnx = await greedy(client, "llama-onnx", op="complete")
    torch = await greedy(client, "llama-transformers", op="complete")
    assert (onnx["text"], onnx["usage"]) == (torch["text"], torch["usage"])
    params = {"messages": HELLO, "temperature": 1.0, "max_tokens": 10, "seed": 7}
    runs = [(await client.call("text", "chat", model=m, params=params)).data for m in ("llama-onnx",) * 2]
    assert runs[0]["text"] == runs[1]["text"]
    torch_run = (await client.call("text", "chat", model="llama-transformers", params=params)).data
    assert runs[0]["text"] == torch_run["text"]


async def test_logprobs_are_the_models_own(text):
    client, _ = text
    params = {"messages": HELLO, "temperature": 0, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    onnx = (await client.call("text", "chat", model="llama-onnx", params=params)).data["logprobs"]
    torch = (await client.call("text", "chat", model="llama-transformers", params=params)).data["logprobs"]
    assert [e["token"] for e in onnx] == [e["token"] for e in torch]
    assert [e["logprob"] for e in onnx] == pytest.approx([e["logprob"] for e in torch], abs=1e-3)


async def test_the_conversion_is_cached_and_a_new_precision_gets_its_own(text, dirs, cache):
    client, _ = text
    await greedy(client, "llama-onnx")
    name = cache_name(check_directory(dirs["llama"]), OnnxOptions("cpu", "fp32", 1))
    config = cache / "onnx" / name / GENAI_CONFIG
    made = config.stat().st_mtime_ns
    before = converted(cache)
    first = await greedy(client, "llama-onnx")
    assert (await client.call("text", "unload", model="llama-onnx")).data == {"unloaded": True}
    again = await greedy(client, "llama-onnx")  # loads again: from the cache, no builder
    assert again == first
    spelled_out = await greedy(client, "llama-fp32")  # the defaults spelled out: the same copy
    assert spelled_out == {**first, "model": "llama-fp32"}
    assert config.stat().st_mtime_ns == made
    assert converted(cache) == before
    int4 = await greedy(client, "llama-int4")
    assert int4["usage"]["completion_tokens"] > 0
    after = converted(cache)
    assert len(after) == len(before) + 1
    (new,) = set(after) - set(before)
    assert "-int4-cpu-" in new
    assert not list((cache / "onnx").glob(".*.tmp"))  # no temporary directory left behind


async def test_a_converted_directory_is_served_as_it_is(text, dirs, cache):
    client, _ = text
    first = await greedy(client, "llama-onnx")
    name = cache_name(check_directory(dirs["llama"]), OnnxOptions("cpu", "fp32", 1))
    shutil.copytree(cache / "onnx" / name, dirs["genai"])
    before = converted(cache)
    reply = await greedy(client, "genai")
    assert reply == {**first, "model": "genai"}
    assert converted(cache) == before


async def test_a_damaged_source_is_model_corrupt_before_any_conversion(text, dirs, cache):
    client, _ = text
    err = await _fails(client, "damaged")
    assert err.code is Code.MODEL_CORRUPT
    assert "model.safetensors" in err.message
    assert not [n for n in converted(cache) if n.startswith("damaged-")]


async def test_an_architecture_the_builder_refuses_is_unsupported_and_named(text, cache):
    client, _ = text
    err = await _fails(client, "made-up")
    assert err.code is Code.UNSUPPORTED
    assert "'LlamaForMadeUpLM'" in err.message
    assert "model builder" in err.message
    assert not [n for n in converted(cache) if n.startswith("made-up-")]
    assert not list((cache / "onnx").glob(".*.tmp"))


async def test_a_model_onnx_runtime_cannot_run_fails_its_load_by_name(text):
    """The tiny phi (head size 16, half of it rotary) converts, but ONNX Runtime's attention
    refuses a rotary cache 4 wide (it wants a multiple of 8): the load's probe token says so."""
    client, _ = text
    err = await _fails(client, "phi-onnx")
    assert err.code is Code.LOAD_FAILED
    assert "GroupQueryAttention" in err.message
    assert "cos_cache" in err.message


@pytest.mark.parametrize(
    ("model", "code", "param", "needle"),
    [
        ("bad-provider", Code.LOAD_FAILED, "options.execution_provider", "'tpu'"),
        ("bad-precision", Code.LOAD_FAILED, "options.precision", "'int3'"),
        ("bad-pair", Code.LOAD_FAILED, "options.precision", "fp16"),
        ("no-cuda", Code.UNSUPPORTED, "options.execution_provider", "onnxruntime-genai-cuda"),
        ("dtype-on-onnx", Code.LOAD_FAILED, "options.dtype", "precision"),
        ("precision-elsewhere", Code.LOAD_FAILED, "options.precision", "onnx"),
    ],
)
async def test_bad_options_are_refused_naming_the_option(text, model, code, param, needle):
    client, _ = text
    err = await _fails(client, model)
    assert (err.code, err.param) == (code, param)
    assert needle in err.message


async def test_a_conversion_past_its_deadline_stops_the_builder(text, dirs, cache):
    client, supervisor = text
    restarts = supervisor.status()[0].restarts
    err = await _fails(client, "timeout", timeout_s=1.5)
    assert err.code is Code.TIMEOUT
    await _no_builder_soon(dirs["timeout"])
    assert not [n for n in converted(cache) if n.startswith("timeout-")]
    assert supervisor.status()[0].restarts == restarts
    assert (await greedy(client, "llama-onnx"))["usage"]["completion_tokens"] > 0


async def test_a_cancelled_conversion_stops_the_builder(text, dirs, cache):
    client, _ = text
    task = asyncio.create_task(greedy(client, "cancel"))
    await until(lambda: builders_running(dirs["cancel"]), 30, "the builder to run")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _no_builder_soon(dirs["cancel"])
    assert not [n for n in converted(cache) if n.startswith("cancel-")]
    assert not list((cache / "onnx").glob(".*.tmp"))


async def _no_builder_soon(path) -> None:
    await until(lambda: not builders_running(path), 10, f"the model builder for {path} to end")


async def test_the_builder_reports_progress_all_along_and_dies_when_told(dirs, tmp_path):
    """What the watchdog sees of a conversion: progress at its polls while the builder works
    (its output or its CPU time moves), however long it takes; a stop request kills it."""
    info = check_directory(dirs["mistral"])
    options = OnnxOptions("cpu", "fp32", 1)
    reports: list[float] = []
    polls: list[int] = []  # at each poll, the reports so far

    def poll() -> None:  # convert asks at every poll whether to stop
        polls.append(len(reports))

    # In a thread: the module's kernel client keeps reading heartbeats meanwhile.
    target = tmp_path / "onnx" / "m"
    await asyncio.to_thread(convert, "m", info, options, target, progress=reports.append, should_stop=poll)
    assert (target / GENAI_CONFIG).is_file()
    assert len(polls) >= 5  # a conversion of many polls (importing torch alone takes seconds)
    # A poll that finds the builder moving reports; the longest run of polls with no report
    # stays short of what a watchdog with a limit of one second allows (polls POLL_S apart).
    reported = [later > now for now, later in itertools.pairwise([*polls, len(reports)])]
    silences = [len(list(run)) for moved, run in itertools.groupby(reported) if not moved]
    assert max(silences, default=0) < 1.0 / POLL_S, reported
    assert reports == sorted(reports)
    assert reports[-1] > 0.8

    def stop_once_it_runs() -> None:
        if builders_running(dirs["mistral"]):
            raise CancelledByTest

    with pytest.raises(CancelledByTest):
        await asyncio.to_thread(
            convert,
            "m",
            info,
            options,
            tmp_path / "onnx" / "n",
            progress=reports.append,
            should_stop=stop_once_it_runs,
        )
    assert not builders_running(dirs["mistral"])  # killed, not left to finish
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["m"]  # nothing half-made left


class CancelledByTest(Exception):
    pass


def unending(**params):
    """A sampled chat with <|im_end|> banned: random weights may well end a reply at once."""
    return {"messages": HELLO, "temperature": 1.0, "logit_bias": {str(EOS): -100}, **params}


async def test_streaming_the_hard_token_limit_and_stop_sequences(text):
    client, _ = text
    params = unending(seed=3, max_tokens=9)
    async with client.stream("text", "chat", model="llama-onnx", params=params) as s:
        pieces = [chunk.data["text"] async for chunk in s]
    assert s.result is not None
    assert len(pieces) > 1
    assert "".join(pieces) == s.result.data["text"]
    assert s.result.data["usage"]["completion_tokens"] == 9
    assert s.result.data["finish_reason"] == "length"
    free = s.result.data["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    cut = (await client.call("text", "chat", model="llama-onnx", params={**params, "stop": [stop]})).data
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == free[: free.index(stop)]


async def test_cancel_between_tokens_frees_the_manager(text):
    client, _ = text
    params = unending(seed=1, max_tokens=400)
    async with client.stream("text", "chat", model="llama-onnx", params=params) as s:
        async for _chunk in s:
            break
    await wait_idle(client)
    assert (await greedy(client, "llama-onnx"))["usage"]["completion_tokens"] > 0


CITY = {"enum": ["Paris", "Rome"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": CITY},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


async def both(client, name, **params):
    """The same request on onnx (fp32) and on transformers: the replies, which must agree."""
    replies = []
    for backend in ("onnx", "transformers"):
        params = {"messages": HELLO, "temperature": 0, "max_tokens": 120, **params}
        replies.append((await client.call("text", "chat", model=f"{name}-{backend}", params=params)).data)
    onnx, torch = replies
    for key in ("text", "finish_reason", "usage"):
        assert onnx[key] == torch[key], key
    assert [(c["name"], c["arguments"]) for c in onnx["tool_calls"]] == [
        (c["name"], c["arguments"]) for c in torch["tool_calls"]
    ]
    return onnx


async def test_json_output_follows_its_schema_as_on_transformers(text):
    client, _ = text
    schema = {
        "type": "object",
        "properties": {"city": CITY, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    reply = await both(client, "llama", response_format={"type": "json_schema", "schema": schema})
    value = json.loads(reply["text"])  # random weights, and still the schema's shape
    assert set(value) == {"city", "days"}
    assert value["city"] in CITY["enum"]
    assert isinstance(value["days"], int)
    reply = await both(client, "llama", response_format={"type": "json_object"})
    assert isinstance(json.loads(reply["text"]), dict)
    # Unconstrained, the same request is not JSON: the grammar did the work.
    free = await greedy(client, "llama-onnx", max_tokens=20)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free["text"])


@pytest.mark.parametrize("name", ["llama", "qwen2.5"])  # the generic scheme, and hermes' own format
async def test_a_required_tool_call_is_valid_and_parsed(text, name):
    client, _ = text
    reply = await both(client, name, tools=[WEATHER], tool_choice="required")
    assert reply["finish_reason"] == "tool_calls"
    [call] = reply["tool_calls"]
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"])["city"] in CITY["enum"]
    assert reply["text"] == ""


async def test_a_call_the_model_begins_by_itself_continues_under_the_grammar(text, dirs):
    import transformers

    client, _ = text
    # tool_choice auto: the reply is free until it opens a call. A bias makes this random
    # model open one; from there the call grammar holds it, and the call is valid.
    tok = transformers.AutoTokenizer.from_pretrained(str(dirs["qwen2.5"]))
    opener = {str(tok.convert_tokens_to_ids("<tool_call>")): 30}
    reply = await both(client, "qwen2.5", tools=[WEATHER], logit_bias=opener, parallel_tool_calls=False)
    [call] = reply["tool_calls"]
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"])["city"] in CITY["enum"]
    assert reply["finish_reason"] == "tool_calls"


async def test_a_schema_past_what_the_grammar_takes_is_refused_by_name(text):
    client, _ = text
    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}
    err = await _fails(client, "llama-onnx", response_format={"type": "json_schema", "schema": schema})
    assert (err.code, err.param) == (Code.UNSUPPORTED, "response_format")
    assert (await greedy(client, "llama-onnx"))["usage"]["completion_tokens"] > 0


async def test_describing_an_onnx_model_converts_nothing(dirs):
    from allm.managers.text.manager import describe

    report = describe({"id": "m", "path": str(dirs["qwen2"]), "options": {"backend": "onnx"}})
    assert report.engine is not None
    assert report.engine.name == "onnxruntime-genai"
    assert report.problems == ()
    assert report.format == "safetensors"


async def test_a_manager_killed_mid_conversion_takes_its_builder_along(text, dirs, cache):
    """It restarts the module's manager. The builder dies with it (PR_SET_PDEATHSIG); the next
    conversion clears the temporary directory it left."""
    client, supervisor = text
    pid = supervisor.pid_of("text#0")
    task = asyncio.create_task(greedy(client, "sigkill"))
    await until(lambda: builders_running(dirs["sigkill"]), 30, "the builder to run")
    assert list((cache / "onnx").glob(".sigkill-*.tmp"))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(AllmError) as info:
        await task
    assert info.value.code is Code.INTERNAL
    await _no_builder_soon(dirs["sigkill"])
    reply = await greedy(client, "sigkill")  # the restarted manager converts it anew
    assert reply["usage"]["completion_tokens"] > 0
    assert supervisor.pid_of("text#0") != pid
    assert not list((cache / "onnx").glob(".*.tmp"))
