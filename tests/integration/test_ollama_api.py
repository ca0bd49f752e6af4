"""Ollama's API (/api/*) against a real `allm serve`, in raw HTTP: listings, answers, NDJSON streams, errors.

The shapes checked are ollama/ollama's (``api/types.go``, ``server/routes.go``) and
ollama-python's (``ollama/_types.py``); tests/clients drives the real library. SmolLM2
answers, calls tools (the generic scheme) and embeds; a tiny random model with an R1-style
template stands in for a reasoning model.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import jsonschema
import pytest

from allm.managers.text.options import DEFAULT_N_CTX
from tests.model_files import smollm2_path, write_tiny_llama_gguf
from tests.waits import wait_for

from .gateway_server import Server, running_server

T = TypeVar("T")

MODEL = "smollm2-135m-instruct"
TINY = "tiny-context"
THINKER = "qwen-think"
FRANCE = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0, "num_predict": 12}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
COUNTS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
#: SmolLM2's embeddings have this many dimensions (its embedding length)
EMBEDDING_SIZE = 576


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ollama")
    thinker = write_tiny_llama_gguf(tmp / "qwen-think.gguf", "qwen-think")
    config = f"""
[server]
data_dir = "{tmp / "data"}"

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"
defaults = {{ temperature = 0.2 }}

[[models]]
id = "{TINY}"
path = "{smollm2_path()}"
options = {{ n_ctx = 64 }}

[[models]]
id = "{THINKER}"
path = "{thinker}"
options = {{ n_ctx = 1024 }}
"""
    with running_server(config, tmp) as srv:
        yield srv


def post(server: Server, path: str, body: Any) -> tuple[int, Any]:
    return server.json("POST", path, body)


def chat(**fields: Any) -> dict[str, Any]:
    """A /api/chat body: the defaults, then ``fields``."""
    return {"model": MODEL, "messages": FRANCE, "options": GREEDY, "stream": False, **fields}


def lines(server: Server, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream's objects, one a line; every one but the last is not done."""
    status, headers, raw = server.request("POST", path, {**body, "stream": True})
    assert status == 200, raw
    assert headers["content-type"] == "application/x-ndjson"
    text = raw.decode()
    assert text.endswith("\n"), text
    out = [json.loads(line) for line in text.split("\n")[:-1]]
    assert [o["done"] for o in out] == [False] * (len(out) - 1) + [True], out
    for o in out:
        assert o["model"] == body["model"]
        datetime.fromisoformat(o["created_at"])
    return out


def counted(final: dict[str, Any], seen_ns: int) -> None:
    """The last object's counts and durations: positive integers, adding up to the total, and in
    nanoseconds: no longer than the client saw the exchange take (``seen_ns``), and more than a
    thousandth of it (in microseconds it would be less)."""
    for key in COUNTS:
        assert type(final[key]) is int, (key, final)
        assert final[key] > 0, (key, final)
    parts = final["load_duration"] + final["prompt_eval_duration"] + final["eval_duration"]
    assert final["total_duration"] == parts
    assert seen_ns // 1000 < final["total_duration"] <= seen_ns, (final, seen_ns)


def timed(exchange: Callable[[], T]) -> tuple[T, int]:
    """What ``exchange`` returns, and the nanoseconds it took as the client saw it."""
    started = time.monotonic_ns()
    result = exchange()
    return result, time.monotonic_ns() - started


def loaded(server: Server) -> set[str]:
    status, body = server.json("GET", "/api/ps")
    assert status == 200, body
    return {m["name"] for m in body["models"]}


# -- listings ----------------------------------------------------------------------------------


def test_the_version_is_an_ollama_release_clients_accept(server):
    status, body = server.json("GET", "/api/version")
    assert status == 200
    version = tuple(int(part) for part in body["version"].split("."))
    assert len(version) == 3
    assert version >= (0, 6, 5)  # Continue's least; VS Code's Copilot asks 0.6.4


def test_tags_list_each_text_model_as_its_id_with_latest(server):
    status, body = server.json("GET", "/api/tags")
    assert status == 200
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {f"{MODEL}:latest", f"{TINY}:latest", f"{THINKER}:latest"}
    entry = models[f"{MODEL}:latest"]
    assert entry["model"] == entry["name"]
    assert entry["size"] == smollm2_path().stat().st_size
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
    assert models[f"{TINY}:latest"]["digest"] != entry["digest"]  # another entry of the same file
    datetime.fromisoformat(entry["modified_at"])
    assert entry["details"]["format"] == "gguf"
    assert {"family", "parameter_size", "quantization_level"} <= set(entry["details"])
    assert {"completion", "tools"} <= set(entry["capabilities"])


def test_show_finds_a_model_by_id_or_id_latest_and_gives_what_allm_knows(server):
    status, shown = post(server, "/api/show", {"model": f"{MODEL}:latest"})
    assert status == 200, shown
    assert post(server, "/api/show", {"model": MODEL}) == (200, shown)
    assert post(server, "/api/show", {"name": MODEL})[1]["details"] == shown["details"]
    assert shown["details"]["format"] == "gguf"
    # no n_ctx in its catalog entry: the text manager's default
    assert shown["model_info"] == {"allm.context_length": DEFAULT_N_CTX}
    assert shown["details"]["context_length"] == DEFAULT_N_CTX
    assert {"completion", "tools", "embedding"} <= set(shown["capabilities"])
    assert re.search(r"^temperature +0\.2$", shown["parameters"], re.MULTILINE)
    assert f"FROM {smollm2_path()}" in shown["modelfile"]
    status, tiny = post(server, "/api/show", {"model": TINY})
    assert status == 200, tiny
    assert tiny["model_info"] == {"allm.context_length": 64}
    status, error = post(server, "/api/show", {"model": "llama3.2"})
    assert (status, error) == (404, {"error": "model 'llama3.2' not found"})


def test_ps_lists_the_model_a_chat_used_with_its_memory(server):
    status, _ = post(server, "/api/chat", chat(model=TINY, messages=[{"role": "user", "content": "Hi"}]))
    assert status == 200
    wait_for(lambda: f"{TINY}:latest" in loaded(server), 30, "the tiny model to be listed")
    status, body = server.json("GET", "/api/ps")
    [entry] = [m for m in body["models"] if m["name"] == f"{TINY}:latest"]
    assert entry["model"] == entry["name"]
    assert entry["size"] > smollm2_path().stat().st_size  # the weights and the cache
    assert entry["size_vram"] == 0  # on the CPU
    assert entry["context_length"] == 64
    assert datetime.fromisoformat(entry["expires_at"]) > datetime.fromisoformat(
        "2100-01-01T00:00:00+00:00"
    )  # no idle_unload_s: loaded until something needs the room


# -- chat ----------------------------------------------------------------------------------------


def test_chat_answers_in_one_object_with_counts_and_durations(server):
    (status, body), seen_ns = timed(lambda: post(server, "/api/chat", chat(options={"temperature": 0})))
    assert status == 200, body
    assert body["model"] == MODEL
    assert body["message"]["role"] == "assistant"
    assert "Paris" in body["message"]["content"]
    assert body["done"] is True
    assert body["done_reason"] == "stop"
    counted(body, seen_ns)
    assert body["prompt_eval_count"] > 10


def test_a_chat_streams_ndjson_pieces_that_join_to_the_whole_answer(server):
    out, seen_ns = timed(lambda: lines(server, "/api/chat", chat(model=f"{MODEL}:latest")))
    pieces = [o["message"]["content"] for o in out[:-1]]
    assert len(pieces) > 3
    assert all(o["message"]["role"] == "assistant" for o in out)
    final = out[-1]
    assert final["message"]["content"] == ""
    assert final["done_reason"] in ("stop", "length")
    assert final["eval_count"] <= GREEDY["num_predict"]
    counted(final, seen_ns)
    status, whole = post(server, "/api/chat", chat(model=f"{MODEL}:latest"))
    assert status == 200, whole
    assert "".join(pieces) == whole["message"]["content"]


def test_num_predict_caps_the_tokens_generated(server):
    for n in (1, 5):
        status, body = post(server, "/api/chat", chat(options={"num_predict": n}))
        assert status == 200, body
        assert body["eval_count"] <= n
        assert body["done_reason"] == "length"


def test_format_json_answers_parseable_json(server):
    ask = [{"role": "user", "content": "Give the capital of France as a JSON object with the key city."}]
    status, body = post(
        server, "/api/chat", chat(messages=ask, format="json", options={"temperature": 0, "num_predict": 40})
    )
    assert status == 200, body
    assert body["done_reason"] == "stop"
    assert isinstance(json.loads(body["message"]["content"]), dict)


def test_a_json_schema_format_answers_a_valid_instance(server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    status, body = post(
        server,
        "/api/generate",
        {
            "model": MODEL,
            "prompt": "What is the capital of France?",
            "format": schema,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 40},
        },
    )
    assert status == 200, body
    jsonschema.validate(json.loads(body["response"]), schema)


def test_a_forced_tool_call_has_object_arguments_and_its_result_gets_a_text_answer(server):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = chat(messages=ask, tools=[WEATHER], tool_choice="required", options={"temperature": 0})
    status, first = post(server, "/api/chat", body)
    assert status == 200, first
    [call] = first["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["index"] == 0
    assert isinstance(call["function"]["arguments"], dict)
    assert isinstance(call["function"]["arguments"]["city"], str)
    assert first["done_reason"] == "stop"
    # streamed: the call comes whole in one line before the last
    out = lines(server, "/api/chat", body)
    [called] = [o for o in out if o["message"].get("tool_calls")]
    assert called["message"]["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]
    # the result goes back as Ollama's clients send it: the call without its id, the function named
    turns = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [{"function": call["function"]}]},
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 24 degrees."},
    ]
    status, second = post(
        server,
        "/api/chat",
        chat(messages=turns, tools=[WEATHER], options={"temperature": 0, "num_predict": 30}),
    )
    assert status == 200, second
    assert second["message"]["content"].strip()
    assert "tool_calls" not in second["message"]


def test_think_shows_the_reasoning_and_false_leaves_it_out(server):
    body = {
        "model": THINKER,
        "messages": [{"role": "user", "content": "Think."}],
        "options": {"num_predict": 8},
        "stream": False,
    }
    status, shown = post(server, "/api/chat", {**body, "think": True})
    assert status == 200, shown
    assert shown["message"]["thinking"]  # the template opens <think>: reasoning first
    out = lines(server, "/api/chat", {**body, "think": "high"})
    assert any(o["message"].get("thinking") for o in out)
    status, hidden = post(server, "/api/chat", {**body, "think": False})
    assert status == 200, hidden
    assert "thinking" not in hidden["message"]


# -- generate --------------------------------------------------------------------------------------


def test_generate_streams_and_answers_whole_the_same_text(server):
    body = {
        "model": MODEL,
        "system": "Answer in one short sentence.",
        "prompt": "What is the capital of France?",
        "options": GREEDY,
    }
    out, seen_ns = timed(lambda: lines(server, "/api/generate", body))
    final = out[-1]
    assert final["response"] == ""
    assert final["done_reason"] in ("stop", "length")
    counted(final, seen_ns)
    (status, whole), seen_ns = timed(lambda: post(server, "/api/generate", {**body, "stream": False}))
    assert status == 200, whole
    assert "".join(o["response"] for o in out[:-1]) == whole["response"]
    assert "Paris" in whole["response"]
    counted(whole, seen_ns)


def test_a_raw_prompt_is_completed_as_it_is(server):
    body = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "raw": True,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 4},
    }
    status, whole = post(server, "/api/generate", body)
    assert status == 200, whole
    assert "Paris" in whole["response"]
    assert whole["prompt_eval_count"] < 10  # no chat template around it


def test_an_empty_prompt_loads_the_model_and_keep_alive_0_unloads_it(server):
    status, body = post(server, "/api/generate", {"model": TINY, "keep_alive": 0})
    assert status == 200, body
    assert (body["done"], body["done_reason"], body["response"]) == (True, "unload", "")
    wait_for(lambda: f"{TINY}:latest" not in loaded(server), 30, "the tiny model to be unloaded")
    status, body = post(server, "/api/generate", {"model": TINY})
    assert status == 200, body
    assert (body["done"], body["done_reason"]) == (True, "load")
    wait_for(lambda: f"{TINY}:latest" in loaded(server), 30, "the tiny model to be loaded")
    status, body = post(server, "/api/chat", {"model": TINY, "messages": []})
    assert (status, body["done_reason"], body["message"]) == (
        200,
        "load",
        {"role": "assistant", "content": ""},
    )


def test_keep_alive_0_unloads_the_model_once_the_answer_is_sent(server):
    status, body = post(server, "/api/chat", chat(model=TINY, messages=[{"role": "user", "content": "Hi"}]))
    assert status == 200
    wait_for(lambda: f"{TINY}:latest" in loaded(server), 30, "the tiny model to be listed")
    status, body = post(
        server,
        "/api/chat",
        chat(
            model=TINY, messages=[{"role": "user", "content": "Hi"}], keep_alive=0, options={"num_predict": 2}
        ),
    )
    assert status == 200, body
    assert body["done"] is True
    wait_for(lambda: f"{TINY}:latest" not in loaded(server), 30, "the tiny model to be unloaded")
    # the next request loads it again
    assert (
        post(server, "/api/generate", {"model": TINY, "prompt": "Hi", "stream": False, "keep_alive": "5m"})[0]
        == 200
    )


def test_keep_alive_keeps_a_model_that_long_once_idle_and_a_negative_one_for_ever(server):
    from datetime import UTC, datetime, timedelta

    def expires(name: str) -> datetime:
        [row] = [m for m in server.json("GET", "/api/ps")[1]["models"] if m["name"] == name]
        return datetime.fromisoformat(row["expires_at"])

    prompt = {"model": TINY, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}}
    status, body = post(server, "/api/generate", {**prompt, "keep_alive": -1})
    assert status == 200, body
    wait_for(lambda: f"{TINY}:latest" in loaded(server), 30, "the tiny model to be listed")
    # as its manager's next heartbeat says
    wait_for(
        lambda: expires(f"{TINY}:latest") > datetime.now(UTC) + timedelta(days=365),
        30,
        "ps to say it is kept for ever",
    )
    status, body = post(server, "/api/generate", {**prompt, "keep_alive": "3s"})
    assert status == 200, body
    # its manager's next heartbeat says when: within the 3 s from the answer
    wait_for(
        lambda: expires(f"{TINY}:latest") < datetime.now(UTC) + timedelta(seconds=3.5),
        30,
        "ps to say it unloads within 3 s",
    )
    wait_for(
        lambda: f"{TINY}:latest" not in loaded(server), 30, "the tiny model to be unloaded once idle 3 s"
    )


# -- embeddings ------------------------------------------------------------------------------------


def test_embed_gives_a_vector_of_the_models_size_per_input(server):
    status, one = post(server, "/api/embed", {"model": MODEL, "input": "a cat"})
    assert status == 200, one
    assert one["model"] == MODEL
    [vector] = one["embeddings"]
    assert len(vector) == EMBEDDING_SIZE
    assert one["prompt_eval_count"] > 0
    assert one["total_duration"] >= one["load_duration"] > 0
    status, several = post(server, "/api/embed", {"model": f"{MODEL}:latest", "input": ["a cat", "a dog"]})
    assert status == 200, several
    assert [len(v) for v in several["embeddings"]] == [EMBEDDING_SIZE, EMBEDDING_SIZE]
    assert several["embeddings"][0] == pytest.approx(vector, rel=1e-5)
    status, short = post(server, "/api/embed", {"model": MODEL, "input": "a cat", "dimensions": 8})
    assert status == 200, short
    [cut] = short["embeddings"]
    assert len(cut) == 8
    assert math.fsum(x * x for x in cut) == pytest.approx(1.0)
    status, none = post(server, "/api/embed", {"model": MODEL, "input": []})
    assert (status, none) == (200, {"model": MODEL, "embeddings": []})


def test_embeddings_answers_in_the_older_shape(server):
    status, body = post(server, "/api/embeddings", {"model": MODEL, "prompt": "a cat"})
    assert status == 200, body
    assert set(body) == {"embedding"}
    assert len(body["embedding"]) == EMBEDDING_SIZE
    assert post(server, "/api/embeddings", {"model": MODEL, "prompt": ""}) == (200, {"embedding": []})


# -- errors ----------------------------------------------------------------------------------------


def test_an_unknown_model_is_404_before_any_line(server):
    for path, body in (
        ("/api/chat", chat(model="llama3.2:latest", stream=True)),
        ("/api/generate", {"model": "llama3.2", "prompt": "Hi"}),
        ("/api/embed", {"model": "llama3.2", "input": "Hi"}),
    ):
        status, headers, raw = server.request("POST", path, body)
        assert status == 404, raw
        assert headers["content-type"].startswith("application/json")
        assert json.loads(raw) == {"error": f"model '{body['model']}' not found"}


def test_a_prompt_longer_than_the_context_is_400_before_any_line(server):
    long = [{"role": "user", "content": "word " * 100}]
    status, headers, raw = server.request("POST", "/api/chat", chat(model=TINY, messages=long, stream=True))
    assert status == 400, raw
    assert headers["content-type"].startswith("application/json")
    assert "context holds 64 tokens" in json.loads(raw)["error"]


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        (
            "/api/chat",
            chat(messages=[{"role": "user", "content": "Hi", "images": ["aGk="]}]),
            "messages[0].images",
        ),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "images": ["aGk="]}, "'images'"),
        ("/api/chat", chat(options={"temperature": 5}), "options.temperature"),
        ("/api/chat", chat(options={"num_predict": "many"}), "options.num_predict"),
        ("/api/chat", chat(options={"num_ctx": 100_000}), "options.num_ctx"),
        ("/api/chat", chat(options={"mirostat": 2}), "options.mirostat"),
        ("/api/chat", chat(keep_alive="forever"), "keep_alive"),
        ("/api/chat", chat(format="xml"), "format"),
        ("/api/chat", chat(format={"type": "object", "minProperties": 1}), "format.minProperties"),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "template": "{{ .Prompt }}"}, "'template'"),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "context": [1, 2, 3]}, "'context'"),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "suffix": "end"}, "'suffix'"),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "raw": True, "system": "Be brief."}, "raw mode"),
        ("/api/chat", chat(messages=[{"role": "wizard", "content": "Hi"}]), "messages[0].role"),
    ],
)
def test_a_field_allm_cannot_honour_is_400_naming_it(server, path, body, named):
    status, headers, raw = server.request("POST", path, {**body, "stream": True})
    assert status == 400, raw
    assert headers["content-type"].startswith("application/json")
    error = json.loads(raw)
    assert set(error) == {"error"}
    assert named in error["error"], error


def test_an_error_mid_stream_is_one_last_ndjson_line(server):
    [before] = [m for m in server.managers() if m["modality"] == "text"]
    body = {
        "model": MODEL,
        "prompt": "Write a very long essay.",
        "options": {"temperature": 0, "num_predict": 2000},
    }
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        for _ in range(3):
            assert json.loads(resp.readline())["done"] is False
        os.kill(before["pid"], signal.SIGKILL)
        rest = [json.loads(line) for line in resp.read().decode().splitlines()]
    finally:
        conn.close()
    assert set(rest[-1]) == {"error"}
    assert "SIGKILL" in rest[-1]["error"]
    assert all(o["done"] is False for o in rest[:-1])
    status, again = post(server, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False})
    assert status == 200, again


# -- the published document --------------------------------------------------------------------------


def test_openapi_documents_the_ollama_endpoints(server):
    status, doc = server.json("GET", "/openapi.json")
    assert status == 200
    for path in ("/api/version", "/api/tags", "/api/ps"):
        assert "get" in doc["paths"][path]
    for path in ("/api/show", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"):
        assert "requestBody" in doc["paths"][path]["post"]
    chat_op = doc["paths"]["/api/chat"]["post"]
    assert "application/x-ndjson" in chat_op["responses"]["200"]["content"]
    assert chat_op["responses"]["4XX"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OllamaError"
    }
