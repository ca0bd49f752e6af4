"""allm serve vs stable-diffusion-cpp-python in one process: seconds per image.

    .venv/bin/python -m bench.image [--steps 4] [--rounds 5]

Side by side on the same files (the tiny random Flux the tests write: a 128-wide diffusion
model, CLIP-L and TAESD in q4_0), the same threads (every core), seed and steps, at 64x64 and
256x256:
  direct   StableDiffusion.generate_image in this process, then PNG encoding
  allm     `allm serve`, POST /v1/images/generations (b64_json PNG): the whole request, the
           worker process, the base64 answer
Rounds alternate the two; figures are medians.  The ratio is direct's time over allm's
(1.0 = as fast).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gateway import free_port, server
from tests.image_files import write_tiny_flux

SIZES = ((64, 64), (256, 256))


def direct_run(model: Any, width: int, height: int, steps: int) -> float:
    start = time.perf_counter()
    [image] = model.generate_image(
        prompt="a red cube", width=width, height=height, sample_steps=steps, cfg_scale=1.0, seed=7
    )
    image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - start


def allm_run(client: Any, width: int, height: int, steps: int) -> float:
    start = time.perf_counter()
    client.images.generate(
        model="flux", prompt="a red cube", size=f"{width}x{height}", extra_body={"steps": steps, "seed": 7}
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per image (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    from openai import OpenAI
    from stable_diffusion_cpp import StableDiffusion

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="allm-bench-image-") as tmp:
        work = Path(tmp)
        parts = write_tiny_flux(work / "flux")
        direct = StableDiffusion(
            diffusion_model_path=str(parts["diffusion_model"]),
            clip_l_path=str(parts["clip_l"]),
            taesd_path=str(parts["taesd"]),
            vae_decode_only=True,
            n_threads=threads,
            verbose=False,
        )
        config = work / "allm.toml"
        config.write_text(
            "[image]\nmax_width = 256\nmax_height = 256\n"
            f'[[models]]\nid = "flux"\nmodality = "image"\npath = "{parts["diffusion_model"]}"\n'
            f'options = {{ clip_l = "{parts["clip_l"]}", taesd = "{parts["taesd"]}", cfg_scale = 1.0 }}\n'
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
        times: dict[tuple[str, int], list[float]] = {}
        with server(cmd, port, "/ready"):
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            for width, height in SIZES:  # warm both: the first image loads the model
                allm_run(client, width, height, args.steps)
                direct_run(direct, width, height, args.steps)
            for _ in range(args.rounds):
                for width, height in SIZES:
                    times.setdefault(("direct", width), []).append(
                        direct_run(direct, width, height, args.steps)
                    )
                    times.setdefault(("allm", width), []).append(allm_run(client, width, height, args.steps))
    print(f"tiny Flux (q4_0), {args.steps} steps, {threads} threads, {args.rounds} rounds (medians)")
    print(f"{'size':>9} {'direct s':>9} {'allm s':>9} {'allm vs direct':>15}")
    for width, height in SIZES:
        d = statistics.median(times[("direct", width)])
        a = statistics.median(times[("allm", width)])
        print(f"{width}x{height:<5} {d:9.3f} {a:9.3f} {d / a:14.2f}x")


if __name__ == "__main__":
    main()
