"""Whose fault an engine's error is, and that none is hidden: chat templates, frees, load progress.

A chat template that refuses the messages (its ``raise_exception``) is UNSUPPORTED (400),
as it always was. Any other exception raised while rendering (a bug in allm's helpers, or
in the library that renders) is not dressed up as a refusal: it leaves the engine as it
is, and the manager's runtime answers INTERNAL with its traceback, as it does for every
exception that is not an AllmError. A native object that fails to free, or a load
progress report that fails inside llama.cpp's callback, is logged, not swallowed.

The engines run in the test's process, on tiny models the fixtures write with Llama 3.1's
real template (which refuses two calls in one message), so that a helper of theirs can be
made to fail.
"""

from __future__ import annotations

import logging

import pytest

from allm.kernel import protocol as p
from allm.kernel.codes import AllmError, Code
from allm.kernel.contract import RequestContext
from allm.managers.pool import ModelEntry
from allm.managers.text import chat_format
from allm.managers.text.manager import plan_load
from allm.managers.text.safetensors_backends import HfTokenizerText
from tests.model_files import write_hf_model, write_tiny_llama_gguf


def _call(call_id: str, city: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
    }


TWO_CALLS = [
    {"role": "user", "content": "The weather in Paris and in Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("c1", "Paris"), _call("c2", "Rome")]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "rainy"},
]
HELLO = [{"role": "user", "content": "hello"}]


def load(path, **options):
    plan = plan_load(ModelEntry.from_settings({"id": "tiny", "path": str(path), "options": options}))
    return plan.load(lambda _fraction: None, lambda _size, _what: None)


@pytest.fixture(scope="module", params=["gguf", "safetensors"])
def engine(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "gguf":
        engine = load(write_tiny_llama_gguf(root / "llama3.1.gguf", "llama3.1"), n_ctx=512, n_parallel=1)
    else:
        engine = load(write_hf_model(root / "llama", "llama", "llama3.1"), backend="transformers")
    yield engine
    engine.close()


def chat(engine, messages, **params):
    req = p.Request(rid=1, op="chat", model="tiny", params={"messages": messages, "max_tokens": 4, **params})
    return engine.chat(RequestContext(b"test", req, None, lambda *_: None))


def test_the_fixture_model_chats(engine):
    assert chat(engine, HELLO).data["finish_reason"] in ("stop", "length")


def test_a_template_that_raises_refuses_the_messages_as_unsupported(engine):
    with pytest.raises(AllmError) as caught:
        chat(engine, TWO_CALLS)
    assert caught.value.code is Code.UNSUPPORTED
    assert caught.value.message == (
        "tiny's chat template refused the messages: This model only supports single tool-calls at once!"
    )


def test_an_allm_bug_while_rendering_is_not_a_refusal(engine, monkeypatch):
    def broken(*_args, **_kwargs):
        raise TypeError("a bug in allm")

    monkeypatch.setattr(chat_format, "template_messages", broken)
    with pytest.raises(TypeError, match="a bug in allm"):
        chat(engine, HELLO)


def test_a_failure_of_the_renderer_itself_is_not_a_refusal(engine, monkeypatch):
    def broken(*_args, **_kwargs):
        raise TypeError("the renderer failed")

    if hasattr(engine, "_formatter"):  # llama-cpp-python's Jinja2ChatFormatter
        monkeypatch.setattr(engine, "_formatter", broken)
    else:  # allm's own call of transformers' apply_chat_template
        monkeypatch.setattr(HfTokenizerText, "chat_ids", broken)
    with pytest.raises(TypeError, match="the renderer failed"):
        chat(engine, HELLO)


def test_a_model_without_a_chat_template_refuses_chat_by_name(engine, monkeypatch):
    if hasattr(engine, "_formatter"):
        monkeypatch.setattr(engine, "_formatter", None)
    else:
        monkeypatch.setattr(engine.backend.hf_tokenizer, "chat_template", None)
    with pytest.raises(AllmError) as caught:
        chat(engine, HELLO)
    assert caught.value.code is Code.UNSUPPORTED
    assert caught.value.message == "tiny has no chat template; use completions"


@pytest.fixture
def gguf(tmp_path):
    return write_tiny_llama_gguf(tmp_path / "tiny.gguf")


def test_a_failed_free_is_logged_with_what_may_have_leaked_and_the_rest_still_freed(gguf, caplog):
    engine = load(gguf, n_ctx=256, n_parallel=1)
    batcher_close = engine.batcher.close
    model_close = engine.llm.close
    freed = []

    def broken() -> None:
        raise RuntimeError("llama_free failed")

    def close_model() -> None:
        freed.append("model")
        model_close()

    engine.batcher.close = broken
    engine.llm.close = close_model
    try:
        with caplog.at_level(logging.ERROR, logger="allm.text.llama"):
            engine.close()  # never raises: the pool goes on unloading the others
    finally:
        batcher_close()
    assert freed == ["model"]
    [record] = [r for r in caplog.records if "may have leaked" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        "unloading tiny: freeing the batch context (a llama.cpp context and batch) failed; it may have leaked"
    )
    assert record.exc_info is not None
    assert "llama_free failed" in str(record.exc_info[1])


def test_a_failing_progress_report_is_logged_once_and_the_load_goes_on(gguf, caplog):
    reports = []

    def report(fraction: float) -> None:
        reports.append(fraction)
        raise ValueError("a broken progress report")

    plan = plan_load(ModelEntry.from_settings({"id": "tiny", "path": str(gguf), "options": {"n_ctx": 256}}))
    with caplog.at_level(logging.ERROR, logger="allm.text.llama"):
        engine = plan.load(report, lambda _size, _what: None)
    engine.close()
    assert len(reports) > 1  # llama.cpp called back again and again, and the load went on
    [record] = [r for r in caplog.records if "load progress" in r.getMessage()]
    assert record.getMessage() == "reporting the load progress of tiny failed; the watchdog sees none"
    assert record.exc_info is not None
