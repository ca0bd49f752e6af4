"""Uploaded audio → 16 kHz mono float32, the only input whisper.cpp takes; no ffmpeg.

libsndfile (through ``soundfile``) reads WAV, FLAC, OGG/Vorbis, Opus and MP3 from the
uploaded bytes; ``soxr`` resamples.  The file is decoded block by block, each block mixed
down and resampled as it comes, into one output array: at no point is the whole recording
held at its original rate or channel count beside the result.  This runs in the manager,
not the gateway, so a hostile file that upsets a decoder can only cost a manager restart.
"""

from __future__ import annotations

import io
import math

import numpy as np
import soundfile
import soxr

from allm.kernel.codes import UnsupportedError

SAMPLE_RATE = 16_000
BLOCK_FRAMES = 64 * 1024
MAX_SECONDS = 4 * 3600  # what one request may hold: 4 h at 16 kHz is 0.9 GB of float32
ACCEPTED = "WAV, FLAC, OGG/Vorbis, Opus and MP3"
SILENCE = 1e-4  # peak amplitude below which a recording is silent (about -80 dBFS)


def _unreadable(cause: str) -> UnsupportedError:
    return UnsupportedError(
        f"could not read the audio file: {cause}; allm reads {ACCEPTED}",
        reason="invalid_request",
        param="file",
    )


def decode(data: bytes, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """The recording as float32 samples at 16 kHz, mono; an empty upload is refused, as OpenAI does."""
    if not data:
        raise UnsupportedError(
            f"the audio file is empty (0 bytes); allm reads {ACCEPTED}",
            reason="invalid_request",
            param="file",
        )
    try:
        source = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _unreadable(str(exc).strip() or type(exc).__name__) from None
    with source:
        rate, frames = source.samplerate, source.frames
        if rate <= 0:
            raise _unreadable(f"it declares a sample rate of {rate}")
        if frames > max_seconds * rate:
            raise UnsupportedError(
                f"the audio is {frames / rate / 60:.0f} minutes long; one request may hold at most "
                f"{max_seconds / 60:.0f} minutes",
                reason="invalid_request",
                param="file",
            )
        # Room for the whole result at once; a stream that holds more than its header said grows it.
        out = np.empty(math.ceil(max(frames, 0) * SAMPLE_RATE / rate) + 1024, dtype=np.float32)
        resampler = (
            None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        )
        filled = 0

        def put(samples: np.ndarray) -> None:
            nonlocal out, filled
            if filled + samples.size > out.size:
                if filled + samples.size > max_seconds * SAMPLE_RATE:
                    raise UnsupportedError(
                        f"the audio runs past {max_seconds / 60:.0f} minutes, the most one request may hold",
                        reason="invalid_request",
                        param="file",
                    )
                out = np.resize(out, max(out.size * 2, filled + samples.size))
            out[filled : filled + samples.size] = samples
            filled += samples.size

        try:
            for block in source.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True):
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                put(mono if resampler is None else resampler.resample_chunk(mono, last=False))
            if resampler is not None:
                put(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
            raise _unreadable(f"the data is damaged ({str(exc).strip()})") from None
    samples = out[:filled]
    np.nan_to_num(samples, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples


def is_silent(samples: np.ndarray) -> bool:
    """Nothing to transcribe: no samples, or none louder than about -80 dBFS."""
    return samples.size == 0 or float(np.max(np.abs(samples))) < SILENCE
