"""/metrics, the access log and x-request-id, on a real `allm serve` after known traffic and faults.

Every count is exact: the traffic is ours, and a scrape counts only what came before it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.waits import wait_for

from .gateway_server import Server, running_server

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def chat(server: Server, content: str, max_tokens: int, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return server.request("POST", CHAT, {**body, **extra})


def stream_lines(server: Server, body: dict) -> list[dict]:
    status, _headers, data = server.request("POST", CHAT, {**body, "stream": True})
    assert status == 200
    return [
        json.loads(line[len("data: ") :])
        for line in data.decode().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_known_traffic_gives_exact_counts_ids_and_access_lines(tmp_path):
    log = tmp_path / "server.log"
    with running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path, log=log) as server:
        usages = []
        # Two plain chats, one with the caller's own request id.
        status, headers, body = chat(server, "Say hi.", 6, temperature=0)
        assert status == 200
        assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])
        usages.append(json.loads(body)["usage"])
        status, headers, body = server.request(
            "POST",
            CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5},
            headers={"x-request-id": "trace-metrics-1"},
        )
        assert status == 200
        assert headers["x-request-id"] == "trace-metrics-1"
        usages.append(json.loads(body)["usage"])
        # One stream: each chunk the engine sent is one event with something in its delta.
        events = stream_lines(
            server,
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Count to five."}],
                "max_tokens": 12,
                "temperature": 0,
                "stream_options": {"include_usage": True},
            },
        )
        usages.append(events[-1]["usage"])
        chunks = sum(
            1
            for e in events
            if e["choices"] and any(v for k, v in e["choices"][0]["delta"].items() if k != "role")
        )
        assert chunks >= 2
        # Refused at the edge: no kernel answer, no model.
        status, headers, _ = server.request("POST", CHAT, {"model": MODEL})
        assert status == 400
        # A request id that is not sane is replaced, never echoed.
        status, headers, _ = server.request(
            "POST",
            CHAT,
            {"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]},
            headers={"x-request-id": "a b\x7f"},
        )
        assert status == 404
        assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])

        samples = scrape(server)
        ok = {"endpoint": CHAT, "model": MODEL, "status": "200", "code": "OK"}
        assert value(samples, "allm_requests_total", **ok) == 3
        assert (
            value(samples, "allm_requests_total", endpoint=CHAT, model="none", status="400", code="none") == 1
        )
        assert (
            value(samples, "allm_requests_total", endpoint=CHAT, model="none", status="404", code="none") == 1
        )
        assert total(samples, "allm_requests_total", endpoint=CHAT) == 5
        assert total(samples, "allm_request_duration_seconds_count", endpoint=CHAT) == 5
        prompt = sum(u["prompt_tokens"] for u in usages)
        completion = sum(u["completion_tokens"] for u in usages)
        assert value(samples, "allm_tokens_total", model=MODEL, kind="prompt") == prompt
        assert value(samples, "allm_tokens_total", model=MODEL, kind="completion") == completion
        # Only the stream has a first token; its gaps are one fewer than its chunks.
        assert value(samples, "allm_time_to_first_token_seconds_count", endpoint=CHAT, model=MODEL) == 1
        assert value(samples, "allm_inter_token_latency_seconds_count", model=MODEL) == chunks - 1
        assert value(samples, "allm_requests_in_flight") == 1  # the scrape itself
        assert value(samples, "allm_manager_up", manager="text#0", modality="text") == 1
        assert value(samples, "allm_manager_capacity", manager="text#0", modality="text") > 0
        assert value(samples, "allm_model_loaded", manager="text#0", model=MODEL) == 1
        assert value(samples, "allm_model_loads_total", manager="text#0", model=MODEL) == 1
        assert value(samples, "allm_model_load_seconds_total", manager="text#0", model=MODEL) > 0
        assert value(samples, "allm_model_memory_bytes", manager="text#0", model=MODEL) > 0
        assert value(samples, "allm_manager_restarts_total", manager="text#0", modality="text") == 0
        # the engine's own: saved prefixes (none needed yet) and drafts (not speculating)
        assert value(samples, "allm_prefix_cache_bytes", manager="text#0", model=MODEL) == 0
        assert value(samples, "allm_prefix_cache_restored_tokens_total", manager="text#0", model=MODEL) == 0
        assert value(samples, "allm_speculative_drafted_tokens_total", manager="text#0", model=MODEL) == 0

        # /status's models: what the page shows
        model_row = next(m for m in server.json("GET", "/status")[1]["models"] if m["id"] == MODEL)
        assert model_row["state"] == "loaded"
        assert model_row["managers"] == ["text#0"]
        assert model_row["requests"] == 3
        assert model_row["tokens_out"] == completion
        # One the engine refuses: the manager logs its failure (successes only at DEBUG).
        status, _headers, body = server.request(
            "POST",
            CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}], "max_tokens": 4},
            headers={"x-request-id": "trace-refused"},
        )
        assert status == 400
        assert json.loads(body)["error"]["code"] == "context_length_exceeded"
    text = log.read_text()
    access = [line for line in text.splitlines() if "allm.access [trace-metrics-1]" in line]
    assert len(access) == 1, text[-4000:]
    assert f"POST {CHAT} model={MODEL} status=200 code=OK" in access[0]
    assert f"completion_tokens={usages[1]['completion_tokens']}" in access[0]
    assert "duration_ms=" in access[0]
    # The manager's own line for a request carries the same id as the gateway's.
    manager_lines = [line for line in text.splitlines() if "text#0" in line and "[trace-refused]" in line]
    assert any("finished op=chat" in line and "outcome=UNSUPPORTED" in line for line in manager_lines), (
        manager_lines
    )
    assert any("allm.access [trace-refused]" in line and "status=400" in line for line in text.splitlines())
    refused = [line for line in text.splitlines() if "allm.access" in line and "status=400" in line]
    assert len(refused) == 2


def read_events(conn: http.client.HTTPConnection, body: dict):
    conn.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_a_manager_killed_mid_stream_is_counted_by_code_and_cause(tmp_path):
    with running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path) as server:
        [text] = [m for m in server.managers() if m["name"] == "text#0"]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        seen = 0
        error = None
        for data in read_events(conn, body):
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                continue
            seen += 1
            if seen == 5:
                os.kill(text["pid"], signal.SIGKILL)
        conn.close()
        assert error is not None
        assert "SIGKILL" in error["message"]
        wait_for(
            lambda: any(
                m["name"] == "text#0" and m["live"] and m["restarts"] == 1 for m in server.managers()
            ),
            what="text#0 restarted",
        )
        status, _headers, _ = chat(server, "Say hi.", 3)
        assert status == 200
        samples = scrape(server)
        labels = {"endpoint": CHAT, "model": MODEL}
        # The stream had begun (HTTP 200); its end carried the fault table's code.
        assert value(samples, "allm_requests_total", **labels, status="200", code="INTERNAL") == 1
        assert value(samples, "allm_requests_total", **labels, status="200", code="OK") == 1
        assert (
            value(samples, "allm_manager_deaths_total", manager="text#0", modality="text", cause="SIGKILL")
            == 1
        )
        assert total(samples, "allm_manager_deaths_total") == 1
        assert value(samples, "allm_manager_restarts_total", manager="text#0", modality="text") == 1
        # Counted in the new process: it loaded the model once, for the request after the restart.
        assert value(samples, "allm_model_loads_total", manager="text#0", model=MODEL) == 1


def test_json_logs_are_one_object_a_line_with_the_request_id_in_gateway_and_manager(tmp_path):
    log = tmp_path / "server.log"
    with running_server(
        f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path, log=log, args=("--log-format", "json")
    ) as server:
        status, headers, _ = server.request(
            "POST",
            CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers={"x-request-id": "trace-json"},
        )
        assert status == 200
        assert headers["x-request-id"] == "trace-json"
        status, _headers, _ = server.request(
            "POST",
            CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}], "max_tokens": 4},
            headers={"x-request-id": "trace-json-refused"},
        )
        assert status == 400
    entries = []
    for line in Path(log).read_text().splitlines():
        if line.strip():
            entries.append(json.loads(line))  # every line, an engine's own output included
    access = [e for e in entries if e["logger"] == "allm.access" and e.get("request_id") == "trace-json"]
    assert len(access) == 1
    [line] = access
    assert line["process"] == "gateway"
    assert line["status"] == 200
    assert line["code"] == "OK"
    assert line["model"] == MODEL
    assert isinstance(line["completion_tokens"], int)
    assert line["completion_tokens"] > 0
    assert line["duration_ms"] > 0
    managed = [e for e in entries if e["process"] == "text#0" and e.get("request_id") == "trace-json-refused"]
    assert any(e["message"] == "finished" and e["op"] == "chat" and e["outcome"] != "ok" for e in managed), (
        managed
    )


def test_a_client_that_leaves_mid_stream_is_counted_as_499_cancelled(tmp_path):
    with running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        events = read_events(conn, body)
        for _ in range(3):
            next(events)
        conn.sock.shutdown(2)  # gone, as a closed browser tab
        conn.close()
        labels = {"endpoint": CHAT, "model": MODEL, "status": "499", "code": "CANCELLED"}
        wait_for(lambda: value(scrape(server), "allm_requests_total", **labels) == 1, 30, "the 499")
        samples = scrape(server)
        assert value(samples, "allm_requests_in_flight") == 1  # the scrape alone: nothing left open
        # the engine stopped: the manager is idle again
        wait_for(lambda: server.managers()[0]["active"] == 0, 10, "the manager to be idle")


def test_fields_allm_does_not_know_are_ignored_logged_once_per_request_and_counted(tmp_path):
    """The forward-compatible edge: a newer client's extra fields answer 200, never 400."""
    from allm.gateway.metrics import MAX_IGNORED_SERIES

    log = tmp_path / "server.log"
    with running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path, log=log) as server:
        messages = [{"role": "user", "content": "Say hi.", "cache_hint": "x"}]
        for i in range(2):
            status, _headers, body = server.request(
                "POST",
                CHAT,
                {"model": MODEL, "messages": messages, "max_tokens": 2, "client_metadata": {"a": "b"}},
                headers={"x-request-id": f"trace-ignored-{i}"},
            )
            assert status == 200, body
        # a known field with a bad value is still refused, unknown ones beside it or not
        status, _headers, body = chat(server, "Hi", 2, temperature=7, unheard_of=1)
        assert status == 400
        assert json.loads(body)["error"]["param"] == "temperature"
        # names come from clients: the series they make are capped
        crowd = {f"field_{i}": i for i in range(MAX_IGNORED_SERIES + 20)}
        status, _headers, _body = chat(server, "Hi", 1, **crowd)
        assert status == 200
        samples = scrape(server)
        assert value(samples, "allm_ignored_fields_total", endpoint=CHAT, field="client_metadata") == 2
        assert value(samples, "allm_ignored_fields_total", endpoint=CHAT, field="messages[].cache_hint") == 2
        series = [ls for (n, ls), _v in samples.items() if n == "allm_ignored_fields_total"]
        assert len(series) == MAX_IGNORED_SERIES + 1  # the cap, and "other"
        assert value(samples, "allm_ignored_fields_total", endpoint=CHAT, field="other") > 0
    lines = [
        line for line in log.read_text().splitlines() if "does not know" in line and "trace-ignored-0" in line
    ]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0]
    assert "client_metadata" in lines[0]
    assert "messages[0].cache_hint" in lines[0]
