"""The run's JSON outputs (metrics.py): strict JSON, whatever the numbers."""

import json
import math

import numpy as np
import pytest

from hpctrain.metrics import RunLog, write_json_atomic


def strict(text: str):
    """JSON as strict parsers read it: no NaN, Infinity or -Infinity tokens."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


BAD = [float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float64("inf")]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_summary_and_points_write_non_finite_floats_as_null(tmp_path, bad):
    """A NaN or Infinity anywhere (a diverged run's loss, a custom algorithm's field) was
    written as Python's NaN token, which JSON.parse, jq and strict parsers refuse: now null.
    Finite values, numpy's too, are written as before."""
    summary = {"final_test_loss": bad, "per_worker": [1.5, bad], "nested": {"x": (bad, 2)},
               "acc": np.float32(0.5), "n": np.int64(3), "ok": 0.1}
    write_json_atomic(tmp_path / "summary.json", summary)
    got = strict((tmp_path / "summary.json").read_text())
    assert got == {"final_test_loss": None, "per_worker": [1.5, None],
                   "nested": {"x": [None, 2]}, "acc": 0.5, "n": 3, "ok": 0.1}
    log = RunLog(tmp_path)
    log.write_points([{"t": 0.0, "epoch": 0.0, "updates": 0, "test_acc": 0.1,
                       "test_loss": bad}])
    log.write_points([{"t": 1.0, "epoch": 1.0, "updates": 4, "test_acc": 0.2,
                       "member_loss": bad}])
    lines = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [p.get("test_loss", p.get("member_loss")) for p in lines] == [None, None]
    assert [p["test_acc"] for p in lines] == [0.1, 0.2]
    assert math.isnan(summary["per_worker"][1]) or math.isinf(summary["per_worker"][1])
