"""Which examples form each training batch: seeded, resumable, and grouped by length on
request (so short descriptions are not padded to the longest Q&A pack)."""

from __future__ import annotations

import random

from cxrtrek.model.train import GROUP_SPAN, _Batches, _order


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice((150, 1000)) + rng.randrange(20) for _ in range(n)]


def test_ungrouped_batches_are_the_seeded_permutation_in_order() -> None:
    batches = _Batches(_lengths(10), batch_size=4, seed=3, group_by_length=False)
    drawn = [i for k in range(5) for i in batches(k)]  # two epochs of 10
    assert drawn == [_order(10, 3, p) for p in range(20)]
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))


def test_grouped_batches_cover_an_epoch_once_and_hold_similar_lengths() -> None:
    n, b = 1000, 4
    lengths = _lengths(n)
    batches = _Batches(lengths, batch_size=b, seed=0, group_by_length=True)
    epoch = [batches(k) for k in range(n // b)]
    flat = [i for batch in epoch for i in batch]
    assert len(flat) == len(set(flat)) == n - n % b
    mixed = sum(len({lengths[i] >= 500 for i in batch}) > 1 for batch in epoch)
    stretches = -(-n // (GROUP_SPAN * b))
    assert mixed <= stretches  # at most one batch per sorted stretch straddles the classes
    padded = sum(b * max(lengths[i] for i in batch) for batch in epoch)
    ungrouped = _Batches(lengths, batch_size=b, seed=0, group_by_length=False)
    padded_before = sum(b * max(lengths[i] for i in ungrouped(k)) for k in range(n // b))
    assert padded < 0.8 * padded_before
    # the batches come in shuffled order, not longest first
    firsts = [lengths[batch[0]] >= 500 for batch in epoch[:40]]
    assert 0 < sum(firsts) < 40


def test_grouped_batches_are_a_function_of_seed_and_index() -> None:
    lengths = _lengths(300)
    a = _Batches(lengths, batch_size=4, seed=1, group_by_length=True)
    b = _Batches(lengths, batch_size=4, seed=1, group_by_length=True)
    # drawn out of order (as a resumed run does) they are the same batches
    assert [b(k) for k in (200, 3, 74, 75)] == [a(k) for k in (200, 3, 74, 75)]
    other = _Batches(lengths, batch_size=4, seed=2, group_by_length=True)
    assert [other(k) for k in range(5)] != [a(k) for k in range(5)]
    assert [a(k) for k in range(75)] != [a(k) for k in range(75, 150)]  # a new epoch, new draw


def test_fewer_examples_than_a_batch_fall_back_to_the_plain_order() -> None:
    batches = _Batches([5, 9, 7], batch_size=4, seed=0, group_by_length=True)
    assert batches(0) == [_order(3, 0, p) for p in range(4)]
