"""Sampling parameters, and the one sampling order every text engine follows.

Each step turns the raw logits of the next position into the token drawn:

1. ``logit_bias``: each listed token's bias is added to its logit (-100 in
   effect bans a token, +100 forces it).
2. Penalties, over the last ``PENALTY_LAST_N`` tokens generated in this reply
   (not the prompt), with llama.cpp's semantics: a token seen ``count`` times
   there has its logit divided by ``repeat_penalty`` when positive, multiplied
   when not, then lowered by ``count * frequency_penalty + presence_penalty``.
3. Grammar (structured output, tool calls): tokens it forbids are removed.
4. ``top_k``: only the k most likely stay (0: off).
5. ``top_p``: only the most likely tokens whose probabilities first reach
   ``top_p`` together stay (1: off).
6. ``min_p``: only tokens at least ``min_p`` times as likely as the most likely
   stay (0: off).
7. ``temperature``: the logits left are divided by it.
8. Draw from the softmax of what is left, with the request's seed.
   Temperature 0 is greedy: the highest logit after steps 1 to 3 (steps 4 to 7
   cannot change which one that is).

Steps 4 to 6 see the probabilities before temperature, as in llama.cpp's own
chain (llama-cpp-python's ``_init_sampler``). The GGUF engine runs llama.cpp's
native samplers in this order; the safetensors engine runs ``TokenPicker``
below, the numpy reference of the same order.

When absent, values are llama.cpp server's defaults: temperature 0.8, top_p
0.95, top_k 40, min_p 0.05, repeat_penalty 1.0, frequency and presence 0.

Logprobs report the model's own distribution, as OpenAI's do: the
log-softmax of the raw logits, before any of the steps above.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from allm.kernel.codes import REASON_INVALID_REQUEST, UnsupportedError

if TYPE_CHECKING:
    from allm.managers.text.guided import Guide

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20


def invalid(param: str, message: str) -> UnsupportedError:
    """A request field that allm knows, with a value it cannot take: 400 naming the field."""
    return UnsupportedError(message, reason=REASON_INVALID_REQUEST, param=param)


def _number(params: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise invalid(key, f"{key} must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _integer(params: Mapping[str, Any], key: str, default: int, lo: int, hi: int | None = None) -> int:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"≥ {lo}"
        raise invalid(key, f"{key} must be an integer {bound}, got {value!r}")
    return value


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise invalid("logit_bias", "logit_bias must be an object mapping token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid("logit_bias", f"logit_bias holds {len(value)} entries; at most {MAX_LOGIT_BIAS}")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isdigit():
            token = int(key)
        if token is None or token < 0:
            raise invalid("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        if not isinstance(bias, int | float) or isinstance(bias, bool) or not -100 <= bias <= 100:
            raise invalid(
                "logit_bias", f"logit_bias[{key!r}] must be a number from -100 to 100, got {bias!r}"
            )
        biases[token] = float(bias)
    return tuple(sorted(biases.items()))


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: Mapping[str, Any] | None = None  # constrain output to this schema
    json_object: bool = False  # constrain output to any JSON object
    top_k: int = 40  # 0: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), by token id
    logprobs: bool = False
    top_logprobs: int = 0

    def seed_or_random(self) -> int:
        """The request's seed, or a fresh random one."""
        return self.seed if self.seed is not None else random.getrandbits(31)

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def check_vocab(self, n_vocab: int) -> None:
        """Refuse logit_bias token ids outside a model's vocabulary of n_vocab tokens."""
        outside = [token for token, _ in self.logit_bias if token >= n_vocab]
        if outside:
            raise invalid(
                "logit_bias",
                f"logit_bias names token id {outside[0]}, outside the model's vocabulary "
                f"(ids 0 to {n_vocab - 1})",
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Sampling:
        max_tokens = params.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise invalid("max_tokens", f"max_tokens must be a positive integer, got {max_tokens!r}")
        seed = params.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise invalid("seed", f"seed must be an integer, got {seed!r}")
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise invalid("stop", "stop must be a string or a list of up to 4 strings")
        fmt = params.get("response_format") or {}
        if not isinstance(fmt, Mapping):
            raise invalid("response_format", "response_format must be an object")
        kind = fmt.get("type", "text")
        schema = None
        if kind == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, Mapping):
                raise invalid("response_format", "a json_schema response_format needs a 'schema' object")
        elif kind not in ("text", "json_object"):
            raise invalid(
                "response_format", f"response_format type {kind!r} is not text, json_object or json_schema"
            )
        logprobs = params.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise invalid("logprobs", f"logprobs must be true or false, got {logprobs!r}")
        repeat_penalty = _number(params, "repeat_penalty", 1.0, 0.0, 10.0)
        if repeat_penalty <= 0:
            raise invalid("repeat_penalty", "repeat_penalty must be above 0 (1 is off)")
        return cls(
            max_tokens=max_tokens,
            temperature=_number(params, "temperature", 0.8, 0.0, 2.0),
            top_p=_number(params, "top_p", 0.95, 0.0, 1.0),
            seed=seed,
            stop=tuple(s for s in stop if s),
            json_schema=schema,
            json_object=kind == "json_object",
            top_k=_integer(params, "top_k", 40, 0),
            min_p=_number(params, "min_p", 0.05, 0.0, 1.0),
            repeat_penalty=repeat_penalty,
            frequency_penalty=_number(params, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_number(params, "presence_penalty", 0.0, -2.0, 2.0),
            logit_bias=_logit_bias(params.get("logit_bias")),
            logprobs=bool(logprobs),
            top_logprobs=_integer(params, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS),
        )


# -- the numpy reference of the order ------------------------------------------------------


def bias_and_penalize(logits: np.ndarray, sampling: Sampling, recent: Iterable[int]) -> np.ndarray:
    """Steps 1 and 2 on a copy of ``logits``; ``recent`` are the last tokens generated."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if sampling.logit_bias:
        ids = np.fromiter((t for t, _ in sampling.logit_bias), dtype=np.int64)
        keep = ids < out.shape[0]
        out[ids[keep]] += np.fromiter((b for _, b in sampling.logit_bias), dtype=np.float32)[keep]
    seen = list(recent)
    if seen and sampling.penalized:
        ids, counts = np.unique(np.asarray(seen, dtype=np.int64), return_counts=True)
        x = out[ids]
        r = np.float32(sampling.repeat_penalty)
        x = np.where(x <= 0, x * r, x / r)
        x -= counts.astype(np.float32) * np.float32(sampling.frequency_penalty)
        x -= np.float32(sampling.presence_penalty)
        out[ids] = x
    return out


def candidates(logits: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """Steps 4 to 7: the token ids left, most likely first, and their probabilities."""
    n = logits.shape[0]
    k = sampling.top_k
    ids = np.argpartition(-logits, k - 1)[:k] if 0 < k < n else np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    values = logits[ids].astype(np.float64)
    if sampling.top_p < 1.0:
        p = _softmax(values)
        before = np.cumsum(p) - p  # the mass of the more likely tokens
        values = values[: max(1, int(np.count_nonzero(before < sampling.top_p)))]
    if sampling.min_p > 0.0:
        floor = values[0] + math.log(sampling.min_p)
        values = values[: max(1, int(np.count_nonzero(values >= floor)))]
    ids = ids[: values.shape[0]]
    return ids, _softmax(values / sampling.temperature)


def _softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max())
    return np.asarray(e / e.sum())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max()
    return np.asarray(x - top - math.log(float(np.exp(x - top).sum())))


class TokenPicker:
    """The order above for engines whose library has no sampler of its own to follow it.

    ``pick`` takes the raw logits of the next position and returns the token;
    ``logprob_entry`` then reports that position (in the order positions were picked,
    so a backend that computes one step ahead still pairs each token with its own).
    """

    def __init__(self, sampling: Sampling, seed: int, guide: Guide | None = None) -> None:
        self.sampling = sampling
        self.guide = guide  # the grammar's step 3, when the request has one (guided.py)
        self.rng = np.random.default_rng(seed)
        self.recent: collections.deque[int] = collections.deque(maxlen=PENALTY_LAST_N)
        self.raw: collections.deque[np.ndarray] = collections.deque(maxlen=4)

    def pick(self, logits: np.ndarray) -> int:
        s = self.sampling
        if s.logprobs:
            self.raw.append(logits)
        adjusted = bias_and_penalize(logits, s, self.recent)
        if self.guide is not None:
            adjusted[~self.guide.allowed(adjusted.shape[0])] = -np.inf
        if s.temperature == 0:
            token = int(np.argmax(adjusted))
        else:
            ids, p = candidates(adjusted, s)
            token = int(ids[self.rng.choice(ids.shape[0], p=p)])
        if self.guide is not None:
            self.guide.consume(token)
        self.recent.append(token)
        return token

    def logprob_entry(self, token: int, top_n: int, piece: Callable[[int], bytes]) -> dict[str, Any]:
        """The entry of the oldest position not yet reported (see ``logprob_entry``)."""
        return logprob_entry(self.raw.popleft(), token, top_n, piece)


def logprob_entry(
    logits: np.ndarray, token: int, top_n: int, piece: Callable[[int], bytes]
) -> dict[str, Any]:
    """OpenAI's logprobs entry for ``token`` drawn from raw ``logits``; ``piece`` gives a token's bytes."""
    lp = log_softmax(logits)
    top_n = min(top_n, lp.shape[0])
    chosen = np.argpartition(-lp, top_n - 1)[:top_n].tolist() if top_n else []
    best = sorted(chosen, key=lambda t: (-lp[t], t))

    def one(t: int) -> dict[str, Any]:
        data = piece(t)
        return {"token": data.decode("utf-8", "replace"), "logprob": float(lp[t]), "bytes": list(data)}

    return {**one(token), "top_logprobs": [one(t) for t in best]}
