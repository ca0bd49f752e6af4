"""whisper.cpp models through pywhispercpp's low-level binding: transcription and translation.

The binding never checks what whisper.cpp hands back, so ``model_check.check_model`` has
read the file before it gets here, and the context pointer is checked after the load.
Each request decodes its audio here (decode.py), runs ``whisper_full`` with an abort
callback wired to the request's cancel and deadline, and streams each segment as
whisper.cpp finishes it.  whisper.cpp's OpenMP threads wait passively: busy-waiting threads
made it several times slower on a machine whose cores are shared.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

import logging
import math
import threading
import zlib
from typing import Any

import _pywhispercpp as pw
import numpy as np

from allm.kernel.codes import InternalError, LoadFailedError, UnsupportedError
from allm.kernel.contract import Reply, RequestContext
from allm.managers.audio.decode import SAMPLE_RATE, decode, is_silent
from allm.managers.audio.languages import LANGUAGES
from allm.managers.audio.model_check import WhisperModelInfo
from allm.managers.audio.whisper_native import NoSpeech

log = logging.getLogger("allm.audio.whisper")

#: what whisper.cpp writes for a stretch with no speech; never part of a transcript
NON_SPEECH = frozenset({"[BLANK_AUDIO]", "[ Silence ]", "[silence]", "(silence)"})


def _default_threads() -> int:
    # Every core: unlike a token stream, a transcription sends a frame per segment, so the
    # manager's I/O thread needs no core of its own (on 2 cores, 2 threads ran tiny.en 1.6 times as fast).
    return max(1, os.cpu_count() or 1)


def compression_ratio(text: str) -> float:
    """As OpenAI's Whisper reports it: text bytes over their zlib-compressed size."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


class WhisperEngine:
    """One whisper.cpp model; one transcription at a time (its context is not shareable)."""

    def __init__(self, model_id: str, info: WhisperModelInfo, options: dict[str, Any]) -> None:
        self.model_id = model_id
        self.info = info
        self.multilingual = info.multilingual
        self.n_threads = int(options.get("n_threads") or _default_threads())
        self.lock = threading.Lock()
        params = pw.whisper_context_default_params()
        params.use_gpu = False
        self.ctx = pw.whisper_init_from_file_with_params(str(info.path), params)
        if self.ctx is None:  # whisper.cpp logged why; the file passed our checks, so say so
            raise LoadFailedError(f"whisper.cpp could not load {model_id} from {info.path}")
        self.eot = pw.whisper_token_eot(self.ctx)
        self.no_speech = NoSpeech(pw, self.ctx)

    def close(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            try:
                pw.whisper_free(ctx)
            except Exception:  # the pool goes on unloading the others
                log.exception(
                    "unloading %s: whisper_free failed; its whisper.cpp context may have leaked",
                    self.model_id,
                )

    def transcribe(self, ctx: RequestContext) -> Reply:
        params = ctx.params
        task = str(params.get("task", "transcribe"))
        if task not in ("transcribe", "translate"):
            raise UnsupportedError(f"unknown task {task!r}", reason="invalid_request", param="task")
        language = params.get("language")
        if language is not None and language not in LANGUAGES:
            raise UnsupportedError(
                f"language {language!r} is not one whisper knows (ISO-639-1, like 'en')",
                reason="invalid_request",
                param="language",
            )
        if language not in (None, "en") and not self.multilingual:
            raise UnsupportedError(
                f"{self.model_id} is an English-only model; it cannot transcribe {LANGUAGES[language]}",
                reason="invalid_request",
                param="language",
            )
        temperature = float(params.get("temperature") or 0.0)
        words = bool(params.get("words"))
        blob = ctx.blobs[0] if ctx.blobs else b""
        audio = decode(blob)
        duration = audio.size / SAMPLE_RATE
        del blob  # the upload is not needed past this point; the samples are
        base = {"task": task, "duration": round(duration, 3)}
        if is_silent(audio):
            spoken = language or "en"
            return Reply({**base, "language": LANGUAGES[spoken], "text": "", "segments": [], "words": []})
        with self.lock:
            return self._run(
                ctx, audio, base=base, task=task, language=language, temperature=temperature, words=words
            )

    def _run(
        self,
        ctx: RequestContext,
        audio: np.ndarray,
        *,
        base: dict[str, Any],
        task: str,
        language: str | None,
        temperature: float,
        words: bool,
    ) -> Reply:
        full = pw.whisper_full_default_params(pw.whisper_sampling_strategy.WHISPER_SAMPLING_GREEDY)
        full.n_threads = self.n_threads
        full.translate = task == "translate"
        full.language = language or ("auto" if self.multilingual else "en")
        full.detect_language = False
        full.temperature = temperature
        full.token_timestamps = words
        full.print_progress = False
        full.print_realtime = False
        full.print_timestamps = False
        full.print_special = False
        full.suppress_blank = True
        if ctx.params.get("prompt"):
            full.initial_prompt = str(ctx.params["prompt"])
        segments: list[dict[str, Any]] = []
        done = 0  # segments already collected
        stop: BaseException | None = None  # why the abort callback stops whisper.cpp

        # Both callbacks run inside whisper.cpp's C++ frames: an exception must never leave them.
        def on_segments(_ctx: Any = None, _n_new: int = 0, _user: Any = None) -> None:
            nonlocal done, stop
            try:
                total = pw.whisper_full_n_segments(self.ctx)
                for i in range(done, total):
                    segment = self._segment(i, temperature)
                    if segment is not None:
                        segment["id"] = len(segments)
                        segments.append(segment)
                        if ctx.stream:
                            ctx.emit({"segment": segment})
                done = total
            except BaseException as exc:  # noqa: BLE001 - kept and raised once whisper.cpp returns
                stop = stop or exc

        def should_abort() -> bool:
            nonlocal stop
            if stop is None:
                try:
                    ctx.check()  # cancel or deadline; also tells the watchdog it is computing
                except BaseException as exc:  # noqa: BLE001 - raised once whisper.cpp returns
                    stop = exc
            return stop is not None

        pw.assign_new_segment_callback(full, on_segments)
        pw.assign_abort_callback(full, should_abort)
        try:
            status = pw.whisper_full(self.ctx, full, audio, audio.size)
        finally:
            pw.assign_new_segment_callback(full, None)
            pw.assign_abort_callback(full, None)
        if stop is not None:
            raise stop
        if status != 0:
            raise InternalError(f"whisper.cpp failed on this audio (status {status})")
        on_segments()  # any segment the callback did not see
        if stop is not None:
            raise stop
        lang_id = pw.whisper_full_lang_id(self.ctx)
        code = pw.whisper_lang_str(lang_id) if lang_id >= 0 else (language or "en")
        reply: dict[str, Any] = {
            **base,
            "language": LANGUAGES.get(code, code),
            "text": "".join(s["text"] for s in segments).strip(),
            "segments": segments,
        }
        if words:
            reply["words"] = self._words()
        return Reply(reply)

    def _segment(self, i: int, temperature: float) -> dict[str, Any] | None:
        text = pw.whisper_full_get_segment_text(self.ctx, i).decode("utf-8", errors="replace")
        if text.strip() in NON_SPEECH:
            return None
        t0 = pw.whisper_full_get_segment_t0(self.ctx, i) / 100
        no_speech = self.no_speech.prob(i)
        t1 = pw.whisper_full_get_segment_t1(self.ctx, i) / 100
        tokens, logprobs = [], []
        for j in range(pw.whisper_full_n_tokens(self.ctx, i)):
            data = pw.whisper_full_get_token_data(self.ctx, i, j)
            if data.id >= self.eot:
                continue  # timestamps and control tokens: not text
            tokens.append(int(data.id))
            logprobs.append(math.log(max(float(data.p), 1e-12)))
        return {
            "id": i,
            "seek": int(t0 * SAMPLE_RATE / 160),  # in mel frames (10 ms), as OpenAI counts it
            "start": round(t0, 3),
            "end": round(t1, 3),
            "text": text,
            "tokens": tokens,
            "temperature": temperature,
            "avg_logprob": round(sum(logprobs) / len(logprobs), 6) if logprobs else 0.0,
            "compression_ratio": round(compression_ratio(text.strip()), 6),
            # null where the binding cannot reach whisper.cpp's value (whisper_native.py), never made up
            "no_speech_prob": None if no_speech is None else round(no_speech, 6),
        }

    def _words(self) -> list[dict[str, Any]]:
        """Words and their times from the tokens' timestamps; a token starting with a space starts a word."""
        words: list[dict[str, Any]] = []
        for i in range(pw.whisper_full_n_segments(self.ctx)):
            for j in range(pw.whisper_full_n_tokens(self.ctx, i)):
                data = pw.whisper_full_get_token_data(self.ctx, i, j)
                if data.id >= self.eot:
                    continue
                piece = pw.whisper_full_get_token_text(self.ctx, i, j)
                text = piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else str(piece)
                start, end = data.t0 / 100, data.t1 / 100
                if text.startswith(" ") or not words:
                    if text.strip():
                        words.append({"word": text.strip(), "start": round(start, 3), "end": round(end, 3)})
                else:
                    words[-1]["word"] += text
                    words[-1]["end"] = round(end, 3)
        return words
