"""`duplex bench lm` runs end to end on a small config and prints its table."""

from __future__ import annotations

import torch

from duplex.cli import main
from duplex.model.bench import preset
from duplex.model.lm import LMModel


def test_bench_lm_prints_a_row_per_batch_size(fixtures_dir, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "lm", "--config", str(fixtures_dir / "lm_tiny" / "config.json"), "--steps", "3",
                     "--warmup", "1", "--batch-sizes", "1", "2", "--threads", "1", "--floor", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert [row[0] for row in rows] == ["1", "2"] and all(len(row) == 10 for row in rows)
    assert all(float(value) > 0 for row in rows for value in row[1:])


def test_bench_presets_have_the_documented_sizes():
    with torch.device("meta"):
        small = sum(p.numel() for p in LMModel(preset("300m")).parameters())
    assert 330e6 < small < 350e6  # the reference's 338 M measurement
    assert preset("7b").dim == 4096


def test_bench_rejects_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"dim": 8}')
    assert main(["bench", "lm", "--config", str(bad), "--device", "cpu"]) == 2
    assert "delays" in capsys.readouterr().err
