"""Request placement is a pure function of the instances' state and the time: tested with plain values."""

import pytest

from allm.kernel.placement import Absence, Ask, Candidate, NoPlace, Why, place, rank, serves

A, B, C = "ipc:///run/text-0.sock", "ipc:///run/text-1.sock", "tcp://10.0.0.2:7000"
NOW = 1000.0


def key(outcome: Candidate | NoPlace) -> str:
    assert isinstance(outcome, Candidate), outcome
    return outcome.key


def why(outcome: Candidate | NoPlace) -> Why:
    assert isinstance(outcome, NoPlace), outcome
    return outcome.why


# -- the catalog ---------------------------------------------------------------------


def test_only_instances_whose_catalog_has_the_model_are_chosen():
    cands = [
        Candidate(A, catalog=frozenset({"small"})),
        Candidate(B, catalog=frozenset({"big"}), outstanding=5),
    ]
    assert key(place(cands, Ask(model="big"), NOW)) == B


def test_no_catalog_with_the_model_is_model_not_found_at_once_even_with_none_live():
    cands = [
        Candidate(A, live=False, catalog=frozenset({"small"})),
        Candidate(B, live=True, catalog=frozenset()),
    ]
    assert place(cands, Ask(model="big"), NOW) == NoPlace(Why.MODEL_NOT_FOUND)


def test_an_instance_that_has_not_said_its_catalog_may_serve_any_model():
    cands = [Candidate(A, catalog=frozenset({"small"})), Candidate(B, catalog=None)]
    assert key(place(cands, Ask(model="big"), NOW)) == B
    assert serves(Candidate(B), "anything")


def test_a_request_of_no_model_goes_to_any_catalog():
    cands = [Candidate(A, catalog=frozenset(), outstanding=1), Candidate(B, catalog=frozenset())]
    assert key(place(cands, Ask(), NOW)) == B


def test_a_model_in_a_dead_instances_catalog_waits_rather_than_going_elsewhere():
    cands = [Candidate(A, live=False, catalog=frozenset({"big"})), Candidate(B, catalog=frozenset({"small"}))]
    outcome = place(cands, Ask(model="big"), NOW)
    assert outcome == NoPlace(Why.WAIT, (cands[0],))


# -- load, preference, loaded model, order -------------------------------------------


def test_the_live_instance_with_the_fewest_outstanding_requests_wins():
    cands = [Candidate(A, outstanding=3), Candidate(B, outstanding=1), Candidate(C, outstanding=2)]
    assert key(place(cands, Ask(), NOW)) == B


def test_dead_instances_are_not_chosen_however_idle():
    cands = [Candidate(A, live=False), Candidate(B, outstanding=7)]
    assert key(place(cands, Ask(), NOW)) == B


def test_among_equals_the_preferred_instance_wins_over_a_loaded_model_and_the_order():
    cands = [
        Candidate(A, loaded=frozenset({"m"}), outstanding=1),
        Candidate(B, outstanding=1),
    ]
    assert key(place(cands, Ask(model="m", prefer=(B,)), NOW)) == B


def test_the_preferred_instance_loses_to_a_less_loaded_one():
    cands = [Candidate(A, outstanding=0), Candidate(B, outstanding=1)]
    assert key(place(cands, Ask(prefer=(B,)), NOW)) == A


def test_a_dead_preferred_instance_is_passed_over_without_waiting():
    cands = [Candidate(A, outstanding=4), Candidate(B, live=False)]
    assert key(place(cands, Ask(prefer=(B,)), NOW)) == A


def test_a_preferred_instance_without_the_model_in_its_catalog_is_passed_over():
    cands = [Candidate(A, catalog=frozenset({"m"}), outstanding=2), Candidate(B, catalog=frozenset({"n"}))]
    assert key(place(cands, Ask(model="m", prefer=(B,)), NOW)) == A


def test_a_preference_for_an_unknown_instance_changes_nothing():
    cands = [Candidate(A), Candidate(B)]
    assert key(place(cands, Ask(prefer=("ipc:///elsewhere.sock",)), NOW)) == A


def test_several_preferences_count_in_their_order():
    cands = [Candidate(A), Candidate(B), Candidate(C)]
    assert key(place(cands, Ask(prefer=(C, B)), NOW)) == C
    assert key(place(cands, Ask(prefer=(B, C)), NOW)) == B
    # The first hint's instance busier: the second hint's wins among the idle ones.
    busy_c = [Candidate(A), Candidate(B), Candidate(C, outstanding=1)]
    assert key(place(busy_c, Ask(prefer=(C, B)), NOW)) == B


def test_among_equals_one_with_the_model_loaded_wins_over_the_order():
    cands = [Candidate(A, loaded=frozenset({"other"})), Candidate(B, loaded=frozenset({"m"}))]
    assert key(place(cands, Ask(model="m"), NOW)) == B


def test_a_loaded_model_does_not_outweigh_load():
    cands = [Candidate(A, outstanding=1, loaded=frozenset({"m"})), Candidate(B)]
    assert key(place(cands, Ask(model="m"), NOW)) == B


def test_among_equals_the_earlier_instance_wins():
    cands = [Candidate(C, outstanding=2), Candidate(B, outstanding=2), Candidate(A, outstanding=2)]
    assert key(place(cands, Ask(model="m"), NOW)) == C


def test_the_rank_orders_load_then_preference_then_loaded_model():
    ask = Ask(model="m", prefer=(B,))
    assert rank(Candidate(A, outstanding=1, loaded=frozenset({"m"})), ask) == (1, 1, False)
    assert rank(Candidate(B, outstanding=1), ask) == (1, 0, True)
    assert rank(Candidate(C), Ask()) == (0, 0, False)


# -- one instance asked for ------------------------------------------------------------


def test_a_request_for_one_instance_goes_there_however_busy():
    cands = [Candidate(A), Candidate(B, outstanding=9)]
    assert key(place(cands, Ask(only=B), NOW)) == B


def test_a_request_for_an_unknown_instance_is_refused():
    cands = [Candidate(A), Candidate(B)]
    assert why(place(cands, Ask(only=C), NOW)) is Why.NO_SUCH_INSTANCE


def test_a_request_for_an_instance_whose_catalog_lacks_the_model_is_refused():
    cands = [Candidate(A, catalog=frozenset({"m"})), Candidate(B, catalog=frozenset({"n"}))]
    assert why(place(cands, Ask(model="m", only=B), NOW)) is Why.NO_SUCH_INSTANCE


def test_a_request_for_a_dead_instance_waits_for_it_only():
    cands = [Candidate(A), Candidate(B, live=False)]
    assert place(cands, Ask(only=B), NOW) == NoPlace(Why.WAIT, (cands[1],))


# -- capacity --------------------------------------------------------------------------


def test_a_full_least_loaded_instance_is_at_capacity():
    cands = [Candidate(A, outstanding=4, capacity=4), Candidate(B, outstanding=5, capacity=8)]
    assert place(cands, Ask(), NOW) == NoPlace(Why.AT_CAPACITY, (cands[0],))


def test_a_request_sent_again_is_placed_past_capacity():
    cands = [Candidate(A, outstanding=4, capacity=4)]
    assert key(place(cands, Ask(resend=True), NOW)) == A


def test_an_instance_whose_capacity_is_unknown_takes_any_number():
    cands = [Candidate(A, outstanding=10_000, capacity=None)]
    assert key(place(cands, Ask(), NOW)) == A


def test_below_capacity_is_placed():
    cands = [Candidate(A, outstanding=3, capacity=4)]
    assert key(place(cands, Ask(), NOW)) == A


# -- none live -------------------------------------------------------------------------


def test_none_live_waits():
    cands = [Candidate(A, live=False), Candidate(B, live=False, heard_at=NOW - 100)]
    assert place(cands, Ask(), NOW) == NoPlace(Why.WAIT, tuple(cands))


def test_every_instance_failed_is_failed():
    cands = [Candidate(A, live=False, failed="exited 3"), Candidate(B, live=False, failed="exited 4")]
    assert place(cands, Ask(), NOW) == NoPlace(Why.FAILED, tuple(cands))


def test_one_failed_and_one_restarting_waits():
    cands = [Candidate(A, live=False, failed="exited 3"), Candidate(B, live=False)]
    assert why(place(cands, Ask(), NOW)) is Why.WAIT


def test_a_failed_instance_is_passed_over_for_a_live_one():
    cands = [Candidate(A, live=False, failed="exited 3"), Candidate(B, outstanding=3)]
    assert key(place(cands, Ask(), NOW)) == B


def test_only_failed_instances_with_the_model_count():
    cands = [
        Candidate(A, live=False, failed="exited 3", catalog=frozenset({"m"})),
        Candidate(B, live=False, catalog=frozenset({"n"})),
    ]
    assert place(cands, Ask(model="m"), NOW) == NoPlace(Why.FAILED, (cands[0],))


ABSENCE = Absence(after_s=10.0, since=NOW - 60)


def test_none_heard_for_longer_than_the_absence_is_absent():
    cands = [Candidate(A, live=False, heard_at=NOW - 11), Candidate(B, live=False)]
    assert place(cands, Ask(), NOW, ABSENCE) == NoPlace(Why.ABSENT, tuple(cands))


def test_one_heard_recently_keeps_the_modality_waiting():
    cands = [Candidate(A, live=False, heard_at=NOW - 11), Candidate(B, live=False, heard_at=NOW - 9)]
    assert why(place(cands, Ask(), NOW, ABSENCE)) is Why.WAIT


def test_an_instance_never_heard_counts_from_the_clients_start():
    cands = [Candidate(A, live=False)]
    assert why(place(cands, Ask(), NOW, Absence(after_s=10.0, since=NOW - 5))) is Why.WAIT
    assert why(place(cands, Ask(), NOW, Absence(after_s=10.0, since=NOW - 10.5))) is Why.ABSENT


def test_silence_of_exactly_the_absence_still_waits():
    cands = [Candidate(A, live=False, heard_at=NOW - 10)]
    assert why(place(cands, Ask(), NOW, ABSENCE)) is Why.WAIT


def test_without_an_absence_silence_waits_forever():
    cands = [Candidate(A, live=False, heard_at=0.5)]
    assert why(place(cands, Ask(), NOW)) is Why.WAIT


def test_failed_is_said_before_absent():
    cands = [Candidate(A, live=False, failed="bad version", heard_at=NOW - 100)]
    assert why(place(cands, Ask(), NOW, ABSENCE)) is Why.FAILED


def test_a_live_instance_is_chosen_however_long_ago_it_was_heard():
    # Liveness is the client's to judge (heartbeat timeout); placement trusts ``live``.
    cands = [Candidate(A, heard_at=NOW - 100)]
    assert key(place(cands, Ask(), NOW, ABSENCE)) == A


def test_placement_needs_the_modalitys_instances():
    with pytest.raises(ValueError, match="at least one"):
        place([], Ask(), NOW)
