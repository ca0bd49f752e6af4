"""Two text hosts vs one behind a gateway: aggregate tokens/s, side by side in one run.

    .venv/bin/python -m bench.multihost [--streams N] [--tokens N] [--rounds N] [--threads N]

Each host is a network namespace joined by a veth link (tests/multihost/hosts.py; loopback
addresses where namespaces cannot be made) running `allm manager text --bind tcp://…` with
CURVE. Two gateways (`allm serve`, no local text manager) run at once: one routes to host 0
only, the other to hosts 0 and 1; rounds alternate between them. Every host shares this
machine's cores, so the ratio shows what the routing spreads, at `--threads` engine threads
a host, not what two machines would add.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.gateway_server import Server, running_server
from tests.model_files import smollm2_path
from tests.multihost.hosts import ALLM, Hosts

MODEL = "smol"


def one_round(server: Server, streams: int, tokens: int) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
        "max_tokens": tokens,
        "temperature": 0,
    }

    def ask(_: int) -> int:
        status, _headers, data = server.request("POST", "/v1/chat/completions", body)
        assert status == 200, data
        return int(json.loads(data)["usage"]["completion_tokens"])

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        made = sum(pool.map(ask, range(streams)))
    return time.monotonic() - started, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--streams", type=int, default=4, help="concurrent requests a round")
    parser.add_argument("--tokens", type=int, default=96, help="max_tokens of each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of each host's engine")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="allm-bench-hosts-"))
    keys = tmp / "keys"
    for name in ("gateway", "host-0", "host-1"):
        subprocess.run([str(ALLM), "keys", name, "--dir", str(keys)], check=True, capture_output=True)
    options = f"{{ n_threads = {args.threads} }}"
    model = f'\n[[models]]\nid = "{MODEL}"\npath = "{smollm2_path()}"\noptions = {options}\n'
    with Hosts(2) as hosts, contextlib.ExitStack() as stack:
        remotes = []
        for host in hosts:
            data = tmp / f"host-{host.index}"
            data.mkdir()
            (data / "host.toml").write_text(f'[server]\ndata_dir = "{data}"\n{model}')
            endpoint = host.start_manager(
                data / "host.toml", keys / f"host-{host.index}.key_secret", keys / "gateway.key", data / "log"
            )
            remotes.append(f'{{ endpoint = "{endpoint}", public_key = "{keys}/host-{host.index}.key" }}')
        gateways = {}
        for label, chosen in (("1 host", remotes[:1]), ("2 hosts", remotes)):
            where = tmp / label.replace(" ", "-")
            where.mkdir()
            config = (
                f'[server]\ndata_dir = "{where}"\ncurve_secret_key = "{keys}/gateway.key_secret"\n\n'
                f"[text]\ninstances = 0\nremote = [{', '.join(chosen)}]\n{model}"
            )
            gateways[label] = stack.enter_context(running_server(config, where))
        for server in gateways.values():  # warm: every host has the model loaded
            one_round(server, args.streams, 8)
        rates: dict[str, list[float]] = {label: [] for label in gateways}
        for _ in range(args.rounds):
            for label, server in gateways.items():
                seconds, made = one_round(server, args.streams, args.tokens)
                rates[label].append(made / seconds)
        kind = "network namespaces + veth" if hosts.real else "loopback addresses"
    print(
        f"aggregate tokens/s, {args.streams} concurrent requests of {args.tokens} tokens, "
        f"SmolLM2-135M Q4_1, {args.threads} engine thread(s) a host, {args.rounds} rounds (median)"
    )
    one = statistics.median(rates["1 host"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"  {label:8} {rate:8.1f} tok/s   {rate / one:5.2f}×")
    print(f"(hosts: {kind} on this machine, {os.cpu_count()} cores shared; python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
