"""Audio decoding to whisper's input (16 kHz mono float32), and the language table."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from allm.kernel.codes import Code, UnsupportedError
from allm.managers.audio.decode import SAMPLE_RATE, decode, is_silent
from allm.managers.audio.languages import LANGUAGES
from allm.managers.audio.whisper_engine import compression_ratio


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def written(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 16000, 1),
        ("WAV", "FLOAT", 44100, 2),
        ("FLAC", "PCM_24", 22050, 1),
        ("OGG", "VORBIS", 32000, 2),
        ("OGG", "OPUS", 48000, 1),
        ("MP3", "MPEG_LAYER_III", 44100, 2),
    ],
)
def test_every_accepted_format_becomes_16_khz_mono_of_the_same_length(fmt, subtype, rate, channels):
    samples = decode(written(tone(2.0, rate, channels), rate, fmt, subtype))
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    # Lossy codecs pad a little at the edges; the length is the duration at 16 kHz.
    assert abs(samples.size - 2 * SAMPLE_RATE) < 0.06 * SAMPLE_RATE
    assert 0.3 < float(np.max(np.abs(samples))) <= 1.0


def test_decoding_in_blocks_equals_decoding_at_once():
    import soxr

    rate = 44100
    signal = tone(5.0, rate)  # several blocks of the decoder
    whole = soxr.resample(signal, rate, SAMPLE_RATE)
    blocks = decode(written(signal, rate, "WAV", "FLOAT"))
    assert blocks.size == whole.size
    assert np.max(np.abs(blocks - whole)) < 1e-3


def test_an_empty_upload_is_refused_naming_the_file():
    with pytest.raises(UnsupportedError) as info:
        decode(b"")
    assert (info.value.reason, info.value.param) == ("invalid_request", "file")
    assert "empty (0 bytes)" in info.value.message


def test_a_recording_without_samples_and_silence_are_silent():
    assert is_silent(decode(written(np.zeros(0, dtype=np.float32), 16000)))
    assert is_silent(decode(written(np.zeros(16000, dtype=np.float32), 16000)))
    assert not is_silent(decode(written(tone(1.0, 16000), 16000)))


@pytest.mark.parametrize(
    "data",
    [
        b"plain text, not audio" * 50,
        b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(100),  # a WAV header that says nothing usable
        b"fLaC" + bytes(300),
        b"\xff\xfb" + bytes(20),  # an MP3 frame sync and no frame
    ],
)
def test_what_it_cannot_read_is_refused_naming_the_formats_it_reads(data):
    with pytest.raises(UnsupportedError) as info:
        decode(data)
    assert info.value.code is Code.UNSUPPORTED
    assert (info.value.reason, info.value.param) == ("invalid_request", "file")
    assert "WAV, FLAC, OGG/Vorbis, Opus and MP3" in info.value.message


def test_a_recording_longer_than_a_request_may_hold_is_refused():
    with pytest.raises(UnsupportedError, match="at most 0 minutes"):
        decode(written(tone(2.0, 16000), 16000), max_seconds=1.0)


def test_non_finite_samples_are_cleaned():
    samples = tone(1.0, 16000)
    samples[100:110] = np.nan
    samples[200] = np.inf
    out = decode(written(samples, 16000, "WAV", "FLOAT"))
    assert np.isfinite(out).all()
    assert float(np.max(np.abs(out))) <= 1.0


def test_compression_ratio_is_whispers():
    assert compression_ratio("") == 0.0
    assert compression_ratio("ab" * 200) > compression_ratio("The quick brown fox.")


def test_the_languages_table_is_whisper_cpps():
    import _pywhispercpp as pw

    assert list(LANGUAGES) == [pw.whisper_lang_str(i) for i in range(pw.whisper_lang_max_id() + 1)]
    assert (LANGUAGES["en"], LANGUAGES["fr"], LANGUAGES["yue"]) == ("english", "french", "cantonese")
