"""JSON a user wrote: ``--model-args``' object, a settings file, each key given once.

``json.loads`` keeps the last of two equal keys without a word; an option or a file edited by
hand that gives one twice is refused instead, as TOML refuses it.
"""

from __future__ import annotations

import argparse
import json


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are each given once (``json.loads``' ``object_pairs_hook``):
    a file or option edited by hand would otherwise keep the last silently; TOML refuses a
    second one too."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def json_object(text: str) -> dict:
    """``--model-args '{"width": 32}'``: a JSON object, each key given once."""
    shown = text if len(text) <= 200 else f"{text[:60]}...({len(text)} characters)"
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{shown!r} is not JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{shown!r}: nested too deeply") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{shown!r}: want a JSON object, e.g. '{{\"width\": 32}}'")
    return value
