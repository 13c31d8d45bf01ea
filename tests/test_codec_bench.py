"""`duplex bench codec` runs end to end (a couple of frames, full-size random Mimi)."""

from __future__ import annotations

import argparse

from duplex.codec import bench


def test_bench_codec_prints_a_table(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--frames", "2", "--warmup", "1", "--batch-sizes", "1", "2", "--device", "cpu"])
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("cpu ") and line.split()[1].isdigit()]
    assert [row[1] for row in rows] == ["1", "2"]
    assert all(float(value) > 0 for row in rows for value in row[2:])


def test_bench_codec_rejects_bad_flags(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.main(parser.parse_args(["--frames", "0"])) == 2
    captured = capsys.readouterr()
    assert "error: --frames must be >= 1" in captured.err and captured.out == ""
