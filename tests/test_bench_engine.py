"""`duplex bench engine` prints its table, and refuses the CUDA-only options on CPU with a one-line error."""

from __future__ import annotations

from duplex.cli import main


def test_bench_engine_prints_the_cost_table(fixtures_dir, capsys):
    code = main(["bench", "engine", "--fixtures", str(fixtures_dir), "--slots", "4", "--active", "1", "4",
                 "--steps", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", "4"), ("4", "4")]  # active, rows computed (floor 4)
    assert "ratio" in out and "one waiting ms" in out


def test_bench_engine_refuses_cuda_options_on_cpu(capsys):
    assert main(["bench", "engine", "--device", "cpu", "--check"]) == 2
    assert "need a CUDA device" in capsys.readouterr().err
    assert main(["bench", "engine", "--active", "0"]) == 2


def test_bench_engine_process_prints_thread_and_process_rows(capsys):
    code = main(["bench", "engine-process", "--sessions", "2", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith(("thread", "process"))]
    assert rows == [["thread", "idle"], ["thread", "busy"], ["process", "idle"], ["process", "busy"]]
