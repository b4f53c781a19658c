"""Straggler injection: seeded jitter that a resumed run continues where it stopped; which
worker --slowdown names."""

import io

import torch
from conftest import SYNTHETIC, refusal

from hpctrain.stragglers import Straggler


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
