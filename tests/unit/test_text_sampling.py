"""Sampling parameters and the documented sampling order, on toy logit vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from allm.kernel.codes import UnsupportedError
from allm.managers.text.sampling import (
    PENALTY_LAST_N,
    Sampling,
    TokenPicker,
    bias_and_penalize,
    candidates,
    log_softmax,
    logprob_entry,
)


def test_defaults_are_one_documented_set():
    s = Sampling.from_params({})
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.8, 0.95, 40, 0.05)
    assert (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) == (1.0, 0.0, 0.0)
    assert (s.logit_bias, s.logprobs, s.top_logprobs) == ((), False, 0)
    assert not s.penalized


def test_every_option_is_read():
    s = Sampling.from_params(
        {
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.1,
            "repeat_penalty": 1.3,
            "frequency_penalty": -0.5,
            "presence_penalty": 1.5,
            "logit_bias": {"12": 5, 3: -100.0},
            "logprobs": True,
            "top_logprobs": 20,
        }
    )
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.5, 0.9, 7, 0.1)
    assert (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) == (1.3, -0.5, 1.5)
    assert s.logit_bias == ((3, -100.0), (12, 5.0))
    assert s.logprobs
    assert s.top_logprobs == 20
    assert s.penalized


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_penalty": 11}, "repeat_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": True}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_out_of_bounds_values_name_their_param(params, param):
    with pytest.raises(UnsupportedError) as info:
        Sampling.from_params(params)
    assert info.value.param == param
    assert info.value.reason == "invalid_request"


def test_logit_bias_outside_the_vocabulary_names_logit_bias():
    s = Sampling.from_params({"logit_bias": {"10": 1, "300": 1}})
    s.check_vocab(301)
    with pytest.raises(UnsupportedError) as info:
        s.check_vocab(300)
    assert info.value.param == "logit_bias"
    assert "300" in info.value.message


def sampling(**params) -> Sampling:
    return Sampling.from_params({"temperature": 0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **params})


def test_bias_comes_before_penalties_with_llama_cpp_semantics():
    logits = np.array([2.0, -1.0, 0.5, 0.0], dtype=np.float32)
    s = sampling(logit_bias={"1": 3}, repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = bias_and_penalize(logits, s, [1, 1, 2])
    # token 1: -1 + 3 = 2 (> 0, so divided), then seen twice: 2/2 - 2*0.5 - 0.25
    assert out[1] == pytest.approx(2 / 2 - 1.0 - 0.25)
    # token 2: 0.5 seen once: 0.5/2 - 0.5 - 0.25; a logit ≤ 0 is multiplied instead
    assert out[2] == pytest.approx(0.25 - 0.75)
    assert out[0] == 2.0
    assert out[3] == 0.0
    assert logits[1] == -1.0  # the raw logits stay as they were
    negative = bias_and_penalize(np.array([-1.0, 0.0], dtype=np.float32), sampling(repeat_penalty=2.0), [0])
    assert negative[0] == -2.0


def test_penalties_count_only_the_last_n_tokens():
    picker = TokenPicker(sampling(presence_penalty=2.0), seed=0)
    logits = np.zeros(PENALTY_LAST_N + 2, dtype=np.float32)
    logits[0] = 1.0
    picker.recent.extend(range(1, PENALTY_LAST_N + 1))  # token 0 pushed out of the window
    assert picker.pick(logits) == 0


def test_top_k_then_top_p_then_min_p_see_probabilities_before_temperature():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    # top_k 3 keeps 0.5, 0.3, 0.15 (renormalised 0.526, 0.316, 0.158); top_p 0.8 then keeps two
    ids, p = candidates(logits, sampling(temperature=1.0, top_k=3, top_p=0.8))
    assert ids.tolist() == [0, 1]
    assert p == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    # without top_k, the smallest set reaching 0.75 is the same two
    assert candidates(logits, sampling(temperature=1.0, top_p=0.75))[0].tolist() == [0, 1]
    # min_p keeps tokens at least 0.25 times the best: 0.5, 0.3, 0.15
    assert candidates(logits, sampling(temperature=1.0, min_p=0.25))[0].tolist() == [0, 1, 2]
    # a high temperature does not widen what the filters keep: they ran before it
    hot = candidates(logits, sampling(temperature=2.0, top_p=0.75, min_p=0.25))
    assert hot[0].tolist() == [0, 1]
    tempered = np.sqrt([0.5, 0.3])  # exp(log p / 2)
    assert hot[1] == pytest.approx(tempered / tempered.sum())


def test_filters_always_keep_one_token():
    logits = np.array([5.0, 1.0, 0.0])
    assert candidates(logits, sampling(temperature=1.0, top_p=0.0))[0].tolist() == [0]
    assert candidates(logits, sampling(temperature=1.0, min_p=1.0))[0].tolist() == [0]


def test_greedy_follows_bias_and_penalties_and_top_k_1_is_greedy():
    logits = np.array([0.5, 3.0, 2.0], dtype=np.float32)
    assert TokenPicker(sampling(), 0).pick(logits) == 1
    assert TokenPicker(sampling(logit_bias={"1": -100}), 0).pick(logits) == 2
    assert TokenPicker(sampling(logit_bias={"0": 100}), 0).pick(logits) == 0
    picker = TokenPicker(sampling(frequency_penalty=2.0), 0)
    assert [picker.pick(logits) for _ in range(3)] == [1, 2, 1]
    for seed in range(5):
        assert TokenPicker(sampling(temperature=1.5, top_k=1), seed).pick(logits) == 1


def test_a_seed_reproduces_the_draw():
    logits = np.zeros(50, dtype=np.float32)
    s = sampling(temperature=1.0)
    one = TokenPicker(s, 7)
    two = TokenPicker(s, 7)
    assert [one.pick(logits) for _ in range(10)] == [two.pick(logits) for _ in range(10)]


def test_logprob_entries_report_the_raw_distribution_sorted():
    logits = np.array([0.0, 2.0, 1.0, 2.0, -1.0], dtype=np.float32)
    picker = TokenPicker(sampling(logit_bias={"4": 100}, logprobs=True), 0)
    token = picker.pick(logits)
    assert token == 4  # drawn after the bias ...
    entry = picker.logprob_entry(token, 3, lambda t: f"<{t}>".encode())
    lp = log_softmax(logits)
    assert entry["token"] == "<4>"
    assert entry["bytes"] == list(b"<4>")
    assert entry["logprob"] == pytest.approx(lp[4])  # ... reported before it
    assert [e["token"] for e in entry["top_logprobs"]] == ["<1>", "<3>", "<2>"]
    values = [e["logprob"] for e in entry["top_logprobs"]]
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(x) for x in lp) == pytest.approx(1.0)


def test_logprob_entries_pair_with_tokens_in_order():
    picker = TokenPicker(sampling(logprobs=True), 0)
    first = picker.pick(np.array([1.0, 0.0], dtype=np.float32))
    second = picker.pick(np.array([0.0, 3.0], dtype=np.float32))  # a backend one step ahead
    assert (first, second) == (0, 1)
    one = picker.logprob_entry(first, 1, lambda t: b"x")
    two = picker.logprob_entry(second, 1, lambda t: b"x")
    assert one["logprob"] == pytest.approx(log_softmax(np.array([1.0, 0.0]))[0])
    assert two["logprob"] == pytest.approx(log_softmax(np.array([0.0, 3.0]))[1])


def test_logprob_entry_with_no_alternatives():
    entry = logprob_entry(np.array([0.0, 0.0]), 1, 0, lambda t: b"a")
    assert entry["top_logprobs"] == []
    assert entry["logprob"] == pytest.approx(math.log(0.5))
