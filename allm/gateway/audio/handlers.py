"""Speech to text: OpenAI's audio transcriptions and translations, from multipart/form-data.

POST /v1/audio/transcriptions   json ({text, usage}), text, srt, vtt or verbose_json; with stream,
                                transcript.text.delta events as segments are decoded, then
                                transcript.text.done
POST /v1/audio/translations     the same formats, the text in English; no stream

The form is read strictly (allm/gateway/audio/form.py), then checked with the room's
``TRANSCRIPTIONS`` / ``TRANSLATIONS`` (allm/gateway/audio/schema.py), the nodes GET
/openapi.json publishes. The audio itself is never decoded here: its bytes go to the audio
manager as a blob, and a file it cannot read comes back as UNSUPPORTED naming ``file`` (400).
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response
from sanic import text as text_response

from allm.gateway.audio import schema
from allm.gateway.audio.form import read_form
from allm.gateway.fields import model_for
from allm.gateway.spec import Node
from allm.gateway.streaming import pump, sse
from allm.kernel.client import RequestOptions

bp = Blueprint("audio", url_prefix="/v1/audio")

#: openai-python's TranscriptionSegment (types/audio/transcription_segment.py), in the API's own order
SEGMENT_KEYS = (
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
)


def manager_params(form: Mapping[str, Any], task: str) -> dict[str, Any]:
    """A checked form as the audio manager's params (the ops in allm/managers/audio/manager.py)."""
    return {
        "task": task,
        "language": form.get("language"),
        "prompt": form.get("prompt") or None,
        "temperature": float(form.get("temperature", 0.0)),
        "words": "word" in form.get("timestamp_granularities[]", ()),
        "stream": bool(form.get("stream")),
    }


# -- rendering -----------------------------------------------------------------------------------


def milliseconds(seconds: float) -> int:
    """Seconds to whole milliseconds, rounded half up on the decimal value (1.0005 s is 1001 ms)."""
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds <= 0:
        return 0
    exact = decimal.Decimal(repr(seconds)) * 1000
    return int(exact.to_integral_value(rounding=decimal.ROUND_HALF_UP))


def timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT); past 99 hours the hours take more digits."""
    ms = milliseconds(seconds)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def cue_text(text: str) -> str:
    """A segment's text as one cue's: no blank line (it would end the cue) and no arrow (it starts one)."""
    lines = (line.strip() for line in text.strip().splitlines())
    return "\n".join(line for line in lines if line).replace("-->", "->")


def _cues(segments: Sequence[Mapping[str, Any]], separator: str) -> list[str]:
    cues = []
    for segment in segments:
        text = cue_text(str(segment.get("text", "")))
        if text:  # a cue without text would read as the end of one
            start, end = timestamp(segment["start"], separator), timestamp(segment["end"], separator)
            cues.append(f"{start} --> {end}\n{text}\n\n")
    return cues


def srt(segments: Sequence[Mapping[str, Any]]) -> str:
    """SubRip: one numbered cue per segment with text, numbered from 1."""
    return "".join(f"{n}\n{cue}" for n, cue in enumerate(_cues(segments, ","), start=1))


def vtt(segments: Sequence[Mapping[str, Any]]) -> str:
    """WebVTT: the header, then one cue per segment with text."""
    return "WEBVTT\n\n" + "".join(_cues(segments, "."))


def usage(data: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's usage of a model billed by duration: whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(float(data["duration"]))}


def verbose_json(
    data: Mapping[str, Any], granularities: Sequence[str], *, with_usage: bool
) -> dict[str, Any]:
    """verbose_json: segments unless only word timestamps were asked for; words when they were."""
    out: dict[str, Any] = {
        "task": data["task"],
        "language": data["language"],
        "duration": data["duration"],
        "text": data["text"],
    }
    if "segment" in granularities or not granularities:
        out["segments"] = [{key: s.get(key) for key in SEGMENT_KEYS} for s in data["segments"]]
    if "word" in granularities:
        out["words"] = [
            {"word": w["word"], "start": w["start"], "end": w["end"]} for w in data.get("words") or ()
        ]
    if with_usage:
        out["usage"] = usage(data)
    return out


def render(data: Mapping[str, Any], form: Mapping[str, Any]) -> HTTPResponse:
    """The manager's result in the response_format the form asked for."""
    fmt = form.get("response_format", "json")
    transcribing = data["task"] == "transcribe"  # OpenAI's translations report no usage
    if fmt == "text":
        return text_response(data["text"] + "\n")
    if fmt == "srt":
        return text_response(srt(data["segments"]))
    if fmt == "vtt":
        return text_response(vtt(data["segments"]))
    if fmt == "verbose_json":
        granularities = form.get("timestamp_granularities[]", ())
        return json_response(verbose_json(data, granularities, with_usage=transcribing))
    body: dict[str, Any] = {"text": data["text"]}
    if transcribing:
        body["usage"] = usage(data)
    return json_response(body)


class TextDeltas:
    """A transcription's segments as transcript.text.delta events, then transcript.text.done.

    Each segment's text starts with whisper's space and the final text is stripped, so a
    delta is what the stripped text so far adds to what was sent: the deltas spell the
    final text exactly, the first without a leading space, whitespace at the end held back
    until more text follows it.
    """

    def __init__(self) -> None:
        self.joined = ""  # every segment's text, as the manager sent it
        self.sent = ""  # what the deltas so far spell

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return sse({"type": "transcript.text.delta", "delta": delta})

    def feed(self, data: Mapping[str, Any]) -> str:
        """One stream chunk ({"segment": ...}) as a delta event, or nothing when it adds no text."""
        segment = data.get("segment")
        if not isinstance(segment, Mapping):
            return ""
        self.joined += str(segment.get("text", ""))
        return self._delta(self.joined.strip())

    def finish(self, data: Mapping[str, Any]) -> str:
        """The last delta the final text needs (if any), then the done event with the whole text."""
        text = str(data["text"])
        return self._delta(text) + sse({"type": "transcript.text.done", "text": text})


# -- routes --------------------------------------------------------------------------------------


async def _run(request: Request, node: Node, task: str) -> HTTPResponse | None:
    config, client = request.app.ctx.config, request.app.ctx.client
    form = read_form(request.body or b"", request.headers.get("content-type"), node)
    model = model_for(config, form, "audio")
    params = manager_params(form, task)
    options: RequestOptions = {
        "model": model.id,
        "params": params,
        "blobs": (form["file"],),
        "timeout_s": config.request_timeout_s,
    }
    if not params["stream"]:
        result = await client.call("audio", "transcribe", **options)
        return render(result.data, form)

    deltas = TextDeltas()
    await pump(
        request,
        client.stream("audio", "transcribe", **options),
        feed=deltas.feed,
        finish=lambda result: deltas.finish(result.data),
    )
    return None


@bp.post("/transcriptions")
async def transcriptions(request: Request) -> HTTPResponse | None:
    return await _run(request, schema.TRANSCRIPTIONS, "transcribe")


@bp.post("/translations")
async def translations(request: Request) -> HTTPResponse | None:
    return await _run(request, schema.TRANSLATIONS, "translate")
