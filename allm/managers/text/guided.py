"""Grammar-constrained decoding for the safetensors backends (transformers, mlx-lm, ONNX Runtime GenAI).

allm writes its grammars in GBNF: llama.cpp's JSON-schema converter for
``response_format``, ``chat_format.call_grammar`` for tool calls. The GGUF
engine hands them to llama.cpp's grammar sampler. The safetensors backends have
no grammar sampler that allm's own sampling order can use, so here llguidance
(the constraint engine ONNX Runtime GenAI embeds for its own ``set_guidance``)
compiles the same GBNF. At each step it gives the set of tokens the grammar
allows next, and ``TokenPicker`` keeps only those (step 3 of the order in
sampling.py). The same grammar gives the same language on every backend.

ONNX Runtime GenAI's own guidance applies only inside its own sampler
(``generate_next_token``). There, seed, penalties, ``logit_bias``, ``min_p`` and
logprobs would follow rules unlike every other path, so allm does not use it.

A grammar that llguidance cannot take is UNSUPPORTED on ``response_format``
when it came from the client's schema, and INTERNAL when allm wrote it (a tool
grammar that fails is allm's bug).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from allm.kernel.codes import InternalError, UnsupportedError

log = logging.getLogger("allm.text.guided")


class GuideTokenizer:
    """A model's vocabulary as llguidance sees it; built once per loaded model (about a second
    for a 150k vocabulary), on the first constrained request.

    ``n_vocab``: the width of the model's logits (its embedding may hold more rows than the
    tokenizer has tokens: those are never allowed). ``eos``: every token that ends the reply.
    """

    def __init__(self, hf_tokenizer: Any, n_vocab: int, eos: Iterable[int]) -> None:
        try:
            import llguidance.hf
        except ImportError as exc:
            raise UnsupportedError(
                "JSON output and tool calls on a safetensors model need llguidance, "
                "which is not installed: run pip install 'allm[safetensors]'"
            ) from exc

        self.eos = frozenset(eos)
        self.n_vocab = n_vocab
        # One end token for llguidance; the others are allowed wherever it is (see Guide).
        end = min(self.eos) if self.eos else None
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=end)
        self.end = self.tokenizer.eos_token
        # Added tokens (``<tool_call>``, ``[TOOL_CALLS]``, ``<think>``) are special to llguidance:
        # a grammar's quoted text never matches them, so ``compile`` names them where it appears.
        added = {
            str(token.content): int(i)
            for i, token in hf_tokenizer.added_tokens_decoder.items()
            if len(str(token.content)) > 1
            and not {'"', "\\"} & set(str(token.content))  # as it reads inside a quoted literal
            and int(i) < n_vocab
            and self.tokenizer.is_special_token(int(i))
        }
        self.specials = added
        names = sorted(added, key=len, reverse=True)
        self._special_text = re.compile("|".join(re.escape(n) for n in names)) if names else None

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one per model; the model lives as long)
    def compile(self, gbnf: str) -> str:
        """The llguidance grammar of ``gbnf``; ValueError naming the problem if it cannot be one."""
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(gbnf)
        except Exception as exc:  # its converter raises its own error classes
            raise ValueError(f"not a grammar llguidance reads: {exc}") from exc
        grammar = str(llguidance.LLMatcher.grammar_from_lark(self._with_specials(lark)))
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise ValueError(str(problem).splitlines()[0])
        return grammar

    def _with_specials(self, lark: str) -> str:
        """``lark`` with each added token's text in a rule's quoted text also matched by the token.

        The converter writes allm's markers only in ``start`` and the other lowercase
        (parser) rules, where a token reference may stand: ``"<tool_call>\\n"`` becomes
        ``(<[id]> | "<tool_call>") "\\n"``, as llama.cpp's grammars match a token by its text.
        """
        pattern = self._special_text
        if pattern is None:
            return lark

        def split(literal: re.Match[str]) -> str:
            body = literal.group(1)
            if pattern.search(body) is None:
                return literal.group(0)
            parts, at = [], 0
            for found in pattern.finditer(body):
                if found.start() > at:
                    parts.append(f'"{body[at : found.start()]}"')
                parts.append(f'(<[{self.specials[found.group(0)]}]> | "{found.group(0)}")')
                at = found.end()
            if at < len(body):
                parts.append(f'"{body[at:]}"')
            return " ".join(parts)

        lines = [_LITERAL.sub(split, x) if _PARSER_RULE.match(x) else x for x in lark.splitlines()]
        return "\n".join(lines) + "\n"


_PARSER_RULE = re.compile(r"\s*[a-z_][a-z0-9_]*\s*:")  # a lowercase rule: the parser's, not the lexer's
_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"')


def guide_for(tokenizer: GuideTokenizer, gbnf: str, *, client_schema: bool) -> Guide:
    """A new guide for one generation under ``gbnf`` (see the module's docstring for the codes)."""
    try:
        return Guide(tokenizer, tokenizer.compile(gbnf))
    except ValueError as exc:
        if client_schema:
            raise UnsupportedError(
                f"the JSON schema cannot be turned into a grammar: {exc}",
                reason="invalid_request",
                param="response_format",
            ) from exc
        raise InternalError(f"a tool-call grammar failed to compile: {exc}") from exc


class Guide:
    """The grammar's state along one generation: which tokens may come next, and each token taken."""

    def __init__(self, tokenizer: GuideTokenizer, grammar: str) -> None:
        import llguidance
        import llguidance.numpy

        self.tok = tokenizer
        self.matcher = llguidance.LLMatcher(tokenizer.tokenizer, grammar, log_level=0)
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._bits = llguidance.numpy.allocate_token_bitmask(1, tokenizer.n_vocab)
        self._others = np.asarray([t for t in tokenizer.eos if t != tokenizer.end], dtype=np.int64)

    def allowed(self, width: int) -> np.ndarray:
        """A boolean mask over ``width`` logits: the tokens the grammar allows next."""
        self._fill(self.matcher, self._bits, 0)
        bits = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")
        mask = np.zeros(width, dtype=bool)
        n = min(width, self.tok.n_vocab)
        mask[:n] = bits[:n].astype(bool)
        if self._others.size and self.tok.end < width and mask[self.tok.end]:
            mask[self._others[self._others < width]] = True
        if not mask.any():
            reason = self.matcher.get_error() or "no reason given"
            raise InternalError(f"the grammar allows no token here: {reason}")
        return mask

    def consume(self, token: int) -> None:
        """The token picked (always one ``allowed`` gave)."""
        if token in self.tok.eos:
            token = self.tok.end
        if not self.matcher.consume_token(token):
            raise InternalError(f"the grammar refused the token it allowed: {self.matcher.get_error()}")
