"""Output to a reader that went away ends the command instead of draining it (issue 10, item 12)."""

from __future__ import annotations

import os

from matchlock.cli.tty import OutputSink


def test_a_closed_pipe_is_reported_once_and_writing_stops():
    read_end, write_end = os.pipe()
    os.close(read_end)
    seen: list[OSError] = []
    sink = OutputSink(write_end, on_broken=seen.append)
    try:
        sink(b"y\n")
        sink(b"y\n")
    finally:
        os.close(write_end)
    assert sink.broken and len(seen) == 1 and isinstance(seen[0], BrokenPipeError)


def test_output_still_reaches_the_log_after_the_reader_left(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(tmp_path / "vm.log", "wb") as log:
        sink = OutputSink(write_end, log, on_broken=lambda exc: None)
        sink(b"kept\n")
    os.close(write_end)
    assert (tmp_path / "vm.log").read_bytes() == b"kept\n"
