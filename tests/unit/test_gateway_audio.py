"""The audio endpoints' edge: the SDK's form read, each refusal naming its field, every format exactly.

No server: the openai SDK runs against an httpx transport that hands its request to the
gateway's form reader and answers with the gateway's rendering, so both directions are
the SDK's own bytes and the SDK's own parsing.
"""

from __future__ import annotations

import dataclasses
import json

import httpx2
import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.audio import (
    Transcription,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    Translation,
    TranslationVerbose,
)

from allm.gateway import openapi
from allm.gateway.audio import schema as api
from allm.gateway.audio.form import MAX_PARTS, read_form
from allm.gateway.audio.handlers import (
    TextDeltas,
    cue_text,
    manager_params,
    render,
    srt,
    timestamp,
    verbose_json,
    vtt,
)
from allm.gateway.config import ModelConfig
from allm.gateway.config_read import load
from allm.gateway.errors import ApiError, describe

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
WAV = b"RIFF\x24\x00\x00\x00WAVE\r\n--b0undar\r\n\r\n--\r\n"  # framing-like bytes inside the file


def multipart(*fields: tuple[str, str | bytes], filename: str | None = "speech.wav") -> bytes:
    """A body as curl -F writes it: the field named file as a file part, the others as text parts."""
    out = b""
    for name, value in fields:
        data = value.encode() if isinstance(value, str) else value
        disposition = f'form-data; name="{name}"'
        if name == "file" and filename is not None:
            disposition += f'; filename="{filename}"\r\nContent-Type: audio/wav'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def transcription(*fields: tuple[str, str | bytes]) -> dict:
    return read_form(
        multipart(("file", WAV), ("model", "whisper"), *fields), CONTENT_TYPE, api.TRANSCRIPTIONS
    )


def refused(body: bytes, content_type: str | None = CONTENT_TYPE, node=api.TRANSCRIPTIONS) -> ApiError:
    with pytest.raises(ApiError) as info:
        read_form(body, content_type, node)
    assert info.value.status == 400
    return info.value


BASE = [("file", WAV), ("model", "w")]


def refused_field(*fields: tuple[str, str | bytes], node=api.TRANSCRIPTIONS) -> ApiError:
    error = refused(multipart(*fields), node=node)
    assert error.code == "invalid_value"
    return error


# -- the form ------------------------------------------------------------------------------------


class Sdk:
    """The openai SDK over a transport that is the gateway's edge, without a server.

    Its request goes through ``read_form``; the answer is ``render`` of ``data`` (the
    manager's result) for the form it read, or the event stream given, or the error the
    edge raised, in the shape errors.describe gives every error.
    """

    def __init__(self, data: dict | None = None, *, stream: str | None = None) -> None:
        self.forms: list[dict] = []

        def handle(request: httpx2.Request) -> httpx2.Response:
            request.read()
            translating = request.url.path.endswith("/translations")
            node = api.TRANSLATIONS if translating else api.TRANSCRIPTIONS
            try:
                form = read_form(request.content, request.headers.get("content-type"), node)
            except ApiError as exc:
                status, payload, _headers = describe(exc)
                return httpx2.Response(status, json=payload)
            self.forms.append(form)
            if stream is not None:
                return httpx2.Response(
                    200, content=stream.encode(), headers={"content-type": "text/event-stream"}
                )
            response = render(
                {**(data or RESULT), "task": "translate" if translating else "transcribe"}, form
            )
            headers = {"content-type": response.content_type}
            return httpx2.Response(response.status, content=response.body, headers=headers)

        self.client = OpenAI(
            base_url="http://allm.test/v1",
            api_key="unused",
            http_client=httpx2.Client(transport=httpx2.MockTransport(handle)),
            max_retries=0,
        )
        self.transcribe = self.client.audio.transcriptions.create

    def translate(self, **kwargs):
        # openai 3.51 marks the translations endpoint deprecated (with whisper-1); it still works
        with pytest.warns(DeprecationWarning, match="deprecated"):
            return self.client.audio.translations.create(**kwargs)


def test_the_sdks_transcription_form_reads_as_every_field_it_sent():
    sdk = Sdk()
    sdk.transcribe(
        file=("speech.wav", WAV),
        model="whisper",
        language="en",
        prompt="Paris, Lyon.",
        response_format="verbose_json",
        temperature=0.2,
        timestamp_granularities=["segment", "word"],
        stream=False,
    )
    [form] = sdk.forms
    assert form == {
        "file": WAV,
        "model": "whisper",
        "language": "en",
        "prompt": "Paris, Lyon.",
        "response_format": "verbose_json",
        "temperature": 0.2,
        "timestamp_granularities[]": ["segment", "word"],
        "stream": False,
    }
    assert manager_params(form, "transcribe") == {
        "task": "transcribe",
        "language": "en",
        "prompt": "Paris, Lyon.",
        "temperature": 0.2,
        "words": True,
        "stream": False,
    }


def test_the_sdks_translation_form_reads_as_every_field_it_sent():
    sdk = Sdk()
    sdk.translate(
        file=("speech.mp3", b"ID3"), model="whisper", prompt="", response_format="srt", temperature=1
    )
    [form] = sdk.forms
    assert form == {
        "file": b"ID3",
        "model": "whisper",
        "prompt": "",
        "response_format": "srt",
        "temperature": 1,
    }
    assert manager_params(form, "translate") == {
        "task": "translate",
        "language": None,
        "prompt": None,
        "temperature": 1.0,
        "words": False,
        "stream": False,
    }


def test_a_tiny_temperature_the_sdk_writes_with_an_exponent_is_a_number():
    sdk = Sdk()
    sdk.transcribe(file=("a.wav", WAV), model="whisper", temperature=0.00001)
    assert sdk.forms[0]["temperature"] == 0.00001


def test_the_defaults_left_out_of_a_form_reach_the_manager_as_its_contract_says():
    assert manager_params(transcription(), "transcribe") == {
        "task": "transcribe",
        "language": None,
        "prompt": None,
        "temperature": 0.0,
        "words": False,
        "stream": False,
    }


def test_a_file_holding_crlf_dashes_and_a_boundary_prefix_arrives_byte_for_byte():
    assert transcription()["file"] == WAV


def test_an_empty_file_is_let_through_for_the_manager_to_answer():
    form = read_form(multipart(("file", b""), ("model", "whisper")), CONTENT_TYPE, api.TRANSCRIPTIONS)
    assert form["file"] == b""


def test_a_file_part_without_a_file_name_is_still_the_audio():
    body = multipart(("model", "whisper"), ("file", WAV), filename=None)
    assert read_form(body, CONTENT_TYPE, api.TRANSCRIPTIONS)["file"] == WAV


def test_a_preamble_an_epilogue_and_a_quoted_boundary_are_read_as_rfc_2046_says():
    body = b"a preamble\r\n" + multipart(("file", WAV), ("model", "whisper")) + b"an epilogue"
    form = read_form(body, f'Multipart/Form-Data; boundary="{BOUNDARY}"', api.TRANSCRIPTIONS)
    assert form == {"file": WAV, "model": "whisper"}


@pytest.mark.parametrize(
    ("content_type", "says"),
    [
        (None, "the Content-Type is none"),
        ("application/json", "the Content-Type is 'application/json'"),
        ("application/x-www-form-urlencoded", "must be multipart/form-data"),
        ("multipart/form-data", "needs a boundary"),
        ("multipart/form-data; boundary=" + "x" * 71, "needs a boundary"),
    ],
)
def test_a_body_that_is_not_multipart_form_data_is_refused(content_type, says):
    error = refused(multipart(("file", WAV), ("model", "whisper")), content_type)
    assert (error.code, error.param) == ("invalid_request", None)
    assert says in error.message


def part(head: str) -> bytes:
    """A body of one part with these header lines (latin-1, so a test can send any byte)."""
    return f"--{BOUNDARY}\r\n{head}\r\n\r\nx\r\n--{BOUNDARY}--".encode("latin-1")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "holds no part"),
        (b'{"model": "whisper"}', "holds no part"),
        (multipart(("model", "whisper"))[:-20], "never ends"),
        (multipart(("model", "whisper"))[:-4], "malformed after part 1"),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=model".encode(), "no end to its headers"),
        (f"--{BOUNDARY}junk\r\n".encode(), "malformed after part 0"),
        (part(""), "part 1 of the form has no field name"),
        (part('Content-Disposition: form-data; name=""'), "part 1 of the form has no field name"),
        (part("Content-Disposition: attachment; name=a"), "not form-data"),
        (part("no colon here"), "without a colon"),
        (part("X: \xff"), "the headers of part 1 of the form are not UTF-8"),
        (multipart(*[("prompt", "x")] * (MAX_PARTS + 1)), f"more than {MAX_PARTS} parts"),
    ],
)  # fmt: skip
def test_a_body_that_breaks_the_multipart_framing_is_refused_not_guessed_at(body, says):
    error = refused(body)
    assert (error.code, error.param) == ("invalid_request", None)
    assert says in error.message


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ([("model", "whisper")], "file", "'file' is required"),
        ([("file", WAV)], "model", "'model' is required"),
        ([("file", WAV), ("model", "")], "model", "1 to 256 characters"),
        ([*BASE, ("model", "v")], "model", "given more than once"),
        ([("file", WAV), ("file", WAV), ("model", "w")], "file", "given more than once"),
        ([*BASE, ("temperature", "hot")], "temperature", "must be a number, got a string"),
        ([*BASE, ("temperature", ".5")], "temperature", "must be a number"),
        ([*BASE, ("temperature", "NaN")], "temperature", "must be a number"),
        ([*BASE, ("temperature", "1.5")], "temperature", "from 0 to 1, got 1.5"),
        ([*BASE, ("temperature", "9" * 400)], "temperature", "from 0 to 1, got inf"),
        ([*BASE, ("temperature", "")], "temperature", "must be a number"),
        ([*BASE, ("stream", "yes")], "stream", "must be a boolean"),
        ([*BASE, ("stream", "True")], "stream", "must be a boolean"),
        ([*BASE, ("stream", "1")], "stream", "must be a boolean"),
        ([*BASE, ("response_format", "xml")], "response_format", "must be one of"),
        ([*BASE, ("response_format", "diarized_json")], "response_format", "one of"),
        ([*BASE, ("language", "english")], "language", "2 to 3 characters"),
        ([*BASE, ("language", "EN")], "language", "must match"),
        ([*BASE, ("timestamp_granularities[]", "char")],
         "timestamp_granularities[][0]", "must be one of ['segment', 'word']"),
        ([*BASE, *[("timestamp_granularities[]", "word")] * 3,
          ("response_format", "verbose_json")], "timestamp_granularities[]", "0 to 2 items"),
        ([*BASE, ("timestamp_granularities[]", "word")],
         "timestamp_granularities[]", "word timestamps need response_format verbose_json, not 'json'"),
        ([*BASE, ("timestamp_granularities[]", "word"), ("response_format", "srt")],
         "timestamp_granularities[]", "not 'srt'"),
        ([*BASE, ("stream", "true"), ("response_format", "verbose_json")],
         "stream", "a stream carries text: response_format json or text, not 'verbose_json'"),
        ([*BASE, ("stream", "true"), ("response_format", "vtt")], "stream", "not 'vtt'"),
        ([*BASE, ("prompt", b"\xff\xfe")], "prompt", "must be UTF-8 text"),
        ([*BASE, ("prompt", "p" * 8193)], "prompt", "0 to 8192 characters"),
    ],
)  # fmt: skip
def test_each_bad_transcription_field_is_refused_naming_it(fields, param, says):
    error = refused_field(*fields)
    assert error.param == param
    assert says in error.message


@pytest.mark.parametrize(
    ("node", "field", "value"),
    [
        (api.TRANSCRIPTIONS, "user", "u"),
        (api.TRANSCRIPTIONS, "include[]", "logprobs"),
        (api.TRANSLATIONS, "language", "en"),
        (api.TRANSLATIONS, "stream", "true"),
        (api.TRANSLATIONS, "timestamp_granularities[]", "segment"),
    ],
)
def test_a_form_field_allm_does_not_know_is_ignored_and_noted(node, field, value):
    from allm.gateway.spec import IGNORED

    noted: list[str] = []
    token = IGNORED.set(noted)
    try:
        form = read_form(multipart(("file", WAV), ("model", "w"), (field, value)), CONTENT_TYPE, node)
    finally:
        IGNORED.reset(token)
    assert field.removesuffix("[]") not in form
    assert field not in form
    assert noted == [field]


@pytest.mark.parametrize(
    "fields",
    [
        [("stream", "true")],
        [("stream", "true"), ("response_format", "text")],
        [("stream", "false"), ("response_format", "srt")],
        [("timestamp_granularities[]", "word"), ("response_format", "verbose_json")],
        # OpenAI takes segment granularity with any format (it changes nothing there)
        [("timestamp_granularities[]", "segment"), ("response_format", "json")],
        [("temperature", "0")],
        [("temperature", "1")],
        [("temperature", "1e-05")],
        [("language", "haw"), ("prompt", "")],
    ],
)
def test_a_transcription_openai_accepts_is_accepted(fields):
    transcription(*fields)


# -- rendering -----------------------------------------------------------------------------------


def segment(i: int, start: float, end: float, text: str) -> dict:
    return {
        "id": i,
        "seek": int(start * 100),
        "start": start,
        "end": end,
        "text": text,
        "tokens": [50364 + i, 440],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 1.5,
        "no_speech_prob": 0.01,
    }


RESULT = {
    "task": "transcribe",
    "language": "english",
    "duration": 3601.25,
    "text": "Hello there. See you in an hour.",
    "segments": [
        segment(0, 0.0, 2.5, " Hello there."),
        segment(1, 3599.9996, 3601.2, " See you in an hour."),
    ],
    "words": [
        {"word": "Hello", "start": 0.0, "end": 0.4},
        {"word": "there.", "start": 0.5, "end": 2.5},
        {"word": "See", "start": 3599.9996, "end": 3600.2},
    ],
}


def test_srt_is_one_numbered_cue_per_segment():
    assert srt(RESULT["segments"]) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n01:00:00,000 --> 01:00:01,200\nSee you in an hour.\n\n"
    )


def test_vtt_is_the_header_then_one_cue_per_segment():
    assert vtt(RESULT["segments"]) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
        "01:00:00.000 --> 01:00:01.200\nSee you in an hour.\n\n"
    )


def test_no_segments_is_an_empty_srt_and_a_bare_vtt():
    assert srt([]) == ""
    assert vtt([]) == "WEBVTT\n\n"


def test_a_segment_without_text_makes_no_cue_and_the_numbers_stay_consecutive():
    segments = [
        segment(0, 0, 1, " "),
        segment(1, 1, 2, " One."),
        segment(2, 2, 3, "\n"),
        segment(3, 3, 4, "Two"),
    ]
    assert (
        srt(segments) == "1\n00:00:01,000 --> 00:00:02,000\nOne.\n\n2\n00:00:03,000 --> 00:00:04,000\nTwo\n\n"
    )


def test_a_cue_never_holds_a_blank_line_or_an_arrow():
    assert cue_text(" A --> B\n\n  C \n") == "A -> B\nC"


@pytest.mark.parametrize(
    ("seconds", "srt_time", "vtt_time"),
    [
        (0, "00:00:00,000", "00:00:00.000"),
        (0.0004, "00:00:00,000", "00:00:00.000"),
        (0.0005, "00:00:00,001", "00:00:00.001"),
        (1.0005, "00:00:01,001", "00:00:01.001"),
        (59.9995, "00:01:00,000", "00:01:00.000"),
        (3599.9994, "00:59:59,999", "00:59:59.999"),
        (3599.9995, "01:00:00,000", "01:00:00.000"),
        (3599.9996, "01:00:00,000", "01:00:00.000"),
        (3600, "01:00:00,000", "01:00:00.000"),
        (3661.001, "01:01:01,001", "01:01:01.001"),
        (99 * 3600 + 3599.9999, "100:00:00,000", "100:00:00.000"),
        (-0.5, "00:00:00,000", "00:00:00.000"),
        (float("nan"), "00:00:00,000", "00:00:00.000"),
    ],
)
def test_timestamps_round_to_the_nearest_millisecond_across_hour_boundaries(seconds, srt_time, vtt_time):
    assert timestamp(seconds, ",") == srt_time
    assert timestamp(seconds, ".") == vtt_time


def test_verbose_json_without_granularities_has_segments_and_no_words():
    out = verbose_json(RESULT, (), with_usage=True)
    assert out == {
        "task": "transcribe",
        "language": "english",
        "duration": 3601.25,
        "text": "Hello there. See you in an hour.",
        "segments": RESULT["segments"],
        "usage": {"type": "duration", "seconds": 3602},
    }
    assert list(out["segments"][0]) == [
        "id", "seek", "start", "end", "text", "tokens",
        "temperature", "avg_logprob", "compression_ratio", "no_speech_prob",
    ]  # fmt: skip


def test_verbose_json_with_word_granularity_only_has_words_and_no_segments():
    out = verbose_json(RESULT, ["word"], with_usage=True)
    assert "segments" not in out
    assert out["words"] == RESULT["words"]


def test_verbose_json_with_both_granularities_has_both():
    out = verbose_json(RESULT, ["segment", "word"], with_usage=False)
    assert (out["segments"], out["words"]) == (RESULT["segments"], RESULT["words"])
    assert "usage" not in out


def test_verbose_json_keeps_only_openais_segment_fields():
    data = {**RESULT, "segments": [{**segment(0, 0, 1, " Hi."), "internal": 1}]}
    assert "internal" not in verbose_json(data, (), with_usage=True)["segments"][0]


def rendered(data: dict, **form) -> tuple[int, str, bytes]:
    response = render(data, form)
    return response.status, response.content_type, response.body


def test_json_is_the_text_and_the_duration_in_whole_seconds_rounded_up():
    status, content_type, body = rendered(RESULT)
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"text": RESULT["text"], "usage": {"type": "duration", "seconds": 3602}}
    assert json.loads(rendered({**RESULT, "duration": 0.0})[2])["usage"]["seconds"] == 0


def test_a_translations_json_is_the_text_alone_as_openais_translation_type():
    translated = {**RESULT, "task": "translate"}
    assert json.loads(rendered(translated)[2]) == {"text": RESULT["text"]}
    assert "usage" not in json.loads(rendered(translated, response_format="verbose_json")[2])


@pytest.mark.parametrize(
    ("fmt", "body"),
    [
        ("text", "Hello there. See you in an hour.\n"),
        ("srt", srt(RESULT["segments"])),
        ("vtt", vtt(RESULT["segments"])),
    ],
)
def test_text_srt_and_vtt_are_plain_utf8_text(fmt, body):
    assert rendered(RESULT, response_format=fmt) == (200, "text/plain; charset=utf-8", body.encode())


# -- what the SDK makes of it --------------------------------------------------------------------


def test_the_sdk_reads_each_format_as_its_own_type():
    sdk = Sdk(RESULT)
    plain = sdk.transcribe(file=("a.wav", WAV), model="whisper")
    assert isinstance(plain, Transcription)
    assert plain.text == RESULT["text"]
    assert (plain.usage.type, plain.usage.seconds) == ("duration", 3602)

    verbose = sdk.transcribe(
        file=("a.wav", WAV),
        model="whisper",
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert isinstance(verbose, TranscriptionVerbose)
    assert (verbose.language, verbose.duration, verbose.text) == ("english", 3601.25, RESULT["text"])
    assert [s.text for s in verbose.segments] == [" Hello there.", " See you in an hour."]
    assert verbose.segments[1].start == 3599.9996
    assert [(w.word, w.start) for w in verbose.words] == [("Hello", 0.0), ("there.", 0.5), ("See", 3599.9996)]
    assert verbose.usage.seconds == 3602

    assert (
        sdk.transcribe(file=("a.wav", WAV), model="whisper", response_format="text") == RESULT["text"] + "\n"
    )
    assert sdk.transcribe(file=("a.wav", WAV), model="whisper", response_format="srt") == srt(
        RESULT["segments"]
    )
    assert sdk.transcribe(file=("a.wav", WAV), model="whisper", response_format="vtt") == vtt(
        RESULT["segments"]
    )


def test_the_sdk_reads_translations_as_its_translation_types():
    sdk = Sdk(RESULT)
    assert sdk.translate(file=("a.wav", WAV), model="whisper") == Translation(text=RESULT["text"])
    verbose = sdk.translate(file=("a.wav", WAV), model="whisper", response_format="verbose_json")
    assert isinstance(verbose, TranslationVerbose)
    assert (verbose.language, len(verbose.segments)) == ("english", 2)
    assert (
        sdk.translate(file=("a.wav", WAV), model="whisper", response_format="text") == RESULT["text"] + "\n"
    )


def test_the_sdk_raises_a_bad_request_naming_the_field_the_edge_refused():
    sdk = Sdk(RESULT)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.transcribe(file=("a.wav", WAV), model="whisper", timestamp_granularities=["word"])
    assert info.value.body["param"] == "timestamp_granularities[]"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.transcribe(file=("a.wav", WAV), model="whisper", temperature=2.0)
    assert (info.value.body["param"], info.value.code) == ("temperature", "invalid_value")


# -- a stream ------------------------------------------------------------------------------------


def chunk(text: str) -> dict:
    return {"segment": segment(0, 0, 1, text)}


def events(lines: str) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in lines.split("\n\n") if line]


def test_the_deltas_spell_the_final_text_without_its_leading_space():
    deltas = TextDeltas()
    out = [deltas.feed(chunk(" Hello there.")), deltas.feed(chunk(" See you")), deltas.feed(chunk(" soon."))]
    final = {**RESULT, "text": "Hello there. See you soon."}
    sent = events("".join(out) + deltas.finish(final))
    assert sent == [
        {"type": "transcript.text.delta", "delta": "Hello there."},
        {"type": "transcript.text.delta", "delta": " See you"},
        {"type": "transcript.text.delta", "delta": " soon."},
        {"type": "transcript.text.done", "text": "Hello there. See you soon."},
    ]


def test_whitespace_at_the_end_waits_for_text_after_it_and_blank_segments_send_nothing():
    deltas = TextDeltas()
    assert deltas.feed(chunk("  ")) == ""
    assert events(deltas.feed(chunk(" One. "))) == [{"type": "transcript.text.delta", "delta": "One."}]
    assert deltas.feed(chunk("\n")) == ""
    assert events(deltas.feed(chunk("Two"))) == [{"type": "transcript.text.delta", "delta": " \nTwo"}]
    assert deltas.feed({"other": 1}) == ""
    assert events(deltas.finish({"text": "One. \nTwo"})) == [
        {"type": "transcript.text.done", "text": "One. \nTwo"}
    ]


def test_text_the_segments_never_carried_arrives_as_a_last_delta_before_done():
    deltas = TextDeltas()
    deltas.feed(chunk(" Hello"))
    assert events(deltas.finish({"text": "Hello there"})) == [
        {"type": "transcript.text.delta", "delta": " there"},
        {"type": "transcript.text.done", "text": "Hello there"},
    ]


def test_a_final_text_unlike_the_deltas_is_told_by_the_done_event_alone():
    deltas = TextDeltas()
    deltas.feed(chunk(" Hello"))
    assert events(deltas.finish({"text": "Goodbye"})) == [{"type": "transcript.text.done", "text": "Goodbye"}]


def test_a_stream_with_no_segments_is_done_with_the_empty_text():
    assert events(TextDeltas().finish({"text": ""})) == [{"type": "transcript.text.done", "text": ""}]


def test_the_sdk_reads_the_stream_as_delta_events_then_done():
    deltas = TextDeltas()
    body = (
        deltas.feed(chunk(" Hello")) + deltas.feed(chunk(" world.")) + deltas.finish({"text": "Hello world."})
    )
    sdk = Sdk(stream=body)
    stream = sdk.transcribe(file=("a.wav", WAV), model="whisper", stream=True)
    received = list(stream)
    assert [type(e) for e in received] == [TranscriptionTextDeltaEvent] * 2 + [TranscriptionTextDoneEvent]
    assert "".join(e.delta for e in received[:-1]) == received[-1].text == "Hello world."
    assert sdk.forms[0]["stream"] is True


# -- the published document ----------------------------------------------------------------------


def test_both_endpoints_are_published_as_multipart_with_the_file_as_binary_and_audio_model_examples():
    config = load(environ={})
    config = dataclasses.replace(config, models=(*config.models, ModelConfig("whisper", "/m", "audio")))
    doc = openapi.document(config)
    audio_models = [m.id for m in config.models if m.modality == "audio"]
    for path, streams in (("/v1/audio/transcriptions", True), ("/v1/audio/translations", False)):
        op = doc["paths"][path]["post"]
        schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert (schema["properties"]["file"]["type"], schema["properties"]["file"]["format"]) == (
            "string",
            "binary",
        )
        assert schema["required"] == ["file", "model"]
        assert schema["properties"]["model"]["examples"] == audio_models
        assert not any("null" in json.dumps(prop) for prop in schema["properties"].values())
        content = op["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/plain"} | (
            {"text/event-stream"} if streams else set()
        )


def _form_schema(path: str) -> dict:
    doc = openapi.document(load(environ={}))
    return doc["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]


def _sent(sample: dict) -> bytes:
    """A sample as a form client sends it: JSON's spelling of each value, a list as repeated parts."""
    fields = []
    for name, value in sample.items():
        for item in value if isinstance(value, list) else [value]:
            fields.append((name, item if isinstance(item, bytes | str) else json.dumps(item)))
    return multipart(*fields)


FORM_SAMPLES = {
    "/v1/audio/transcriptions": (
        api.TRANSCRIPTIONS,
        [
            {"file": "", "model": "whisper"},
            {"file": "x", "model": "whisper", "language": "de", "prompt": "p", "temperature": 0.5,
             "response_format": "verbose_json", "timestamp_granularities[]": ["segment", "word"],
             "stream": False},
            {"file": "x"},
            {"model": "whisper"},
            {"file": "x", "model": "whisper", "temperature": 2},
            {"file": "x", "model": "whisper", "language": "deu1"},
            {"file": "x", "model": "whisper", "stream": "yes"},
            {"file": "x", "model": "whisper", "response_format": "tsv"},
            {"file": "x", "model": "whisper", "timestamp_granularities[]": ["line"]},
            {"file": "x", "model": "whisper", "chunking_strategy": "auto"},
        ],
    ),
    "/v1/audio/translations": (
        api.TRANSLATIONS,
        [
            {"file": "x", "model": "whisper", "prompt": "p", "temperature": 0, "response_format": "vtt"},
            {"file": "x", "model": "whisper", "language": "en"},
            {"file": "x", "model": "whisper", "temperature": -1},
        ],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("path", "sample"), [(p, s) for p, (_n, ss) in FORM_SAMPLES.items() for s in ss])
def test_the_published_form_schema_and_the_edge_agree(path, sample):
    node = FORM_SAMPLES[path][0]
    try:
        read_form(_sent(sample), CONTENT_TYPE, node)
        accepted = True
    except ApiError:
        accepted = False
    assert jsonschema.Draft202012Validator(_form_schema(path)).is_valid(sample) == accepted
