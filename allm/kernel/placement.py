"""Which manager instance serves a request: a pure function of what the kernel client knows.

The client hands over every instance of the request's modality as plain data, in its
configured order, with the time; it gets back the instance to send to, or why there is none:

    only instances whose catalog has the model      none has it: MODEL_NOT_FOUND, at once
    only the instance asked for, when one is        not among them: NO_SUCH_INSTANCE
    among the live ones, the fewest outstanding     the chosen one is full: AT_CAPACITY
      then the caller's preferred ones, best first    (unless it is sent again: it held a
      then one that has the model loaded               place in a line already)
      then the earlier one
    none live, and every one failed for good        FAILED
    none live, none heard from for a while          ABSENT (only with ``Absence``)
    none live otherwise                             WAIT for the next heartbeat

An instance leaves the live ones when its connection closes, its heartbeats stop or it
drains, and rejoins with its next heartbeat: the client keeps ``live``, this module reads it.
No sockets, no event loop, no clock: the time is an argument.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import NamedTuple

# Candidate and Ask are built on every request: a NamedTuple is built in half the time of a
# frozen dataclass, and is as immutable.


class Candidate(NamedTuple):
    """One manager instance as placement sees it."""

    key: str  # the instance's endpoint
    live: bool = True  # its heartbeats arrive, it is connected and not draining
    catalog: frozenset[str] | None = None  # the models it can serve; None until it says
    loaded: frozenset[str] = frozenset()  # the models it holds in memory now
    outstanding: int = 0  # requests sent to it that have not ended
    capacity: int | None = None  # the most requests it accepts at once; None until it says
    failed: str | None = None  # why it failed and will not be restarted
    heard_at: float | None = None  # time.monotonic() of its last message


class Ask(NamedTuple):
    """What a request says about where it may go."""

    model: str = ""  # "" for an operation of no model, which any instance serves
    # Instances to choose among equally loaded ones, best first: hints from any source
    # (the instance that served the previous response holds the conversation's prefix).
    prefer: tuple[str, ...] = ()
    only: str | None = None  # this instance and no other (a reload's catalog goes to each)
    resend: bool = False  # sent again after its instance died: it held a place in line already
    # a key naming what the request continues (a conversation): the instance that served the
    # key last is preferred after ``prefer``, and is remembered as the key's home
    affinity: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Absence:
    """When silence means no manager is coming (no supervisor of ours to say so)."""

    after_s: float  # no instance heard from for longer than this
    since: float  # time.monotonic() the client started: an instance never heard counts from it


class Why(enum.Enum):
    """Why a request has no instance now."""

    MODEL_NOT_FOUND = "model_not_found"  # no instance's catalog has the model
    NO_SUCH_INSTANCE = "no_such_instance"  # the instance asked for does not serve the request
    AT_CAPACITY = "at_capacity"  # the least-loaded live instance takes no more
    FAILED = "failed"  # every instance failed and will not be restarted
    ABSENT = "absent"  # none has been heard from for ``Absence.after_s``
    WAIT = "wait"  # none is live now; one may become so


@dataclasses.dataclass(frozen=True, slots=True)
class NoPlace:
    """No instance for the request, and why."""

    why: Why
    # AT_CAPACITY: the full instance; FAILED, ABSENT, WAIT: those the request may go to.
    among: tuple[Candidate, ...] = ()


def place(
    candidates: Sequence[Candidate], ask: Ask, now: float, absence: Absence | None = None
) -> Candidate | NoPlace:
    """The instance that serves ``ask`` among ``candidates`` (in the client's order), or why none does."""
    if not candidates:
        raise ValueError("placement needs the modality's instances: it has at least one")
    among = [c for c in candidates if serves(c, ask.model)]
    if not among:
        return NoPlace(Why.MODEL_NOT_FOUND)
    if ask.only is not None:
        among = [c for c in among if c.key == ask.only]
        if not among:
            return NoPlace(Why.NO_SUCH_INSTANCE)
    live = [c for c in among if c.live]
    if live:
        chosen = min(live, key=lambda c: rank(c, ask))  # min keeps the earliest of equals
        if not ask.resend and chosen.capacity is not None and chosen.outstanding >= chosen.capacity:
            return NoPlace(Why.AT_CAPACITY, (chosen,))
        return chosen
    if all(c.failed is not None for c in among):
        return NoPlace(Why.FAILED, tuple(among))
    if absence is not None and all(
        now - (absence.since if c.heard_at is None else c.heard_at) > absence.after_s for c in among
    ):
        return NoPlace(Why.ABSENT, tuple(among))
    return NoPlace(Why.WAIT, tuple(among))


def serves(candidate: Candidate, model: str) -> bool:
    """Whether the instance's catalog holds the model (yes until it has said what it holds)."""
    return not model or candidate.catalog is None or model in candidate.catalog


def rank(candidate: Candidate, ask: Ask) -> tuple[int, int, bool]:
    """Lower is better: fewer outstanding requests, then preferred (earlier hints first), then
    the model loaded."""
    preferred = ask.prefer.index(candidate.key) if candidate.key in ask.prefer else len(ask.prefer)
    loaded = not ask.model or ask.model in candidate.loaded
    return (candidate.outstanding, preferred, not loaded)
