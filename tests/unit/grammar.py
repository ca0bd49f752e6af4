"""What the text engine does with a JSON Schema, here in-process: the converter, then llama.cpp's parser."""

from __future__ import annotations

import json
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf


def compile_schema(schema: Any) -> str:
    """ "ok", "null grammar" (the engine would crash on it), or the converter's exception type.

    The grammar is only parsed (no vocabulary): a refused grammar comes back as a
    null sampler here, which the engine would add to its sampler chain and crash on.
    """
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter's own failures (assert, KeyError …)
        return type(exc).__name__
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        return "null grammar"
    llama_cpp.llama_sampler_free(sampler)
    return "ok"
