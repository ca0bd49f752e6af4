"""The catalog over HTTP on a real `allm serve`: pull (and Ollama's /api/pull) from a Hub-compatible
server on loopback (tests/hub_server.py, HF_ENDPOINT in the server's environment), serve the pulled
model by its id, load, unload, pin against the LRU, delete, the admin keys, and pulled models served
after a restart with no TOML, an image model pulled by its parts among them. SmolLM2's GGUF stands
in for every quant, the tiny random Flux for image models; no test reaches the real Hub."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from allm.hub import Store, pull
from tests.hub_server import FLUX_CHECKPOINT, FLUX_REPO, HubServer, add_tiny_flux
from tests.image_files import write_tiny_flux, write_tiny_flux_checkpoint
from tests.integration.gateway_server import ALLM, Server, running_server
from tests.model_files import smollm2_path, write_hf_model
from tests.waits import wait_for
from tests.whisper_files import speech_wav, tiny_en_source

REPO = "bartowski/SmolLM2-135M-Instruct-GGUF"
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0", "IQ4_XS", "Q5_K_M", "Q6_K")
DEFAULT = "smollm2-135m-instruct"
WHISPER = "Systran/faster-whisper-tiny.en"
#: one SmolLM2 at n_ctx 4096 takes about 910 MiB by the pool's estimate: room for one, not two
BUDGET_MIB = 1400


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    llama = write_hf_model(tmp_path_factory.mktemp("hub-files") / "llama", "llama")
    with HubServer() as server:
        server.add(REPO, {f"SmolLM2-135M-Instruct-{q}.gguf": smollm2_path() for q in QUANTS})
        server.add(WHISPER, {p.name: p for p in tiny_en_source().iterdir()})
        server.add("test/tiny-llama", {p.name: p for p in llama.iterdir() if p.is_file()})
        yield server


def hub_env(hub: HubServer, tmp: Path) -> dict[str, str]:
    """The server's environment: the local Hub, no token, no ALLM_* settings from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "ALLM_"))}
    return env | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf-home")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models-api")


@pytest.fixture(scope="module")
def server(hub: HubServer, data_dir: Path) -> Iterator[Server]:
    """No keys, on loopback: the admin routes are open to it."""
    toml = f'[server]\ndata_dir = "{data_dir}"\n\n[text]\nmemory_budget_mib = {BUDGET_MIB}\n'
    with running_server(toml, data_dir, env=hub_env(hub, data_dir)) as s:
        yield s


def events(body: bytes) -> list[tuple[str, Any]]:
    """A server-sent event stream's (event, data) pairs."""
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def listed(server: Server) -> dict[str, dict[str, Any]]:
    status, body = server.json("GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list"
    return {m["id"]: m for m in body["data"]}


def chat(server: Server, model: str) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    return server.json("POST", "/v1/chat/completions", body)


def pulled_ids(server: Server, source: str, model_id: str) -> dict[str, Any]:
    status, model = server.json("POST", "/v1/models", {"source": source, "id": model_id})
    assert status == 200, model
    return dict(model)


def test_a_pull_streams_progress_then_its_model_is_served_by_id(server):
    status, headers, body = server.request(
        "POST", "/v1/models", {"source": f"{REPO}:Q8_0", "id": "smol-q8", "stream": True}
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    got = events(body)
    progress = [data for kind, data in got if kind == "progress"]
    assert {p["file"] for p in progress} == {"SmolLM2-135M-Instruct-Q8_0.gguf"}
    size = smollm2_path().stat().st_size
    assert progress[-1] == {
        "file": "SmolLM2-135M-Instruct-Q8_0.gguf",
        "index": 1,
        "count": 1,
        "done_bytes": size,
        "total_bytes": size,
        "finished": True,
        "model_done_bytes": size,
        "model_total_bytes": size,
    }
    kind, model = got[-1]
    assert kind == "model"
    assert (model["id"], model["object"], model["source"], model["fetched"]) == (
        "smol-q8",
        "model",
        f"hf.co/{REPO}:Q8_0",
        True,
    )
    assert model["state"] == "available"

    asked = int(time.time())
    status, reply = chat(server, "smol-q8")
    assert status == 200, reply
    assert reply["model"] == "smol-q8"
    assert reply["choices"][0]["message"]["content"]
    row = wait_for(
        lambda: (r := listed(server)["smol-q8"])["last_used"] and r, 30, "a heartbeat with the use"
    )
    assert row["state"] == "loaded"
    assert row["memory_bytes"] > 0
    assert row["context_length"] == 4096
    assert asked <= row["last_used"] <= time.time()  # the use just made, in Unix seconds
    assert row["created"] > 0


def test_a_pulled_whisper_transcribes_and_a_pulled_safetensors_model_chats(server, tmp_path):
    """Each kind a pull registers is served by its manager: speech in CTranslate2 form (the audio
    manager converts it for whisper.cpp), and a safetensors directory (transformers)."""
    assert pulled_ids(server, WHISPER, "pulled-whisper")["modality"] == "audio"
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    wav = speech_wav(tmp_path / "paris.wav", "Paris is the capital of France.").read_bytes()
    heard = sdk.audio.transcriptions.create(model="pulled-whisper", file=("paris.wav", wav))
    assert "Paris" in heard.text
    assert pulled_ids(server, "test/tiny-llama", "pulled-llama")["modality"] == "text"
    status, reply = server.json(
        "POST",
        "/v1/chat/completions",
        {"model": "pulled-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] > 0


def test_pulling_a_model_again_fetches_nothing(server, hub):
    assert pulled_ids(server, f"{REPO}:Q4_0", "smol-again")["fetched"] is True
    sent = hub.sent_bytes(REPO)
    status, model = server.json("POST", "/v1/models", {"source": f"{REPO}:Q4_0", "id": "smol-again"})
    assert (status, model["fetched"]) == (200, False)
    assert hub.sent_bytes(REPO) == sent


def test_a_pull_refusal_carries_its_status(server):
    status, body = server.json("POST", "/v1/models", {"source": f"{REPO}:Q2_K"})
    assert status == 404
    assert "Q2_K" in body["error"]["message"]
    assert "Q4_K_M" in body["error"]["message"]
    status, body = server.json("POST", "/v1/models", {"source": "../etc/passwd"})
    assert (status, body["error"]["param"]) == (400, "source")
    status, body = server.json("POST", "/v1/models", {"source": f"{REPO}:Q4_0", "id": DEFAULT})
    assert (status, body["error"]["code"]) == (409, "model_id_taken")


def test_a_pinned_model_survives_the_lru_and_unpinned_it_is_evicted(server):
    pulled_ids(server, f"{REPO}:IQ4_XS", "smol-pin")
    status, model = server.json("POST", "/v1/models/smol-pin/pin")
    assert status == 200, model
    assert (model["state"], model["pinned"]) == ("loaded", True)
    wait_for(lambda: listed(server)["smol-pin"]["pinned"], 30, "the heartbeat to show the pin")

    status, body = chat(server, DEFAULT)  # the budget holds one: the pinned one stays
    assert status == 503, body
    assert "pinned (smol-pin" in body["error"]["message"]
    assert listed(server)["smol-pin"]["state"] == "loaded"

    status, model = server.json("POST", "/v1/models/smol-pin/unpin")
    assert (status, model["pinned"]) == (200, False)
    status, body = chat(server, DEFAULT)
    assert status == 200, body
    wait_for(lambda: listed(server)["smol-pin"]["state"] == "available", 30, "the LRU to evict smol-pin")

    status, model = server.json("POST", "/v1/models/smol-pin/load")
    assert (status, model["state"]) == (200, "loaded")
    status, model = server.json("POST", "/v1/models/smol-pin/unload")
    assert (status, model["state"]) == (200, "available")
    wait_for(lambda: listed(server)["smol-pin"]["state"] == "available", 30, "the unload to show")


def test_delete_refuses_a_loaded_model_unless_forced_and_any_configured_one(server, data_dir):
    pulled_ids(server, f"{REPO}:Q5_K_M", "smol-del")
    directory = Store(data_dir).directory("smol-del")
    assert directory.is_dir()
    assert server.json("POST", "/v1/models/smol-del/load")[0] == 200
    wait_for(lambda: listed(server)["smol-del"]["state"] == "loaded", 30, "the load to show")
    status, body = server.json("DELETE", "/v1/models/smol-del")
    assert (status, body["error"]["code"]) == (409, "model_loaded")
    status, body = server.json("DELETE", "/v1/models/smol-del?force=true")
    assert (status, body) == (200, {"id": "smol-del", "object": "model", "deleted": True})
    assert "smol-del" not in listed(server)
    assert not directory.exists()
    assert chat(server, "smol-del")[0] == 404

    status, body = server.json("DELETE", f"/v1/models/{DEFAULT}")
    assert (status, body["error"]["code"]) == (400, "model_not_pulled")
    assert server.json("DELETE", "/v1/models/nothing-here")[0] == 404


def test_allm_rm_goes_through_the_running_server_and_refuses_a_loaded_model(server, data_dir):
    pulled_ids(server, f"{REPO}:Q5_K_M", "smol-rm")
    assert server.json("POST", "/v1/models/smol-rm/load")[0] == 200
    wait_for(lambda: listed(server)["smol-rm"]["state"] == "loaded", 30, "the load to show")
    rm = [str(ALLM), "rm", "smol-rm", "--data-dir", str(data_dir), "--server", server.base_url]
    refused = subprocess.run(rm, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "is loaded" in refused.stderr
    assert "--force" in refused.stderr
    assert Store(data_dir).get("smol-rm") is not None
    forced = subprocess.run([*rm, "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert "through the server" in forced.stdout
    assert Store(data_dir).get("smol-rm") is None
    assert "smol-rm" not in listed(server)


def test_ollama_pull_streams_its_progress_lines_and_delete_removes_it(server):
    name = f"hf.co/{REPO}:Q4_K_M"
    status, headers, body = server.request("POST", "/api/pull", {"model": name})
    assert status == 200
    assert headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[0] == {"status": "pulling manifest"}
    assert [line["status"] for line in lines[-3:]] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    pulling = lines[1:-3]
    digest = pulling[-1]["digest"]
    assert digest.startswith("sha256:")
    assert len(digest) == 71
    assert pulling[-1] == {
        "status": f"pulling {digest[7:19]}",
        "digest": digest,
        "total": smollm2_path().stat().st_size,
        "completed": smollm2_path().stat().st_size,
    }
    status, reply = server.json(
        "POST",
        "/api/chat",
        {
            "model": name,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": False,
            "options": {"num_predict": 4},
        },
    )
    assert status == 200, reply
    assert reply["model"] == name

    status, _headers, _body = server.request("DELETE", "/api/delete", {"model": name})
    assert status == 200
    assert name not in listed(server)
    status, body = server.json("DELETE", "/api/delete", {"model": name})
    assert status == 404
    assert "not found" in body["error"]


def test_a_pull_while_a_stream_runs_leaves_the_stream_whole(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=DEFAULT,
        messages=[{"role": "user", "content": "Count from one to fifty in words."}],
        max_tokens=48,
        stream=True,
    )
    pulled: list[Any] = []
    puller = threading.Thread(
        target=lambda: pulled.append(server.json("POST", "/v1/models", {"source": f"{REPO}:Q6_K"}))
    )
    finish = None
    text = ""
    for chunk in stream:
        if puller.ident is None:  # the pull starts once the stream has begun
            puller.start()
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    puller.join(timeout=120)
    assert finish in ("length", "stop")
    assert text
    assert pulled[0][0] == 200, pulled
    assert pulled[0][1]["id"] == f"{REPO}:Q6_K"


def test_pulled_models_are_served_after_a_restart_and_the_toml_wins_a_clash(hub, tmp_path):
    data = tmp_path / "data"
    environ = {"HF_ENDPOINT": hub.url}
    pull(f"{REPO}:Q4_0", data, model_id="kept", environ=environ)
    pull(f"{REPO}:Q8_0", data, model_id="clash", environ=environ)
    toml = (
        f'[server]\ndata_dir = "{data}"\napi_keys = ["sk-user"]\n\n'
        f'[[models]]\nid = "clash"\npath = "{smollm2_path()}"\n'
    )
    log = tmp_path / "serve.log"
    with running_server(toml, tmp_path, env=hub_env(hub, tmp_path), api_key="sk-user", log=log) as s:
        models = listed(s)
        assert models["kept"]["source"] == f"hf.co/{REPO}:Q4_0"
        assert models["clash"]["source"] is None
        assert chat(s, "kept")[0] == 200
        said = log.read_text()
        assert "model 'clash': the configuration's entry" in said
        assert f"pulled from hf.co/{REPO}:Q8_0" in said

        # api_keys and no admin_keys: nobody may change the models over HTTP
        status, body = s.json("POST", "/v1/models/kept/load")
        assert status == 403
        assert "admin_keys" in body["error"]["message"]
        status, body = s.json("DELETE", "/api/delete", {"model": "kept"})
        assert status == 403
        assert "admin_keys" in body["error"]


@pytest.mark.slow
def test_a_flux_pulled_by_parts_over_http_draws_after_a_restart(hub, tmp_path):
    """Pulled over HTTP by a server with no image model (no image manager runs), the tiny Flux by its
    parts and as a single file are registered, and a restart serves both, with no TOML, each making
    an image; the parts' pull gave the model its defaults (2 steps). A bad description is refused
    before its stream begins, and registers nothing."""
    files = tmp_path / "flux-files"
    checkpoint = write_tiny_flux_checkpoint(files / "flux-tiny-checkpoint.gguf")
    parts = add_tiny_flux(hub, write_tiny_flux(files / "parts"), checkpoint)
    data = tmp_path / "data"
    toml = f'[server]\ndata_dir = "{data}"\n\n[image]\nmax_width = 256\nmax_height = 256\n'
    with running_server(toml, tmp_path, env=hub_env(hub, tmp_path)) as s:
        no_vae = {k: v for k, v in parts.items() if k != "taesd"}
        status, headers, body = s.request(
            "POST", "/v1/models", {"source": FLUX_REPO, "id": "flux-bad", "parts": no_vae, "stream": True}
        )
        refused = json.loads(body)
        assert (status, headers["content-type"]) == (400, "application/json")
        assert (refused["error"]["param"], refused["error"]["code"]) == ("parts.vae", "invalid_value")
        assert "needs a VAE" in refused["error"]["message"]
        status, refused = s.json(
            "POST", "/v1/models", {"source": FLUX_REPO, "id": "flux-bad", "parts": {**parts, "vea": "x"}}
        )
        assert (status, refused["error"]["param"]) == (400, "parts.vea")
        assert "flux-bad" not in listed(s)

        status, _headers, body = s.request(
            "POST",
            "/v1/models",
            {
                "source": FLUX_REPO,
                "id": "flux-parts",
                "parts": parts,
                "options": {"steps": 2, "cfg_scale": 1.0},
                "stream": True,
            },
        )
        assert status == 200
        got = events(body)
        finished = [data["file"] for kind, data in got if kind == "progress" and data["finished"]]
        assert finished == [
            "diffusion_model/flux-tiny.gguf",
            "clip_l/clip-l-random.gguf",
            "taesd/taesd-dit16-random.gguf",
        ]
        kind, model = got[-1]
        assert kind == "model", model
        assert (model["id"], model["modality"], model["source"]) == (
            "flux-parts",
            "image",
            f"hf.co/{FLUX_REPO}",
        )
        assert model["warnings"] == ["no image manager runs here: a restart of the server serves it"]
        assert pulled_ids(s, FLUX_CHECKPOINT, "flux-checkpoint")["modality"] == "image"
    assert Store(data).get("flux-bad") is None

    with running_server(toml, tmp_path, env=hub_env(hub, tmp_path)) as s:
        assert {"flux-parts", "flux-checkpoint"} <= set(listed(s))
        status, _headers, body = s.request(
            "POST",
            "/v1/images/generations",
            {"model": "flux-parts", "prompt": "a red cube", "size": "64x64", "stream": True, "seed": 1},
        )
        assert status == 200, body
        drawn = events(body)
        assert {data["steps"] for kind, data in drawn if kind == "image_generation.progress"} == {2}
        kind, done = drawn[-1]
        assert kind == "image_generation.completed"
        assert picture(done["b64_json"]).size == (64, 64)
        status, reply = s.json(
            "POST",
            "/v1/images/generations",
            {
                "model": "flux-checkpoint",
                "prompt": "a red cube",
                "size": "64x64",
                "steps": 2,
                "cfg_scale": 1.0,
            },
        )
        assert status == 200, reply
        assert picture(reply["data"][0]["b64_json"]).size == (64, 64)


def picture(b64: str) -> Image.Image:
    """A PNG the server drew, decoded."""
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    img.load()
    return img
