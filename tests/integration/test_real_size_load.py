"""A model that takes several heartbeat timeouts to load is loaded, not killed as hung.

Before, a load held the pool's lock that every heartbeat needed: the
supervisor killed a healthy manager in the middle of loading any model bigger
than the test fixtures.  Here the fixtures write a real-sized llama (about
1.6 GB of float32 weights in four shards) and the heartbeat timeout is set
below its load time, as a 7B model on a slow disk would be.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.model_files import _hf_config, smollm2_path, write_tokenizer

from .conftest import text_manager
from .gateway_server import running_server

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 0.4
HEARTBEAT_INTERVAL_S = 0.05
#: heartbeats that span twice the heartbeat timeout: a load the manager reports in more of them
#: lasted longer than that by the manager's own count, which is this file's premise
PREMISE_BEATS = int(2 * HEARTBEAT_TIMEOUT_S / HEARTBEAT_INTERVAL_S) + 1
SHARDS = 4


def write_real_size_llama(directory: Path) -> Path:
    """A llama of ~410 M random float32 parameters, sharded like a hub checkpoint."""
    import safetensors.numpy
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory)
    config = _hf_config("llama", ids)
    config.update(
        {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
        }
    )
    config.save_pretrained(str(directory))
    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    rng = np.random.default_rng(0)
    names = sorted(shapes)
    weight_map = {}
    for shard in range(SHARDS):
        file = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for name in names[shard::SHARDS]:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = np.ones(shape, dtype=np.float32)
            else:
                tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
            weight_map[name] = file
        safetensors.numpy.save_file(tensors, str(directory / file), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory) -> Path:
    return write_real_size_llama(tmp_path_factory.mktemp("real-size") / "llama-410m")


async def test_a_model_slower_to_load_than_the_heartbeat_timeout_loads_and_answers(big_llama):
    settings = {
        "models": [{"id": "big", "path": str(big_llama), "options": {"n_ctx": 256}}],
        "load_stall_s": 60,
    }
    async with text_manager(
        settings,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
        step_limit_s=60,
    ) as (client, supervisor):
        pid = supervisor.pid_of("text#0")
        params = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        answer = asyncio.create_task(client.call("text", "chat", model="big", params=params, timeout_s=300))
        beats: list[Any] = []  # each heartbeat that showed the load, once
        while not answer.done():  # a reader of every heartbeat: they come HEARTBEAT_INTERVAL_S apart
            hb = next(v.heartbeat for v in client.instances())
            if hb is not None and "big" in hb.extra.get("loading", {}) and not (beats and beats[-1] is hb):
                beats.append(hb)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S / 5)
        reply = (await answer).data
        assert reply["usage"]["completion_tokens"] >= 1
        assert len(beats) >= PREMISE_BEATS, (
            f"the load showed in {len(beats)} heartbeats: too fast to show anything"
        )
        loading: list[dict[str, Any]] = [hb.extra["loading"]["big"] for hb in beats]
        fractions = [r["fraction"] for r in loading if r["fraction"] is not None]
        assert fractions == sorted(fractions)
        assert fractions[0] < 0.5 < fractions[-1]  # read shard by shard, seen on the way
        status = supervisor.status()[0]
        assert status.restarts == 0  # never mistaken for a hang
        assert supervisor.pid_of("text#0") == pid
        hb = next(v.heartbeat for v in client.instances())
        assert hb is not None
        assert hb.models == ("big",)
        assert hb.extra["loading"] == {}


def test_llama_cpp_reports_its_load_progress():
    from allm.managers.pool import ModelEntry
    from allm.managers.text.manager import plan_load

    seen: list[float] = []
    plan = plan_load(ModelEntry("smol", smollm2_path(), options={"n_ctx": 256}))
    engine = plan.load(seen.append, lambda _bytes, _what: None)
    try:
        assert seen, "llama.cpp's progress_callback never reached us"
        assert seen == sorted(seen)
        assert seen[-1] == pytest.approx(1.0)
    finally:
        engine.close()


def test_status_and_models_show_a_load_under_way(big_llama, tmp_path):
    """What an operator sees over HTTP while a big model loads: `loading`, with its progress."""
    config = f"""
[server]
heartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}
heartbeat_interval_s = {HEARTBEAT_INTERVAL_S}

[[models]]
id = "smol"
path = "{smollm2_path()}"

[[models]]
id = "big"
path = "{big_llama}"
options = {{ n_ctx = 256 }}
"""
    with running_server(config, tmp_path) as server, ThreadPoolExecutor(1) as pool:
        body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answer = pool.submit(server.json, "POST", "/v1/chat/completions", body)
        states, progress = set(), []
        while not answer.done():  # what an operator polling both would see
            models = {m["id"]: m["state"] for m in server.json("GET", "/v1/models")[1]["data"]}
            states.add(models["big"])
            [text] = server.managers()
            if "big" in text["loading"]:
                progress.append(text["loading"]["big"])
            time.sleep(HEARTBEAT_INTERVAL_S / 5)
        status, reply = answer.result()
        assert status == 200, reply
        assert "loading" in states
        assert progress, "GET /status never showed the load"
        # Each heartbeat carries its own elapsed_s: the distinct ones are heartbeats, a lower bound.
        beats = len({p["elapsed_s"] for p in progress})
        assert beats >= PREMISE_BEATS, f"the load showed in {beats} heartbeats: too fast to show anything"
        assert {m["id"]: m["state"] for m in server.json("GET", "/v1/models")[1]["data"]}["big"] == "loaded"
        [text] = server.managers()
        assert text["restarts"] == 0
        assert text["loading"] == {}
