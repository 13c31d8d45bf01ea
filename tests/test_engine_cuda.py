"""CUDA only (skipped elsewhere): CUDA-graph engine steps equal eager ones, and the eager device step never
syncs with the host. Run on a GPU machine: ``pytest tests/test_engine_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from duplex.server.bench_engine import check_cuda_graphs, load_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_steps_equal_eager_steps(fixtures_dir):
    mimi, lm = load_models("tiny", fixtures_dir, torch.device("cuda"))
    report = check_cuda_graphs(mimi, lm, torch.device("cuda"))
    assert report["sync_error"] is None, report["text"]
    assert report["token_mismatches"] == 0, report["text"]
    assert report["max_pcm"] < 1e-3, report["text"]
