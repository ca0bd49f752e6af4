"""The audio room's request bodies: the transcription and translation forms, as nodes.

Each is a multipart/form-data body (allm/gateway/audio/form.py reads its fields as these
nodes' types), checked like a JSON body and published in GET /openapi.json.
"""

from __future__ import annotations

import dataclasses

from allm.gateway.audio.form import File
from allm.gateway.bounds import DESCRIPTION, MODEL, Body
from allm.gateway.errors import bad_field
from allm.gateway.spec import Arr, Bool, Checked, Enum, Num, Obj, Str

AUDIO_FILE = File(
    description="the audio: WAV, FLAC, OGG/Vorbis, Opus or MP3 (read from its bytes, whatever its name); "
    "an empty file is refused (400), a silent one is an empty transcript"
)
AUDIO_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
AUDIO_FORMAT = Enum(
    values=AUDIO_FORMATS,
    description="json (the default): {text}; text, srt and vtt: text/plain; verbose_json: "
    "language, duration, segments, words",
)
AUDIO_TEMPERATURE = Num(
    minimum=0, maximum=1, description="sampling temperature; 0 (the default) decodes greedily"
)
AUDIO_PROMPT = Str(
    max_length=DESCRIPTION,
    description="text in the audio's style, or what came before it; whisper reads its last 224 tokens",
)
LANGUAGE = Str(
    min_length=2,
    max_length=3,
    pattern=r"[a-z]{2,3}",
    description="the spoken language, ISO-639-1 (en, de, ...); left out, the model detects it",
)
GRANULARITIES = Arr(
    items=Enum(values=("segment", "word")),
    max_items=2,
    description="with verbose_json: segment (the default) and/or word timestamps; word needs verbose_json",
)


def _audio_agrees(body: Body, path: str) -> Body:
    """What a field's type cannot say: word timestamps need verbose_json; a stream carries text only."""
    fmt = body.get("response_format", "json")
    if "word" in body.get("timestamp_granularities[]", ()) and fmt != "verbose_json":
        raise bad_field(
            "timestamp_granularities[]", f"word timestamps need response_format verbose_json, not {fmt!r}"
        )
    if body.get("stream") and fmt not in ("json", "text"):
        raise bad_field("stream", f"a stream carries text: response_format json or text, not {fmt!r}")
    return body


TRANSCRIPTION_FORM = Obj(
    fields={
        "file": AUDIO_FILE,
        "model": MODEL,
        "language": LANGUAGE,
        "prompt": AUDIO_PROMPT,
        "response_format": AUDIO_FORMAT,
        "temperature": AUDIO_TEMPERATURE,
        "timestamp_granularities[]": GRANULARITIES,
        "stream": Bool(
            description="true: transcript.text.delta events as the audio is transcribed, then "
            "transcript.text.done (response_format json or text)"
        ),
    },
    required=("file", "model"),
)
TRANSCRIPTIONS = Checked(
    node=TRANSCRIPTION_FORM,
    then=_audio_agrees,
    description="word timestamps need verbose_json; a stream, json or text",
)
TRANSLATIONS = Obj(
    fields={
        "file": AUDIO_FILE,
        "model": MODEL,
        "prompt": dataclasses.replace(AUDIO_PROMPT, description=AUDIO_PROMPT.description + "; in English"),
        "response_format": AUDIO_FORMAT,
        "temperature": AUDIO_TEMPERATURE,
    },
    required=("file", "model"),
)
