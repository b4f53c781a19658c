"""The shared spellings of options in messages: a flag and its flat key, a value as typed."""

from hpctrain import options


def test_flag_and_flat_key_are_each_others():
    """``--lr-milestones`` is config.flat's ``lr_milestones``, and back."""
    assert options.flat_key("--no-progress") == "no_progress"
    assert options.flag_of_key("lr_milestones") == "--lr-milestones"
    assert options.flat_key(options.flag_of_key("shuffle_chunk_mb")) == "shuffle_chunk_mb"


def test_a_value_as_its_flag_takes_it():
    """A list comma-separated whether a tuple or a list, a table as JSON (quoted when asked),
    None as ``none``, a huge number short."""
    assert options.as_typed((0.9, 0.999)) == options.as_typed([0.9, 0.999]) == "0.9,0.999"
    assert options.as_typed({"width": 8}) == '{"width": 8}'
    assert options.as_typed({"width": 8}, quote="'") == "'{\"width\": 8}'"
    assert options.as_typed(None) == "none"
    assert options.as_typed(1e308) == "1e+308"
    assert options.as_typed("cosine") == "cosine"
