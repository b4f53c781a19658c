"""The staleness tally (:class:`hpctrain.metrics.Tally`): counts per value give exactly the
summary's distribution of the values themselves, in a state that does not grow with them."""

import io
import random

import numpy as np
import pytest
import torch

from hpctrain.metrics import Tally, distribution


@pytest.mark.parametrize("seed", range(5))
def test_a_tallys_distribution_is_exactly_that_of_its_values(seed):
    """mean, p50, p90, p99 (numpy's interpolation, both of its lerp's formulas), max and count
    equal (==) what ``distribution`` of the expanded values gives, small ranges (ties between
    neighbours) and large (interpolated between far-apart values) alike."""
    rng = random.Random(seed)
    for _ in range(200):
        size, top = rng.randint(1, 1000), rng.choice([0, 1, 5, 50, 10**6, 10**12])
        values = [rng.randint(0, top) for _ in range(size)]
        tally = Tally()
        for v in values:
            tally.add(v)
        assert tally.distribution() == distribution(values), values
        assert len(tally) == size and tally.total == sum(values)


def test_the_upper_lerp_formula_is_the_one_numpy_takes():
    """For t >= 0.5 numpy interpolates from the upper neighbour, b - (b-a)(1-t), which can
    differ from a + (b-a)t in the last bit: here p90 is at index 2.7, between 1 and b."""
    b = 10**15 + 3
    values = [1, 1, 1, b]
    p90 = Tally.of(values).distribution()["p90"]
    assert p90 == distribution(values)["p90"] == 700000000000002.5
    assert p90 != 1.0 + (b - 1.0) * ((4 - 1) * 0.9 - 2)  # the lower formula's 700000000000002.6


def test_at_exactly_half_way_numpy_takes_the_upper_formula_too():
    """t = 0.5 (the p50 of two values) is the upper formula's: the lower one's result is a
    unit in the last place higher here."""
    a, b = 228786638423745, 10086808620262996
    p50 = Tally.of([a, b]).distribution()["p50"]
    assert p50 == distribution([a, b])["p50"] == 5157797629343370.0
    assert p50 != a + (float(b) - a) * 0.5


def test_merged_tallies_are_the_tally_of_all_values_and_empty_is_zeros():
    parts = [[3, 1, 3], [], [0, 7]]
    merged = Tally.merged(Tally.of(p) for p in parts)
    assert merged == Tally.of([3, 1, 3, 0, 7]) and merged.counts == {0: 1, 1: 1, 3: 2, 7: 1}
    assert merged.distribution() == distribution([3, 1, 3, 0, 7])
    assert Tally().distribution() == distribution([]) and len(Tally()) == 0
    assert distribution(np.array([3, 1, 3])) == distribution([3, 1, 3])  # arrays as lists


def test_a_tallys_state_is_plain_ints_that_do_not_grow_with_the_values():
    """The checkpoint form: value -> count, read back by torch.load(weights_only=True); 10 or
    10000 values in 0..5 give at most 6 entries."""
    rng = random.Random(0)
    sizes = {}
    for n in (10, 10000):
        tally = Tally.of([rng.randint(0, 5) for _ in range(n)])
        state = tally.state()
        assert len(state) <= 6 and sum(state.values()) == n
        assert all(type(k) is int and type(v) is int for k, v in state.items())
        buffer = io.BytesIO()
        torch.save({"staleness": state}, buffer)
        buffer.seek(0)
        back = Tally.of(torch.load(buffer, weights_only=True)["staleness"])
        assert back == tally and back.distribution() == tally.distribution()
        sizes[n] = buffer.getbuffer().nbytes
    # torch.save aligns its records to 64 bytes: a digit more can cost 64 (a list: 20 kB)
    assert sizes[10000] - sizes[10] <= 128, sizes


def test_an_old_list_state_is_read_and_non_integers_are_refused():
    """Checkpoints written before tallies listed every value: :meth:`Tally.of` counts them."""
    assert Tally.of([2, 0, 2]).state() == {0: 1, 2: 2}
    assert Tally.of({2: 2, 0: 1}) == Tally.of([2, 0, 2])
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="need integers"):
            Tally().add(bad)
    with pytest.raises(ValueError, match="negative"):
        Tally().add(1, -1)
    with pytest.raises(TypeError, match="need integers"):
        Tally().add(1, True)  # a count that is a flag is a mistake, not once


def test_a_count_of_zero_adds_nothing_not_even_its_value():
    """``add(v, 0)`` leaves no entry: one with count 0 would show in the state, break ==, and
    be the max of a distribution that never saw it."""
    tally = Tally.of([1, 2])
    tally.add(9, 0)
    assert tally == Tally.of([1, 2]) and tally.state() == {1: 1, 2: 1}
    assert tally.distribution() == distribution([1, 2])


def test_a_tally_is_equal_only_to_a_tally_unhashable_and_shown_sorted():
    """Compared with anything else it is unequal (no AttributeError); being mutable it has
    no hash; its repr and its checkpoint state list the values in order, and the state is
    a copy that the caller may change."""
    tally = Tally.of([3, 1, 3])
    assert tally != {1: 1, 3: 2} and tally != None  # noqa: E711 (== None must not raise)
    with pytest.raises(TypeError, match="unhashable"):
        hash(tally)
    assert repr(tally) == "Tally({1: 1, 3: 2})"
    state = tally.state()
    assert list(state) == [1, 3]
    state[5] = 1
    assert tally.state() == {1: 1, 3: 2}
