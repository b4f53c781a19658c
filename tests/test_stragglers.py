"""Straggler injection: seeded jitter that a resumed run continues where it stopped; which
worker --slowdown names; its forms (RANK:FACTOR, RANK:+DELAY, RANK:FACTOR+DELAY) and the sleep
each asks for."""

import io
import math

import pytest
import torch
from conftest import SYNTHETIC, refusal

from hpctrain.checkpoint import policy
from hpctrain.config import StragglerConfig
from hpctrain.errors import UsageError
from hpctrain.stragglers import Slowdown, Straggler, parse_slowdown


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
    assert parse_slowdown("0:1,1:1e6", 2) == {0: Slowdown(1.0), 1: Slowdown(1e6)}
    assert parse_slowdown(" 1:2.5 ", 2) == {1: Slowdown(2.5)} and parse_slowdown(None, 2) == {}
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


def test_a_fixed_delay_is_read_in_ms_or_s_alone_or_after_a_factor():
    """``+DELAY`` adds a fixed sleep per step (a reproducible straggler on a noisy node);
    ``FACTOR+DELAY`` both; the ``+`` of an exponent splits nothing."""
    assert parse_slowdown("0:+20ms,1:+0.5s,2:2+10ms,3:1e+1+1e+3ms", 4) == {
        0: Slowdown(1.0, 0.02), 1: Slowdown(1.0, 0.5), 2: Slowdown(2.0, 0.01),
        3: Slowdown(10.0, 1.0)}
    assert parse_slowdown(" 0 : + 20 ms ", 1) == parse_slowdown("0:+0.02s", 1)
    assert parse_slowdown("0:+0s,1:+3600s", 2) == {0: Slowdown(), 1: Slowdown(1.0, 3600.0)}
    assert StragglerConfig(slowdown="1:3+5ms").slowdown_of(1, 2) == Slowdown(3.0, 0.005)
    assert StragglerConfig(slowdown="1:3+5ms").slowdown_of(0, 2) == Slowdown(1.0, 0.0)
    assert StragglerConfig(slowdown="1:+5ms").factor(1, 2) == 1.0


@pytest.mark.parametrize("value, why", [
    ("0:+-5ms", "delay '-5ms' of '0:+-5ms' has a sign; write the number alone after the "
     "one '+' (e.g. 0:+20ms)"),
    # float('+20') reads: both were taken as 20 ms.
    ("0:++20ms", "delay '+20ms' of '0:++20ms' has a sign; write the number alone after the "
     "one '+' (e.g. 0:+20ms)"),
    ("0:2++20ms", "delay '+20ms' of '0:2++20ms' has a sign; write the number alone after "
     "the one '+' (e.g. 0:2+20ms)"),
    # Said "an unknown unit 'ms'": the unit is known, the number is missing.
    ("0:+ms", "delay 'ms' of '0:+ms' has no number before ms; give one (e.g. +20ms, +0.5s)"),
    ("0:+s", "delay 's' of '0:+s' has no number before s; give one (e.g. +20ms, +0.5s)"),
    ("0:+20ms+5ms", "delay '20ms+5ms' of '0:+20ms+5ms' has no number before ms; give one "
     "(e.g. +20ms, +0.5s)"),
    ("0:+e3ms", "delay 'e3ms' of '0:+e3ms' has no number before ms; give one "
     "(e.g. +20ms, +0.5s)"),
    ("0:+20.5.3", "delay '20.5.3' of '0:+20.5.3' is not a number with ms or s "
     "(e.g. +20ms, +0.5s)"),
    ("0:+nanms", "delay 'nanms' of '0:+nanms' must be in [0, 3600s] (an hour)"),
    ("0:+infs", "delay 'infs' of '0:+infs' must be in [0, 3600s] (an hour)"),
    ("0:+3601s", "delay '3601s' of '0:+3601s' must be in [0, 3600s] (an hour)"),
    ("0:+3600001ms", "delay '3600001ms' of '0:+3600001ms' must be in [0, 3600s] (an hour)"),
    # Before --slowdown took delays, 0:+20 was factor 20 (float('+20')): say how to write each.
    ("0:+20", "delay '20' of '0:+20' has no unit: write 0:+20ms or 0:+20s for a delay; a "
     "factor is written without '+', as 0:20"),
    ("0:2+20", "delay '20' of '0:2+20' has no unit: write 0:2+20ms or 0:2+20s for a delay"),
    ("0:+nan", "delay 'nan' of '0:+nan' has no unit; give ms or s (e.g. +20ms, +0.5s)"),
    ("0:+20us", "delay '20us' of '0:+20us' has an unknown unit 'us'; give ms or s "
     "(e.g. +20ms, +0.5s)"),
    ("0:+1h", "delay '1h' of '0:+1h' has an unknown unit 'h'; give ms or s (e.g. +20ms, +0.5s)"),
    ("0:2+", "cannot parse '0:2+'; want RANK:FACTOR, RANK:+DELAY or RANK:FACTOR+DELAY "
     "(DELAY in ms or s, e.g. 0:+20ms)"),
    ("0:-20ms", "cannot parse '0:-20ms'; want RANK:FACTOR"),
    ("0:0.5+1ms", "factor 0.5 must be in [1, 1e+06]"),
    ("0:+1ms,0:2", "rank 0 given twice"),
])
def test_a_bad_delay_is_one_line_naming_it_as_typed_or_as_the_field(value, why):
    """On the command line the flag and its value (before MPI: ``refusal`` runs the
    parser, the configuration and the launch checks); from Python the field, as every other
    refusal of the configuration classes names it."""
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--slowdown", value]).startswith(
        f"--slowdown {value}: {why}")
    with pytest.raises(UsageError) as refused:
        StragglerConfig(slowdown=value)
    assert str(refused.value).startswith(f"StragglerConfig.slowdown={value!r}: {why}")
    assert "\n" not in str(refused.value)


def test_a_rank_refused_at_launch_from_python_names_the_field():
    """The ranks are checked at launch (the workers known then): from Python it named
    ``--slowdown``, a flag the caller never typed."""
    with pytest.raises(UsageError, match=r"^StragglerConfig.slowdown='2:\+1s': rank 2 is not "
                                         r"a worker \(0\.\.1\)"):
        StragglerConfig(slowdown="2:+1s").slowdowns(2)


def test_a_delayed_step_sleeps_the_delay_whatever_it_took():
    """``+DELAY`` asks for DELAY after every step, a short one or a long one (a factor's pad
    follows the step); with a factor, (FACTOR - 1) t + DELAY. ``pad`` returns the sleep it
    asked for and ``slept`` (the summary's straggler_sleep_s_per_worker) sums them."""
    delayed = Straggler(delay=0.002)
    assert delayed.active
    assert delayed.pad(0.001) == pytest.approx(0.002)
    assert delayed.pad(0.004) == pytest.approx(0.002)
    assert delayed.slept == pytest.approx(0.004)
    both = Straggler(factor=2.0, delay=0.001)
    assert both.pad(0.002) == pytest.approx(0.003) and both.slept == pytest.approx(0.003)


def test_jitter_multiplies_the_delay_with_the_step():
    """With --jitter a delayed step takes ``draw * (FACTOR t + DELAY)``: the sleep asked for
    is that less t, and none when it is not above t (a step cannot be made faster)."""
    seeded = dict(jitter=0.5, seed=1, rank=2)
    twin = Straggler(**seeded)
    straggler = Straggler(**seeded, factor=1.5, delay=0.001)
    t = 0.001
    for _ in range(20):
        draw = twin.draw()
        assert straggler.pad(t) == pytest.approx(max(0.0, draw * (1.5 * t + 0.001) - t))
    assert straggler.stretched(1.0) >= 1.0


def test_a_delay_in_ms_is_the_float_of_the_same_delay_in_s():
    """``9 * 1e-3`` is not ``float("0.009")``: 2674 of the delays 1..20000 ms read in ms were
    another float than in s, and a resume refused ``--slowdown 0:+9ms`` for a run started
    with ``0:+0.009s`` (docs/DESIGN.md: ``0:+20ms`` is ``0:+0.02s``)."""
    for ms in range(1, 20001):
        seconds = f"{ms // 1000}.{ms % 1000:03d}"
        assert parse_slowdown(f"0:+{ms}ms", 1) == {0: Slowdown(1.0, float(seconds))}, ms
        assert parse_slowdown(f"0:+{seconds}s", 1) == {0: Slowdown(1.0, float(seconds))}, ms
    assert parse_slowdown("0:+1e-2s,1:+1E1ms,2:+0.5e+1ms,3:+12_5ms", 4) == {
        0: Slowdown(1.0, 0.01), 1: Slowdown(1.0, 0.01), 2: Slowdown(1.0, 0.005),
        3: Slowdown(1.0, 0.125)}
    assert policy.changed_option({"slowdown": "0:+9ms"}, {"slowdown": "0:+0.009s"},
                                 frozenset()) is None
    assert policy.changed_option({"slowdown": "0:+9ms"}, {"slowdown": "0:+0.0091s"},
                                 frozenset()) == "with --slowdown 0:+9ms, not 0:+0.0091s"
