"""Speech to text: OpenAI's audio transcriptions and translations, from multipart/form-data.

POST /v1/audio/transcriptions   json ({text, usage}), text, srt, vtt or verbose_json; with stream,
                                transcript.text.delta events as segments are decoded, then
                                transcript.text.done
POST /v1/audio/translations     the same formats, the text in English; no stream

The form is read here, strictly (``parse_multipart``: Sanic's own form parser logs and
drops what it cannot read, so a broken body would become a misleading "file is required"),
then each field is read as its node's JSON type and checked with api_schema's
``TRANSCRIPTIONS`` / ``TRANSLATIONS``, the nodes GET /openapi.json publishes. The audio
itself is never decoded here: its bytes go to the audio manager as a blob, and a file it
cannot read comes back as UNSUPPORTED naming ``file`` (400).
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response
from sanic import text as text_response
from sanic.headers import parse_content_header

from allm.gateway import api_schema
from allm.gateway.chat import open_stream, sse, stream_error
from allm.gateway.errors import ApiError, bad_field
from allm.gateway.fields import model_for
from allm.gateway.spec import Arr, Bool, Node, Num
from allm.kernel.codes import AllmError

bp = Blueprint("audio", url_prefix="/v1/audio")

#: parts a form may have (a valid one has at most 9); the bound keeps a hostile body's walk short
MAX_PARTS = 64
#: bytes of one part's headers (a Content-Disposition with a long file name, a Content-Type)
MAX_HEAD_BYTES = 16 * 1024
#: a number as JSON writes it, so a field reads as a number exactly where a JSON reader says it does
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
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


# -- the form ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body: its field name and its bytes."""

    name: str
    data: bytes


def _malformed(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_request")


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type; anything else is a 400."""
    kind, options = parse_content_header(content_type or "")
    if kind != "multipart/form-data":
        shown = repr(kind[:64]) if kind else "none"
        raise _malformed(
            f"the request body must be multipart/form-data, with the audio in its 'file' part; "
            f"the Content-Type is {shown}"
        )
    boundary = str(options.get("boundary", ""))
    if not (1 <= len(boundary) <= 70 and boundary.isascii() and boundary.isprintable()):
        raise _malformed("the multipart/form-data Content-Type needs a boundary of 1 to 70 ASCII characters")
    return boundary.encode("ascii")


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a multipart/form-data body (RFC 7578); a body that breaks the framing is a 400.

    A preamble before the first boundary and an epilogue after the last are ignored, as
    RFC 2046 says; a part without a name, a part cut short, or a body without its closing
    boundary is refused, never guessed at.
    """
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:
        first = body.find(delimiter)
        if first < 0:
            raise _malformed("the multipart/form-data body holds no part: its boundary never appears")
        pos = first + len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise _malformed(
                f"the multipart/form-data body is malformed after part {len(parts)}: "
                "a boundary must be followed by a line end, or by -- to close the body"
            )
        if len(parts) == MAX_PARTS:
            raise _malformed(f"the multipart/form-data body has more than {MAX_PARTS} parts")
        head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_HEAD_BYTES + 4)
        if head_end < 0:
            raise _malformed(
                f"part {len(parts) + 1} of the multipart/form-data body has no end to its headers "
                f"within {MAX_HEAD_BYTES} bytes"
            )
        start = head_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise _malformed(
                f"part {len(parts) + 1} of the multipart/form-data body never ends: the body is cut "
                "short or lacks its closing boundary"
            )
        parts.append(Part(_part_name(body[line_end + 2 : head_end], len(parts) + 1), body[start:end]))
        pos = end + len(delimiter)


def _part_name(head: bytes, number: int) -> str:
    """The field name a part's headers give it (Content-Disposition: form-data; name=...)."""
    name = ""
    for line in head.split(b"\r\n") if head else ():
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"the headers of part {number} of the form are not UTF-8") from None
        key, colon, value = text.partition(":")
        if not colon:
            raise _malformed(f"part {number} of the form has a header line without a colon")
        if key.strip().lower() == "content-disposition":
            kind, options = parse_content_header(value)
            if kind != "form-data":
                raise _malformed(f"part {number} of the form is not form-data: Content-Disposition {kind!r}")
            name = str(options.get("name", ""))
    if not name:
        raise _malformed(
            f"part {number} of the form has no field name (Content-Disposition: form-data; name=...)"
        )
    return name


def _typed(node: Node, text: str) -> Any:
    """A field's text as its node's JSON type, where it spells one; else the text (which the node refuses)."""
    if isinstance(node, Bool):
        return {"true": True, "false": False}.get(text, text)
    if isinstance(node, Num) and NUMBER.fullmatch(text):
        return float(text)  # digits past a double's range read as inf, which Num refuses by name
    return text


def form_values(parts: Sequence[Part], node: Node) -> dict[str, Any]:
    """The parts as the fields of ``node``: files as bytes, ``name[]`` repeated, the rest typed.

    A field the node does not know is kept as it came, for the node to refuse by name.
    """
    fields = api_schema.form_of(node).fields
    values: dict[str, Any] = {}
    for part in parts:
        name = part.name
        field = fields.get(name)
        value: Any = part.data
        if field is not None and not isinstance(field, api_schema.File):
            try:
                text = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_field(name, f"'{name}' must be UTF-8 text") from None
            value = _typed(field.items if isinstance(field, Arr) else field, text)
        if isinstance(field, Arr):
            values.setdefault(name, []).append(value)
        elif name in values:
            raise bad_field(name, f"'{name}' is given more than once; it takes one value")
        else:
            values[name] = value
    return values


def read_form(body: bytes, content_type: str | None, node: Node) -> dict[str, Any]:
    """A multipart/form-data body, checked with ``node`` as a JSON body is checked."""
    values = form_values(parse_multipart(body, boundary_of(content_type)), node)
    checked: dict[str, Any] = node.check(values, "")
    return checked


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
    blobs = (form["file"],)
    if not params["stream"]:
        result = await client.call(
            "audio",
            "transcribe",
            model=model.id,
            params=params,
            blobs=blobs,
            timeout_s=config.request_timeout_s,
        )
        return render(result.data, form)

    deltas = TextDeltas()
    async with client.stream(
        "audio", "transcribe", model=model.id, params=params, blobs=blobs, timeout_s=config.request_timeout_s
    ) as stream:
        response, opening, pieces = await open_stream(request, stream)
        if opening is not None and (first := deltas.feed(opening.data)):
            await response.send(first)
        try:
            async for piece in pieces:
                if event := deltas.feed(piece.data):
                    await response.send(event)
        except AllmError as exc:
            await stream_error(response, exc)
        else:
            assert stream.result is not None
            await response.send(deltas.finish(stream.result.data))
        await response.eof()
    return None


@bp.post("/transcriptions")
async def transcriptions(request: Request) -> HTTPResponse | None:
    return await _run(request, api_schema.TRANSCRIPTIONS, "transcribe")


@bp.post("/translations")
async def translations(request: Request) -> HTTPResponse | None:
    return await _run(request, api_schema.TRANSLATIONS, "translate")
