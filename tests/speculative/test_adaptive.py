"""speculative.adaptive: each sequence's next proposal length follows its own acceptance."""
from batchlm.speculative.adaptive import next_length


def test_all_accepted_grows_to_k_max():
    assert next_length(2, 2, 2, 4) == 3
    assert next_length(3, 3, 3, 4) == 4
    assert next_length(4, 4, 4, 4) == 4  # never past k_max


def test_a_rejection_shrinks_to_what_was_accepted_plus_one():
    assert next_length(4, 4, 0, 4) == 1
    assert next_length(4, 4, 2, 4) == 3
    assert next_length(1, 1, 0, 4) == 1  # never below one: it keeps checking


def test_a_short_proposal_that_was_all_accepted_still_grows():
    # room or the proposer limited the proposal to 2 while the length was 4: accepted in full
    assert next_length(4, 2, 2, 4) == 4
    assert next_length(1, 1, 1, 4) == 2


def test_nothing_proposed_changes_nothing():
    assert next_length(3, 0, 0, 4) == 3
