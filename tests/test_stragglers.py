"""Straggler injection: seeded jitter that a resumed run continues where it stopped; which
worker --slowdown names."""

import io
import math

import pytest
import torch
from conftest import SYNTHETIC, refusal

from hpctrain.errors import UsageError
from hpctrain.stragglers import Straggler, parse_slowdown


def test_resumed_jitter_draws_what_the_uninterrupted_run_draws():
    whole = Straggler(jitter=0.5, seed=1, rank=2)
    first = Straggler(jitter=0.5, seed=1, rank=2)
    draws = [whole.step_factor() for _ in range(10)]
    assert draws[:4] == [first.step_factor() for _ in range(4)]
    first.slept = 1.5
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint holds it: plain data only
    buffer.seek(0)
    resumed = Straggler(jitter=0.5, seed=1, rank=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [resumed.step_factor() for _ in range(6)] == draws[4:]
    assert resumed.slept == 1.5
    assert Straggler(jitter=0.5, seed=1, rank=3).step_factor() != draws[0]


def test_a_slowdown_refused_says_ranks_are_workers_indices():
    """--eval-rank 1 on 3 ranks: world rank 2 trains, yet --slowdown 2:3 was refused as "not a
    worker", and --slowdown 1:3 slowed world rank 2, without a word of why."""
    message = refusal(["--algo", "ssgd", *SYNTHETIC, "--eval", "online", "--eval-rank", "1",
                       "--slowdown", "2:3"], 3)
    assert message == ("--slowdown 2:3: rank 2 is not a worker (0..1); RANK is a worker's "
                       "index among the ranks that train: with --eval-rank R, world rank r > "
                       "R is worker r - 1")


def test_slowdown_factors_are_taken_in_1_to_1e6_bounds_included_and_once_per_rank():
    """``[1, 1e6]`` is closed at both ends (1: no slowdown, as written in a sweep); a factor
    below 1 would be a speed-up that a sleep cannot give; a rank named twice is ambiguous."""
    assert parse_slowdown("0:1,1:1e6", 2) == {0: 1.0, 1: 1e6}
    assert parse_slowdown(" 1:2.5 ", 2) == {1: 2.5} and parse_slowdown(None, 2) == {}
    for text in ("0:0.5", "0:nan", "0:1000001"):
        with pytest.raises(UsageError, match=r"must be in \[1, 1e\+06\]"):
            parse_slowdown(text, 1)
    with pytest.raises(UsageError, match="rank 0 given twice"):
        parse_slowdown("0:2,0:3", 1)


def test_jitter_is_log_normal_around_the_factor():
    """``exp(SIGMA z)`` times the factor: over many seeded draws log(draw / factor) has mean 0
    and standard deviation SIGMA (a shifted mean would slow every worker on average)."""
    straggler = Straggler(factor=2.0, jitter=0.5, seed=3, rank=1)
    logs = torch.tensor([math.log(straggler.step_factor() / 2.0) for _ in range(4000)])
    assert abs(logs.mean().item()) < 0.05 and abs(logs.std().item() - 0.5) < 0.05
    assert straggler.active and Straggler(jitter=0.1).active and not Straggler().active
    assert Straggler().step_factor() == 1.0 and Straggler(factor=3.0).step_factor() == 3.0


def test_a_padded_step_sleeps_the_factor_less_one_times_its_length_and_adds_it_up():
    """A step of t seconds with factor f sleeps (f - 1) t, and ``slept`` sums the sleeps (the
    summary's time lost to stragglers); factor 1 sleeps nothing. Milliseconds, to stay fast."""
    straggler = Straggler(factor=1.5)
    assert straggler.pad(0.002) == pytest.approx(0.001)
    assert straggler.pad(0.004) == pytest.approx(0.002)
    assert straggler.slept == pytest.approx(0.003)
    idle = Straggler()
    assert idle.pad(0.002) == 0.0 and idle.slept == 0.0
