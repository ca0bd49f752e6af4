"""/v1/audio/transcriptions and /v1/audio/translations on `allm serve`, driven by the official SDK.

The default catalog (no config file) serves whisper tiny.en beside SmolLM2, as the README's
example uses it; a second server has a catalog of its own for translation and the errors.
"""

from __future__ import annotations

import io
import json
import re
import signal
import threading

import numpy as np
import openai
import psutil
import pytest
import soundfile

from tests.integration.gateway_server import running_server
from tests.model_files import smollm2_path
from tests.waits import wait_for
from tests.whisper_files import speech_wav, tiny_en_source, write_tiny_whisper

pytestmark = pytest.mark.slow

SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
KEY_WORDS = ("quick", "fox", "lazy", "dog", "paris", "capital", "france")
TIMESTAMP = r"\d\d:\d\d:\d\d[,.]\d\d\d"


def missed(text: str) -> list[str]:
    return [w for w in KEY_WORDS if w not in text.lower()]


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> bytes:
    return speech_wav(tmp_path_factory.mktemp("speech") / "fox.wav", SENTENCE).read_bytes()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    with running_server("", tmp_path_factory.mktemp("default")) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(default_server):
    # closed at the end: a pooled connection left to the garbage collector is a ResourceWarning
    with openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def catalog_sdk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalog")
    multi = write_tiny_whisper(tmp / "multi.ggml", multilingual=True)
    config = (
        f"[server]\nmax_body_bytes = {2 * 1024 * 1024}\n"
        f'[[models]]\nid = "tiny.en"\nmodality = "audio"\npath = "{tiny_en_source()}"\n'
        f'[[models]]\nid = "multi"\nmodality = "audio"\npath = "{multi}"\n'
        f'[[models]]\nid = "smol"\npath = "{smollm2_path()}"\n'
    )
    with (
        running_server(config, tmp) as server,
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client,
    ):
        yield client


def test_the_default_catalog_lists_whisper_beside_the_text_model(sdk):
    models = {m.id: m for m in sdk.models.list().data}
    assert set(models) == {"smollm2-135m-instruct", "whisper-tiny.en"}
    assert models["whisper-tiny.en"].model_extra["modality"] == "audio"


def test_json_is_the_default_answer(sdk, wav):
    reply = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("fox.wav", wav))
    assert len(missed(reply.text)) <= 1, reply.text


def test_text_srt_and_vtt(sdk, wav):
    text = sdk.audio.transcriptions.create(
        model="whisper-tiny.en", file=("fox.wav", wav), response_format="text"
    )
    assert isinstance(text, str)
    assert len(missed(text)) <= 1
    srt = sdk.audio.transcriptions.create(
        model="whisper-tiny.en", file=("fox.wav", wav), response_format="srt"
    )
    cues = [c for c in srt.strip().split("\n\n") if c]
    assert len(cues) >= 2
    for n, cue in enumerate(cues, start=1):
        number, times, *lines = cue.split("\n")
        assert number == str(n)
        assert re.fullmatch(rf"{TIMESTAMP} --> {TIMESTAMP}", times)
        assert "," in times
        assert lines
    vtt = sdk.audio.transcriptions.create(
        model="whisper-tiny.en", file=("fox.wav", wav), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n")
    assert len(re.findall(rf"{TIMESTAMP} --> {TIMESTAMP}", vtt)) == len(cues)
    assert "," not in "".join(re.findall(TIMESTAMP, vtt))
    assert len(missed(vtt)) <= 1


def test_verbose_json_with_segments_and_words(sdk, wav):
    reply = sdk.audio.transcriptions.create(
        model="whisper-tiny.en",
        file=("fox.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert reply.language == "english"
    assert reply.duration == pytest.approx(len(soundfile.read(io.BytesIO(wav))[0]) / 22050, abs=0.1)
    assert len(missed(reply.text)) <= 1
    assert len(reply.segments) >= 2
    for seg in reply.segments:
        assert seg.start < seg.end
        assert seg.tokens
        assert seg.avg_logprob <= 0
        assert seg.compression_ratio > 0
        # whisper.cpp's own value, read past the binding (whisper_native.py): speech is unlikely silence
        assert isinstance(seg.no_speech_prob, float)
        assert 0 <= seg.no_speech_prob < 0.5
    assert len(reply.words) >= 12
    assert all(w.start <= w.end for w in reply.words)


def test_a_stream_sends_deltas_then_the_whole_text(sdk, wav):
    events = list(
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("fox.wav", wav), stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    assert set(kinds[:-1]) == {"transcript.text.delta"}
    assert len(kinds) >= 3
    assert "".join(e.delta for e in events[:-1]) == events[-1].text
    assert len(missed(events[-1].text)) <= 1


def test_other_formats_of_the_same_speech(sdk, wav):
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    for name, container, subtype in (("fox.mp3", "MP3", "MPEG_LAYER_III"), ("fox.ogg", "OGG", "OPUS")):
        out = io.BytesIO()
        target = 48000 if subtype == "OPUS" else rate
        import soxr

        soundfile.write(out, soxr.resample(samples, rate, target), target, format=container, subtype=subtype)
        reply = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=(name, out.getvalue()))
        assert len(missed(reply.text)) <= 1, (name, reply.text)


def test_silence_is_an_empty_transcript(sdk):
    out = io.BytesIO()
    soundfile.write(out, np.zeros(32000, dtype=np.float32), 16000, format="WAV")
    assert (
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("quiet.wav", out.getvalue())).text
        == ""
    )


def test_an_empty_file_is_a_400_in_openais_shape(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("empty.wav", b""))
    assert info.value.status_code == 400
    body = info.value.body if isinstance(info.value.body, dict) else {}
    error = body.get("error", body)
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_request",
        "file",
    )
    assert "empty (0 bytes)" in error["message"]


def test_translation_on_a_multilingual_model(catalog_sdk, wav):
    # openai 3.51 marks audio.translations deprecated (OpenAI's newer models do not translate)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        reply = catalog_sdk.audio.translations.create(
            model="multi", file=("fox.wav", wav), response_format="verbose_json"
        )
    assert reply.task == "translate"
    assert isinstance(reply.text, str)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        text = catalog_sdk.audio.translations.create(
            model="tiny.en", file=("fox.wav", wav), response_format="text"
        )
    assert len(missed(text)) <= 1  # English speech, translated to English, is itself


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda c, w: c.audio.transcriptions.create(model="nope", file=("a.wav", w)),
            (404, "model_not_found", "model"),
        ),
        (
            lambda c, w: c.audio.transcriptions.create(model="smol", file=("a.wav", w)),
            (400, "invalid_value", "model"),
        ),
        (
            lambda c, w: c.audio.transcriptions.create(model="tiny.en", file=("a.txt", b"plain text" * 50)),
            (400, "invalid_request", "file"),
        ),
        (
            lambda c, w: c.audio.transcriptions.create(model="tiny.en", file=("a.wav", w), temperature=3),
            (400, "invalid_value", "temperature"),
        ),
        (
            lambda c, w: c.audio.transcriptions.create(
                model="tiny.en", file=("a.wav", w), response_format="mp4"
            ),
            (400, "invalid_value", "response_format"),
        ),
        (
            lambda c, w: c.audio.transcriptions.create(model="tiny.en", file=("a.wav", w), language="fr"),
            (400, "invalid_request", "language"),
        ),
        (
            lambda c, w: c.audio.transcriptions.create(
                model="tiny.en", file=("a.wav", bytes(3 * 1024 * 1024))
            ),
            (413, "request_too_large", None),
        ),
    ],
)
def test_each_bad_request_gets_its_status_and_code_and_the_server_serves_on(catalog_sdk, wav, call, expected):
    status, code, param = expected
    with pytest.raises(openai.APIStatusError) as info:
        call(catalog_sdk, wav)
    assert info.value.status_code == status
    error = info.value.body if isinstance(info.value.body, dict) else {}
    error = error.get("error", error)
    assert error.get("code") == code
    if param is not None:
        assert error.get("param") == param
    assert (
        len(missed(catalog_sdk.audio.transcriptions.create(model="tiny.en", file=("a.wav", wav)).text)) <= 1
    )


def multipart(fields: dict[str, str], audio: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "allm-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    head = "".join(parts) + (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    )
    body = head.encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_the_audio_manager_killed_mid_transcription_gives_the_coded_error_and_comes_back(default_server, wav):
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    long = io.BytesIO()
    soundfile.write(long, np.tile(samples, 30), rate, format="WAV")  # three minutes of speech
    body, headers = multipart({"model": "whisper-tiny.en"}, long.getvalue())
    answer: list[tuple[int, bytes]] = []

    def post() -> None:
        status, _headers, data = default_server.request(
            "POST", "/v1/audio/transcriptions", raw=body, headers=headers
        )
        answer.append((status, data))

    def audio_manager() -> dict:
        return next(m for m in default_server.managers() if m["name"] == "audio#0")

    worker = threading.Thread(target=post)
    worker.start()
    before = wait_for(lambda: (m := audio_manager())["active"] and m, 30, "the transcription to run")
    psutil.Process(before["pid"]).send_signal(signal.SIGKILL)
    worker.join(60)
    [(status, data)] = answer
    assert status == 500
    error = json.loads(data)["error"]
    assert error["code"] == "internal"
    assert "SIGKILL" in error["message"]
    after = wait_for(  # the supervisor starts a new process
        lambda: (m := audio_manager())["state"] == "running" and m["pid"] != before["pid"] and m,
        30,
        "a new audio manager",
    )
    assert after["restarts"] == before["restarts"] + 1
    client = openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0)
    assert (
        len(missed(client.audio.transcriptions.create(model="whisper-tiny.en", file=("a.wav", wav)).text))
        <= 1
    )
