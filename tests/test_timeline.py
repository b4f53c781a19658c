"""The Horovod timeline's writer when the disk fills up (hpctrain.sync.timeline).

Only rank 0 writes the timeline, inside the collectives it records: an OSError there ended
rank 0 alone, mid-job, while the other ranks waited in the collective, and left the file cut
inside an event. Now the timeline stops as Horovod's writer does, in one line, and the file
keeps its whole events.
"""

import json
import os

import torch
from conftest import fill, full_disk

import hpctrain.sync as sync
from hpctrain.sync import timeline

STOPS = "No space left on device; the timeline stops here, "
COMPLETE = "the file keeps its events up to now, a complete JSON array"
CUT = ("the file is cut off after its last whole event, without the JSON array's closing ']' "
       "(chrome://tracing and Perfetto read it so)")


def test_a_full_disk_stops_the_timeline_in_one_line_and_training_goes_on(tmp_path, capfd):
    with full_disk(tmp_path / "disk") as disk:
        path = disk / "timeline.json"
        sync.init()
        try:
            sync.start_timeline(str(path))
            while os.path.getsize(path) == 0:  # some events on disk before it fills
                sync.allreduce(torch.ones(2), name="x")
            fill(disk)
            for _ in range(1000):
                assert sync.allreduce(torch.ones(2), name="x").tolist() == [1.0, 1.0]
                if not timeline.active():
                    break
            assert not timeline.active()
            size = os.path.getsize(path)
            assert sync.allreduce(torch.ones(2), name="x").tolist() == [1.0, 1.0]
            sync.stop_timeline()
            assert os.path.getsize(path) == size  # stopped: nothing more written
        finally:
            sync.shutdown()
        said = capfd.readouterr().err
        text = path.read_text()
    assert said in (f"hpctrain: timeline {path}: {STOPS}{COMPLETE}\n",
                    f"hpctrain: timeline {path}: {STOPS}{CUT}\n")
    # Cut after a whole event: closing it is all a JSON parser needs (the page the closing
    # needs may be the one the disk lacks: then the line says so).
    events = json.loads(text if COMPLETE in said else text + "{}]")
    assert events[-1] == {}
    assert sum(e.get("name") == "MPI_ALLREDUCE" for e in events) >= 1


def test_what_a_cut_timeline_keeps(tmp_path):
    """Cut inside an event: the file ends after the last whole one, closed where the last
    page has room; in a page filled to its last byte by whole events it stays cut there."""
    event = json.dumps({"ph": "E", "ts": 1, "pid": 1}) + ",\n"
    with full_disk(tmp_path / "disk") as disk:
        roomy, full = disk / "roomy.json", disk / "full.json"
        whole = "[\n" + event * 20
        roomy.write_text(whole + event[:-5])  # half an event
        lines = "[\n" + event * ((4096 - 2) // len(event))
        full.write_text(lines + " " * (4096 - len(lines) - 1) + "\n")  # one page, to its end
        fill(disk)
        assert timeline._end_whole(str(roomy)) == COMPLETE
        assert timeline._end_whole(str(full)) == CUT
        assert json.loads(roomy.read_text()) == [{"ph": "E", "ts": 1, "pid": 1}] * 20 + [{}]
        assert os.path.getsize(full) == 4096
        assert len(json.loads(full.read_text() + "{}]")) == (4096 - 2) // len(event) + 1


def test_a_timeline_whose_closing_alone_failed_is_left_as_it_is(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("[\n{},\n{}]\n")
    assert timeline._end_whole(str(path)) == COMPLETE
    assert path.read_text() == "[\n{},\n{}]\n"
