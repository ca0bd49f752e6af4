"""Two text-manager hosts and a gateway: shared traffic, a host killed or cut off under load, rejoining.

The hosts are network namespaces joined by veth links (tests/multihost/hosts.py), each
running `allm manager text --bind tcp://…` with CURVE; the gateway is `allm serve` with
no text manager of its own, only the two remote ones. Nothing here is mocked. Without
namespaces (outside CI only) the hosts are loopback addresses and the cut-link test skips;
each test records which (the `hosts` property), and the run's summary says so.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess

import pytest

from allm.kernel.codes import Code
from tests.integration.gateway_server import running_server
from tests.integration.test_metrics_logs import scrape, value
from tests.model_files import smollm2_path
from tests.waits import wait_for

from .hosts import ALLM, Hosts

MODEL = "smol"
HEARTBEAT_TIMEOUT_S = 2.0
#: what the fault table answers for a host's death or silence (a crash is INTERNAL there)
FAULT_CODES = frozenset(c.name.lower() for c in Code if c is not Code.OK) | {"manager_failed"}


def catalog(ids) -> str:
    # One engine thread each: the hosts share this machine's two cores, and engines that
    # together ask for more threads than there are cores slow each other many times over.
    return "".join(
        f'\n[[models]]\nid = "{i}"\npath = "{smollm2_path()}"\noptions = {{ n_threads = 1 }}\n' for i in ids
    )


@pytest.fixture
def cluster(tmp_path, record_property):
    with make_cluster(tmp_path, [[MODEL], [MODEL]], record_property) as made:
        yield made


@contextlib.contextmanager
def make_cluster(tmp_path, host_models, record_property):
    """Hosts with these catalogs, and a gateway whose catalog is all of them."""
    keys = tmp_path / "keys"
    for name in ("gateway", *(f"host-{i}" for i in range(len(host_models)))):
        subprocess.run([str(ALLM), "keys", name, "--dir", str(keys)], check=True, capture_output=True)
    model = catalog(dict.fromkeys(i for ids in host_models for i in ids))
    with Hosts(len(host_models)) as hosts:
        record_property("hosts", hosts.mode)
        remotes = []
        for host in hosts:
            data = tmp_path / f"host-{host.index}"
            data.mkdir()
            config = data / "host.toml"
            config.write_text(f'[server]\ndata_dir = "{data}"\n{catalog(host_models[host.index])}')
            endpoint = host.start_manager(
                config, keys / f"host-{host.index}.key_secret", keys / "gateway.key", data / "manager.log"
            )
            remotes.append(f'{{ endpoint = "{endpoint}", public_key = "{keys}/host-{host.index}.key" }}')
        gateway = (
            f'[server]\ndata_dir = "{tmp_path}"\ncurve_secret_key = "{keys}/gateway.key_secret"\n'
            f"heartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n\n"
            f"[text]\ninstances = 0\nremote = [{', '.join(remotes)}]\n{model}"
        )
        with running_server(gateway, tmp_path, log=tmp_path / "gateway.log") as server:
            # /ready needs one live instance of the modality: wait for every host's
            wait_for(
                lambda: len([m for m in server.managers() if m["live"]]) == len(host_models),
                60,
                "every host to be heard from",
            )
            yield server, hosts


def managers(server):
    return {m["endpoint"]: m for m in server.managers()}


def finished(host) -> int:
    """The chat requests this host's manager finished (its log's per-request lines)."""
    return sum("finished op=chat" in line for line in host.log.read_text().splitlines())


def finished_when_idle(server, host) -> int:
    """``finished`` once the host runs nothing (a request leaves ``active`` after its line)."""
    wait_for(lambda: managers(server)[host.endpoint]["active"] == 0, 30, f"{host.endpoint} to be idle")
    return finished(host)


def served(hosts, expected) -> None:
    """Each host's ``finished`` count becomes ``expected``: a manager logs a request just after
    sending its reply, so the count may trail the reply by a moment."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: [finished(h) for h in hosts] == expected, 10, "the hosts' counts")
    assert [finished(h) for h in hosts] == expected


def chat(server, max_tokens: int = 40, content: str = "Write a long essay about mountains."):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    status, _headers, data = server.request("POST", "/v1/chat/completions", body)
    return status, json.loads(data)


def assert_success_or_coded(outcomes):
    """Each request ended with success or a coded error of the fault table: none lost."""
    for status, body in outcomes:
        if status == 200:
            assert body["choices"][0]["message"]["content"]
        else:
            assert status in (500, 503, 504), (status, body)
            assert body["error"]["code"] in FAULT_CODES, body


def load(server, n: int, max_tokens: int = 40, content: str = "Write a long essay about mountains."):
    """Start n requests at once; returns their futures."""
    pool = concurrent.futures.ThreadPoolExecutor(n)
    futures = [pool.submit(chat, server, max_tokens, content) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


def test_the_two_hosts_share_the_traffic(cluster):
    server, hosts = cluster
    status = managers(server)
    assert {hosts[0].endpoint, hosts[1].endpoint} <= set(status)
    assert all(m["live"] and m["remote"] for m in status.values())
    outcomes = [f.result(120) for f in load(server, 6)]
    assert [s for s, _ in outcomes] == [200] * 6
    wait_for(lambda: sum(finished(host) for host in hosts) == 6, 10, "six requests logged")
    shares = [finished(host) for host in hosts]
    assert min(shares) >= 2, shares  # least outstanding work first: both took a share
    samples = scrape(server)
    for host in hosts:
        name = f"text@{host.endpoint.removeprefix('tcp://')}"
        assert value(samples, "allm_manager_up", manager=name, modality="text") == 1
        assert (
            value(
                samples,
                "allm_manager_info",
                manager=name,
                modality="text",
                endpoint=host.endpoint,
                remote="true",
            )
            == 1
        )
        assert value(samples, "allm_model_loaded", manager=name, model=MODEL) == 1


def test_a_host_killed_under_load_loses_no_request_and_rejoins(cluster):
    server, hosts = cluster
    victim, other = hosts[0], hosts[1]
    futures = load(server, 6, max_tokens=120)
    wait_for(lambda: managers(server)[victim.endpoint]["active"] > 0, 60, "the victim to be busy")
    victim.manager.send_signal(signal.SIGKILL)
    outcomes = [f.result(120) for f in futures]
    assert_success_or_coded(outcomes)
    assert any(s != 200 for s, _ in outcomes)  # what ran on the victim ended with its code
    assert any(s == 200 for s, _ in outcomes)  # the other host went on
    wait_for(lambda: not managers(server)[victim.endpoint]["live"], 30, "the victim to leave the rotation")
    before = finished_when_idle(server, other)
    assert [chat(server, 5)[0] for _ in range(3)] == [200] * 3
    served([other], [before + 3])
    # Brought back (as supervisord would), it rejoins and gets work again.
    victim.stop_manager()
    assert victim.started_with is not None
    victim.start_manager(*victim.started_with)
    wait_for(lambda: managers(server)[victim.endpoint]["live"], 60, "the victim to rejoin")
    before = finished_when_idle(server, victim)
    outcomes = [f.result(120) for f in load(server, 4, max_tokens=30)]
    assert [s for s, _ in outcomes] == [200] * 4
    wait_for(lambda: finished(victim) > before, 10, "the victim to serve again")


def test_a_host_cut_off_under_load_loses_no_request_and_rejoins_when_its_link_returns(cluster):
    server, hosts = cluster
    if not hosts.real:  # a stopped manager would be another fault than a cut link
        pytest.skip(f"a cut link needs network namespaces; this run has {hosts.mode}")
    cut, other = hosts[1], hosts[0]
    futures = load(server, 6, max_tokens=200)
    wait_for(lambda: managers(server)[cut.endpoint]["active"] > 0, 60, "the host to be busy")
    hosts.cut(cut)
    outcomes = [f.result(120) for f in futures]
    assert_success_or_coded(outcomes)
    failed = [body["error"]["code"] for s, body in outcomes if s != 200]
    assert failed, "the requests running behind the cut link must end"
    assert set(failed) <= {"timeout"}, failed  # its heartbeats stopped: TIMEOUT, per the fault table
    wait_for(lambda: not managers(server)[cut.endpoint]["live"], 30, "the cut host to leave the rotation")
    before = finished_when_idle(server, other)
    assert [chat(server, 5)[0] for _ in range(3)] == [200] * 3
    served([other], [before + 3])
    hosts.restore(cut)
    wait_for(lambda: managers(server)[cut.endpoint]["live"], 60, "the cut host to rejoin")
    before = finished_when_idle(server, cut)
    outcomes = [f.result(120) for f in load(server, 4, max_tokens=30)]
    assert [s for s, _ in outcomes] == [200] * 4
    wait_for(lambda: finished(cut) > before, 10, "the cut host to serve again")


def chat_model(server, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    return server.request("POST", "/v1/chat/completions", body)[0]


def respond(server, **fields):
    body = {"model": MODEL, "max_output_tokens": 8, "temperature": 0, "store": True, **fields}
    status, _headers, data = server.request("POST", "/v1/responses", body)
    assert status == 200, data
    return json.loads(data)


def test_a_continued_conversation_goes_back_to_the_host_that_holds_its_prefix(cluster):
    server, hosts = cluster
    first, second = hosts[0], hosts[1]
    # Both hosts get the model loaded (two at once go one to each).
    assert [f.result(120)[0] for f in load(server, 2, max_tokens=4)] == [200, 200]
    assert all(m["models"] == [MODEL] for m in managers(server).values())
    # Keep the first host busy, so the conversation starts on the second one. A conversation of
    # its own: the essays above made the second host the home of theirs, and a tie goes home.
    busy = load(server, 1, max_tokens=300, content="Write a long essay about rivers.")
    wait_for(lambda: managers(server)[first.endpoint]["active"] > 0, 60, "the first host to be busy")
    before = finished(second)
    opened = respond(server, input="My name is Ada. Remember it.")
    served([second], [before + 1])
    busy[0].result(120)
    # Both idle now: with no preference the tie would go to the first host.
    wait_for(lambda: all(m["active"] == 0 for m in managers(server).values()), 30, "both hosts idle")
    previous = opened["id"]
    counts = [finished(host) for host in hosts]
    for _ in range(3):
        previous = respond(server, input="What is my name?", previous_response_id=previous)["id"]
    served(hosts, [counts[0], counts[1] + 3])


def test_a_model_goes_only_to_the_hosts_whose_catalog_has_it(tmp_path, record_property):
    with make_cluster(tmp_path, [["only-a"], ["only-b"]], record_property) as (server, hosts):
        wait_for(lambda: all(m["live"] for m in managers(server).values()), 30, "both hosts to be heard")
        counts = [finished(host) for host in hosts]
        # Idle hosts: a tie would go to the first, which does not have "only-b".
        assert [chat_model(server, m) for m in ("only-b", "only-a", "only-b")] == [200] * 3
        served(hosts, [counts[0] + 1, counts[1] + 2])
